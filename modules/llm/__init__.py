"""Large language models: the Llama-2 (GQA) architecture, checkpoints, tokenizer, chat templates.

Importing this package is cheap: submodules are imported where they are used.
"""
