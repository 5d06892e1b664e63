"""LoRA on :class:`modules.llm.model.Llama` through peft, saved as an adapter transformers + peft load.

Why peft's tuners API (``LoraModel``) and not ``get_peft_model``: ``get_peft_model(..., task_type=CAUSAL_LM)``
wants a transformers ``PreTrainedModel`` (it calls ``prepare_inputs_for_generation``), while ``LoraModel``
injects ``lora.Linear`` layers into any ``nn.Module`` by name. Our parameter names equal
``LlamaForCausalLM``'s, so the adapter written here (keys ``base_model.model.<HF name>.lora_A.weight``, as
``PeftModel.save_pretrained`` writes them, and an ``adapter_config.json`` with task_type CAUSAL_LM) is one
``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter_dir)`` loads as is.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the prefix PeftModel gives its state-dict keys (PeftModel.base_model is the LoraModel)
PEFT_PREFIX = "base_model."


def lora_config(config, base_model_path: str | Path):
    """peft's LoraConfig for an :class:`~modules.training.llm.sft_config.SFTConfig`."""
    from peft import LoraConfig
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=str(base_model_path))


def attach_lora(model: nn.Module, config, base_model_path: str | Path):
    """Inject LoRA layers into ``model`` in place; only they stay trainable. Returns peft's LoraModel."""
    from peft.tuners.lora import LoraModel
    return LoraModel(model, lora_config(config, base_model_path), "default")


def save_adapter(lora_model, folder: str | Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in PeftModel's own layout."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: LoRA here never resizes the vocabulary, and "auto" would look the base
    # model up (on the hub, for a path that is not local) to compare vocabulary sizes
    state = get_peft_model_state_dict(lora_model, adapter_name="default", save_embedding_layers=False)
    tensors = {PEFT_PREFIX + key: value.detach().contiguous().cpu() for key, value in state.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_model.peft_config["default"].save_pretrained(str(out))
    return out


def read_adapter_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def merge_lora(lora_model) -> nn.Module:
    """The model with every adapter folded into its base weights and the LoRA layers removed
    (peft's ``merge_and_unload``: W + B @ A x alpha / r). Changes the model in place."""
    return lora_model.merge_and_unload()
