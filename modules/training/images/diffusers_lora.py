"""The diffusers-format copy of a LoRA: ``pytorch_lora_weights.safetensors``, as diffusers' trainers save it.

Why also this one: diffusers users (and ``pipe.load_lora_weights(folder)``) expect it next to the
kohya file. It is written by diffusers itself (``save_lora_weights`` on the peft state from
``get_peft_model_state_dict``), with each component's ``LoraConfig`` in the header
(``lora_adapter_metadata``) so a LoRA whose alpha differs from its rank loads at the trained scale.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

import torch

from modules.training.images.kohya_format import KohyaFormatError, components_sdxl, unwrap_peft, write_atomic

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(folder: str | Path, components: Mapping[str, torch.nn.Module], *,
                        adapter_name: str = "default", weight_name: str = WEIGHT_NAME,
                        sdxl: bool | None = None, if_exists: str = "error") -> Path:
    """Write the peft adapter *adapter_name* of *components* as ``folder/weight_name``; returns its path."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    sdxl = components_sdxl(components, sdxl)
    kwargs = {}
    for component, model in components.items():
        model = unwrap_peft(model)
        if adapter_name not in (getattr(model, "peft_config", None) or {}):
            continue
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    if not kwargs:
        raise KohyaFormatError(f"no LoRA adapter named {adapter_name!r} in {', '.join(components)}")
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".diffusers-lora-") as work:
            pipeline.save_lora_weights(work, weight_name=weight_name, **kwargs)
            Path(work, weight_name).replace(tmp)

    return write_atomic(folder / weight_name, write, if_exists=if_exists)
