"""Data parallelism for the pretraining loop: DDP or FSDP2 (``parallel: fsdp``), on gloo (CPU) or NCCL (CUDA).

Why this is kept apart from the loop: the loop only asks four things of it — a module to train, a way
to skip the gradient all-reduce on all but the last micro-step of an accumulation (``no_sync``; the
gradients of a step are then reduced once, as if the whole global batch were one backward pass), the
full (unsharded) weights and optimizer state for a checkpoint, and how to load them back — and the
answers differ between a single process, DDP and FSDP.

DDP and the single process share one checkpoint format (every rank holds the whole model and the same
optimizer state, so rank 0's copy is the checkpoint, and a run may resume with another process count).
FSDP's optimizer state is gathered by parameter name (``torch.distributed.checkpoint.state_dict``), so an
FSDP checkpoint resumes under FSDP; the trainer refuses the other combinations with a clear message.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from modules.llm.model import Llama
from modules.training.distributed import Distributed


def wrap_model(model: Llama, parallel: str, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """The module the loop runs forward/backward on: ``model`` itself (one process), DDP around it, or
    ``model`` sharded in place by FSDP2 (each decoder block its own unit, the rest in the root)."""
    if not dist.active:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    # The model has no buffers (RoPE is recomputed), so there is nothing to sync before each forward.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


@contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-step's forward and backward: with ``enabled`` False the gradients only
    accumulate locally (DDP ``no_sync``; FSDP ``set_requires_gradient_sync(False)``)."""
    if enabled:
        yield
        return
    if is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    no_sync = getattr(module, "no_sync", None)
    with (no_sync() if no_sync is not None else nullcontext()):
        yield


def clip_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` over the global gradient; returns the norm before clipping (the same on every
    rank: DDP gradients are already averaged, FSDP's sharded norm is reduced by torch)."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):                  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def full_weights(model: Llama) -> dict[str, torch.Tensor] | None:
    """The whole state dict on the CPU (collective under FSDP: on rank 0 only, None on the others)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not state:
            return None
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: Llama, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer state to save (collective under FSDP, keyed by parameter name; rank 0 only)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state or None
    return optimizer.state_dict()


def load_weights(model: Llama, weights: dict[str, torch.Tensor]) -> None:
    """Every rank loads the whole checkpoint it read itself."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        return
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(weights[name])


def load_optimizer_state(model: Llama, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def optimizer_format(model: Llama) -> str:
    """How the checkpoint's optimizer state is keyed: ``ids`` (torch's own) or ``names`` (FSDP)."""
    return "names" if is_fsdp(model) else "ids"


def plain_copy(model: Llama, weights: dict[str, torch.Tensor]) -> Llama:
    """An ordinary CPU Llama holding ``weights`` (to write ``final/`` from an FSDP run)."""
    copy = Llama(model.config)
    copy.load_state_dict(weights)
    return copy
