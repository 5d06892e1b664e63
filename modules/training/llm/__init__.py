"""The LLM trainer on Atelier's own GQA model (:mod:`modules.llm.model`): tokenizer training, packed
datasets, pretraining and evaluation."""
