"""A model under training, held through the shared model manager like every other model.

The app has one owner of model memory (:class:`modules.model_manager.ModelManager`). A training run leases
its model there under ``training/<run>`` for as long as it trains: the manager's admission makes room for
it first (evicting idle chat or image models, least recently used first, instead of letting the trainer
run the machine out of memory), the lease keeps it from being evicted mid-run, and the memory report and
diagnostics list it beside the served models. What it counts is the training state, not only the weights:
weights, gradients and AdamW's two moments, all fp32 (:func:`training_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

#: fp32 weights + fp32 gradients + AdamW's exp_avg and exp_avg_sq
TRAINING_COPIES = 4
KIND = "training"


def training_bytes(num_parameters: int) -> int:
    """Bytes of a model's training state in fp32 with AdamW (activations come out of the manager's reserve)."""
    return int(num_parameters) * 4 * TRAINING_COPIES


@dataclass
class TrainingModel:
    """What the manager holds for a run: the module being trained, sized as its whole training state."""
    model: torch.nn.Module
    run: str

    def memory_bytes(self) -> int:
        return training_bytes(sum(p.numel() for p in self.model.parameters()))


def lease_key(run: str) -> str:
    return f"{KIND}/{run}"


def manager_lease(models: Any, run: str, leases: list) -> Callable[[Callable[[], torch.nn.Module], int], Any]:
    """A ``model_lease`` hook for :class:`~modules.training.llm.pretrain.Pretrainer`: builds the model inside
    the manager's admission and returns it; the lease is appended to ``leases`` for the caller to release."""
    def lease(build: Callable[[], torch.nn.Module], num_parameters: int) -> torch.nn.Module:
        held = models.acquire(lease_key(run), lambda: TrainingModel(build(), run), kind=KIND,
                              size_bytes=training_bytes(num_parameters), meta={"run": run})
        leases.append(held)
        return held.model.model
    return lease


@dataclass
class TrainingPipeline:
    """What the manager holds for an image run: the base pipeline being trained (a
    :class:`~modules.training.images.base_model.BaseModel`). Sized as its weights, plus, for full
    fine-tuning, fp32 gradients and AdamW's two moments of the components trained in full; a LoRA's own
    training state is a few MB beside the base and is left to the manager's reserve."""
    base: Any
    run: str
    #: pipeline components trained in full (finetune: "unet", and "text_encoder" when it is trained)
    full: tuple[str, ...] = ()

    def memory_bytes(self) -> int:
        pipe = self.base.pipe
        total = 0
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            total += sum(p.numel() * p.element_size() for p in module.parameters())
            if name in self.full:
                total += sum(p.numel() * 4 for p in module.parameters()) * (TRAINING_COPIES - 1)
        return total


def manager_base_lease(models: Any, run: str, leases: list, *, full: tuple[str, ...] = ()
                       ) -> Callable[[Callable[[], Any], int], Any]:
    """A ``base_lease`` hook for :func:`~modules.training.images.train_command.run_image_training`: loads the
    base inside the manager's admission (room for ``size_bytes`` is made first) and returns it; the lease is
    appended to ``leases`` for the caller to release."""
    def lease(load: Callable[[], Any], size_bytes: int) -> Any:
        held = models.acquire(lease_key(run), lambda: TrainingPipeline(load(), run, full), kind=KIND,
                              size_bytes=size_bytes, meta={"run": run})
        leases.append(held)
        return held.model.base
    return lease
