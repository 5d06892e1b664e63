"""How many bytes a model's weights take: in memory (measured) and before loading (estimated).

One helper for every kind of model, so the model manager, the diagnostics and the services agree on a
model's size: :func:`weight_bytes` measures a loaded object (a module, a diffusers pipeline, a
loaded-model bundle), :func:`estimate_load_bytes` predicts what loading files will take, from
the safetensors headers (dtype and shape of every tensor, without reading any weights), so the model
manager can make room *before* a load instead of finding out after it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

#: bytes per element of the dtypes safetensors headers name
_SAFETENSORS_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                           "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
#: weight files whose size is what loading them takes (pickles cannot be read without unpickling)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of *tensors*, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        ptr = t.data_ptr()
        if ptr and ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def _tensors_of(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, torch.nn.Module):
        out.extend(obj.parameters())
        out.extend(obj.buffers())
    elif isinstance(getattr(obj, "components", None), dict):      # a diffusers pipeline
        for value in obj.components.values():
            _tensors_of(value, out)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors_of(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors_of(value, out)


def weight_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers *obj* holds, shared tensors counted once.

    Understands tensors, ``torch.nn.Module``, diffusers pipelines (their ``components``), containers of
    those. Any other object with a ``memory_bytes()`` method answers for itself (the loaded-LLM and SD-model
    bundles define it as this function applied to their weights).
    """
    own = getattr(obj, "memory_bytes", None)
    if callable(own) and not isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return int(own())
    found: list[torch.Tensor] = []
    _tensors_of(obj, found)
    return tensors_bytes(found)


def _safetensors_bytes(path: Path, dtype: torch.dtype | None, ignore_prefixes: tuple[str, ...]) -> int:
    """Bytes the tensors of one safetensors file take once loaded (floating ones cast to *dtype*)."""
    from safetensors import safe_open
    target = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if ignore_prefixes and name.startswith(ignore_prefixes):
                continue
            piece = f.get_slice(name)
            numel = 1
            for dim in piece.get_shape():
                numel *= int(dim)
            kind = piece.get_dtype()
            size = target if target is not None and kind in _FLOATING else _SAFETENSORS_ITEM_BYTES.get(kind, 4)
            total += numel * size
    return total


def _loaded_files(folder: Path) -> list[Path]:
    """The weight files a load of *folder* reads: per directory, the plain safetensors files when there are
    any (diffusers and transformers prefer them to ``.bin``, and to ``.fp16.`` variants), else all of them."""
    by_dir: dict[Path, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            by_dir.setdefault(p.parent, []).append(p)
    out = []
    for files in by_dir.values():
        plain = [p for p in files if p.suffix == ".safetensors" and "." not in p.stem]
        out += plain or files
    return out


def estimate_load_bytes(path: str | Path, dtype: torch.dtype | None = None, *,
                        ignore_prefixes: tuple[str, ...] = ()) -> int:
    """Bytes loading the weights at *path* (a file, or a folder of them) will take on the device.

    Safetensors files are estimated from their headers, floating tensors at *dtype* (an fp16 file loaded in
    fp32 takes twice its size), skipping tensors named with *ignore_prefixes* (e.g. the EMA copy in an SD
    checkpoint, which is not loaded); other weight files, and a safetensors file whose header cannot be
    read, by their file size. Never raises for a broken file: the load itself reports what is wrong with it.
    """
    root = Path(path)
    files = [root] if root.is_file() else _loaded_files(root) if root.is_dir() else []
    total = 0
    for file in files:
        try:
            if file.suffix.lower() == ".gguf":     # quantized blocks: loaded dequantized, several times larger
                from modules.quantize.gguf_import import gguf_load_bytes
                total += gguf_load_bytes(file, dtype)
                continue
            total += (_safetensors_bytes(file, dtype, ignore_prefixes) if file.suffix == ".safetensors"
                      else file.stat().st_size)
        except Exception as exc:  # noqa: BLE001 - a corrupt header: fall back to the file size
            log.debug("cannot read the safetensors header of %s (%s); estimating by file size", file, exc)
            try:
                total += file.stat().st_size
            except OSError:
                pass
    return total
