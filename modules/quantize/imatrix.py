"""Importance matrix from calibration text, computed with Atelier's own model.

An importance matrix tells llama.cpp's quantizer which input columns of each weight matrix matter: for a
tensor W used as ``y = W x``, entry j is the mean of ``x_j**2`` over the calibration tokens. Rounding
errors in columns that meet large activations cost the most, so the quantizer weighs them more; the 1.5-3
bit i-quants cannot be fitted without it, and the k-quants get measurably better with one.

llama.cpp computes it with its ``llama-imatrix`` tool, which llama-cpp-python does not expose; the
statistic is simple, so it is computed here with forward pre-hooks on every ``nn.Linear`` of
:class:`modules.llm.model.Llama` (the exact inputs llama.cpp's matmuls see, as the models compute the
same function), the text split into chunks that each start with BOS as ``llama-imatrix`` does.
Entries are keyed by GGUF tensor name (q/k row permutation does not touch input columns, so the
export's permutation needs no correction). ``token_embd`` has none: it is a lookup, not a matmul.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from modules.quantize.errors import GGUFExportError
from modules.quantize.gguf_names import gguf_name


@dataclass
class ImportanceMatrix:
    #: GGUF tensor name -> mean squared input activation per input column (float32)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    #: calibration tokens and chunks it was computed from
    tokens: int = 0
    chunks: int = 0


def compute_imatrix(model: nn.Module, token_ids: Iterable[int], *, bos_id: int | None, chunk_tokens: int = 512,
                    max_chunks: int | None = None) -> ImportanceMatrix:
    """Run *model* (an Atelier :class:`~modules.llm.model.Llama`) over *token_ids* and collect the matrix.

    The ids are cut into chunks of *chunk_tokens* (at most the model's context); each chunk's first token is
    replaced by *bos_id* when given, as ``llama-imatrix`` does. A tail shorter than a chunk is dropped
    unless it is all there is. max_chunks: stop after this many.
    """
    ids = list(token_ids)
    context = model.config.max_position_embeddings
    chunk = min(int(chunk_tokens), context)
    if chunk < 2:
        raise GGUFExportError(f"chunk_tokens must be at least 2, got {chunk_tokens}")
    if len(ids) < 2:
        raise GGUFExportError(f"the calibration text gave {len(ids)} token(s); give at least a paragraph of text "
                              f"(a few thousand tokens is typical)")
    starts = list(range(0, max(len(ids) - chunk + 1, 1), chunk))
    if max_chunks is not None:
        starts = starts[:max_chunks]
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1])                                     # (B*T, in_features)
            squared = x.pow(2).sum(0)
            sums[name] = sums[name] + squared if name in sums else squared
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    handles = []
    tied = getattr(model.config, "tie_word_embeddings", False)
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            target = gguf_name(f"{module_name}.weight")
            if target is None or (tied and target == "output.weight"):
                continue
            handles.append(module.register_forward_pre_hook(hook_for(target)))
    device = next(model.parameters()).device
    used = 0
    try:
        with torch.inference_mode():
            for start in starts:
                piece = ids[start:start + chunk]
                if bos_id is not None:
                    piece = [bos_id] + piece[1:]
                model(torch.tensor([piece], device=device))    # every position reaches lm_head too
                used += len(piece)
    finally:
        for handle in handles:
            handle.remove()
    values = {name: (total / rows[name]).cpu().numpy().astype(np.float32) for name, total in sums.items()}
    return ImportanceMatrix(values=values, tokens=used, chunks=len(starts))


def imatrix_from_text(folder: str | Path, text: str, *, chunk_tokens: int = 512,
                      max_chunks: int | None = None) -> ImportanceMatrix:
    """Load the HF Llama folder in fp32 on the CPU and compute its matrix over *text* (see compute_imatrix)."""
    from modules.llm.loader import load_llm

    if not text.strip():
        raise GGUFExportError("the calibration text is empty; give a file of ordinary text in the model's language")
    try:
        llm = load_llm(folder)
    except (ValueError, OSError) as exc:      # CheckpointError / TokenizerError are ValueErrors
        raise GGUFExportError(f"cannot load {folder} to compute an importance matrix: {exc}") from None
    ids = llm.tokenizer.encode(text, add_bos=False)
    return compute_imatrix(llm.model, ids, bos_id=llm.tokenizer.bos_id, chunk_tokens=chunk_tokens,
                           max_chunks=max_chunks)
