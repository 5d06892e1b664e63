"""Textual-inversion embeddings from ``models/embeddings``, used by file name in prompts.

Why: A1111 users drop ``name.safetensors`` into the embeddings folder and write
``name`` in a prompt. We read the file ourselves (A1111 ``emb_params``, A1111
``string_to_param``, diffusers ``{token: tensor}`` / ``learned_embeds``, SDXL
``clip_l``/``clip_g``), then hand the vectors to diffusers'
``load_textual_inversion`` under the file stem as token, so diffusers' own
multi-vector expansion ("name" → "name name_1 …") applies. Embeddings are loaded
lazily, only when a prompt names them, and stay loaded for the model's lifetime.
The infotext "TI hashes" use A1111's short hash (first 12 hex of the file's sha256).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.safetensors_header import check_file

log = logging.getLogger(__name__)

EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class EmbeddingInfo:
    name: str  # the file stem, which is also the prompt token
    filename: str
    shorthash: str | None  # first 12 hex of the file's sha256 (A1111's TI hash)
    vectors: int
    dims: dict  # {"clip_l": 768} / {"clip_l": 768, "clip_g": 1280}
    kind: str | None  # "sd1" (CLIP-L width), "sd2", "sdxl", or None when unknown
    error: str | None = None

    @property
    def shape(self) -> int | None:
        """The vector width A1111's ``/sdapi/v1/embeddings`` reports (CLIP-L's for SDXL files)."""
        return self.dims.get("clip_l") or self.dims.get("clip_g")


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_embedding(path: str | Path, *, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file as ``{"clip_l": (n, d)}`` or ``{"clip_l":…, "clip_g":…}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        check_file(path)  # BrokenModelFile (a ValueError) with the reason, before the library sees the file
        state = load_file(str(path))
    elif allow_unsafe_pickle:
        state = _load_pickled(path)
    else:
        raise ValueError(f"{path.name} is a pickled embedding, which can run code when loaded; it is skipped. "
                         "Convert it to safetensors, or start with --allow-unsafe-pickle if you trust its source")
    if not isinstance(state, dict):
        raise ValueError(f"{path.name}: holds a {type(state).__name__}, not a dict of tensors; not a "
                         "textual-inversion embedding")
    if "clip_l" in state or "clip_g" in state:
        out = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
    elif "emb_params" in state:
        out = {"clip_l": state["emb_params"]}
    elif isinstance(state.get("string_to_param"), dict) and "*" in state["string_to_param"]:
        out = {"clip_l": state["string_to_param"]["*"]}
    elif "string_to_param.*" in state:  # the same A1111 layout, flattened into safetensors
        out = {"clip_l": state["string_to_param.*"]}
    else:
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path.name}: not a textual-inversion embedding (keys: {sorted(state)[:5]}); "
                             "expected emb_params, string_to_param, clip_l/clip_g or a single token tensor")
        out = {"clip_l": tensors[0]}
    if not all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.numel() for v in out.values()):
        raise ValueError(f"{path.name}: the embedding vectors are not 1-D or 2-D tensors")
    return {k: (v.unsqueeze(0) if v.ndim == 1 else v).float() for k, v in out.items()}


def _load_pickled(path: Path):
    """A ``.pt``/``.bin`` embedding (A1111's own format), read with ``weights_only=True``: plain tensors,
    dicts, numbers and strings only, never arbitrary objects. Refusals and damage become ValueError."""
    import pickle
    import zipfile
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path.name}: refused by the safe unpickler (it holds more than tensors: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"{path.name}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None


def _kind(dims: dict) -> str | None:
    if "clip_g" in dims:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(dims.get("clip_l"))


def _embedding_files(emb_dir: str | Path) -> list[Path]:
    root = Path(emb_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in EMBEDDING_EXTS and p.is_file())


def read_embedding_info(path: Path, *, allow_unsafe_pickle: bool = False) -> EmbeddingInfo:
    """Name, hash, vector count and widths of one embedding file (errors are reported, not raised).

    Pickled files are read only with *allow_unsafe_pickle* (``--allow-unsafe-pickle``); without it they
    are listed as skipped with a reason that names the flag.
    """
    try:
        vectors = read_embedding(path, allow_unsafe_pickle=allow_unsafe_pickle)
    except (ValueError, OSError, RuntimeError) as exc:
        return EmbeddingInfo(path.stem, str(path), None, 0, {}, None, error=str(exc))
    dims = {k: int(v.shape[-1]) for k, v in vectors.items()}
    first = next(iter(vectors.values()))
    return EmbeddingInfo(path.stem, str(path), _file_hash(path)[:12], int(first.shape[0]), dims, _kind(dims))


def list_embeddings(emb_dir: str | Path, *, allow_unsafe_pickle: bool = False) -> list[EmbeddingInfo]:
    """Every embedding under *emb_dir* (recursively), sorted by name; unreadable files carry ``error``."""
    return [read_embedding_info(p, allow_unsafe_pickle=allow_unsafe_pickle) for p in _embedding_files(emb_dir)]


def default_dir(sd) -> Path | None:
    """``models/embeddings`` next to the ``models/Stable-diffusion`` folder holding the checkpoint."""
    candidate = Path(sd.info.filename).resolve().parent.parent / "embeddings"
    return candidate if candidate.is_dir() else None


def mentioned(name: str, texts: list[str]) -> bool:
    pattern = re.compile(rf"(?<![\w\-]){re.escape(name)}(?![\w\-])")
    return any(pattern.search(t or "") for t in texts)


def _targets(sd):
    pipe = sd.pipe
    targets = [("clip_l", pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        targets.append(("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
    return targets


def ensure_loaded(sd, texts: list[str], emb_dir: str | Path | None,
                  warnings: list[str] | None = None) -> dict[str, str]:
    """Load the embeddings of *emb_dir* that *texts* name into *sd*'s pipeline; return {name: hash}.

    An embedding made for another model type is skipped with a message appended to *warnings*
    instead of failing the generation. ``sd.loaded_embeddings`` remembers what is loaded.
    """
    if emb_dir is None:
        return {}
    loaded: dict = sd.loaded_embeddings
    warnings = warnings if warnings is not None else []
    used: dict[str, str] = {}
    for path in _embedding_files(emb_dir):
        if not mentioned(path.stem, texts):
            continue
        if path.stem in loaded:
            used[path.stem] = loaded[path.stem]
            continue
        allow_pickle = bool(getattr(sd, "allow_unsafe_pickle", False))
        info = read_embedding_info(path, allow_unsafe_pickle=allow_pickle)
        if info.error:
            warnings.append(f"embedding {info.name} was ignored: {info.error}")
            continue
        vectors = read_embedding(info.filename, allow_unsafe_pickle=allow_pickle)
        targets = _targets(sd)
        fits = all(key in vectors and vectors[key].shape[-1] == enc.get_input_embeddings().weight.shape[-1]
                   for key, _, enc in targets)
        if not fits:
            message = (f"embedding {info.name} ({info.kind or 'unknown'} type, dims {info.dims}) does not fit this "
                       f"{sd.kind} model; it was ignored")
            log.warning(message)
            if message not in warnings:
                warnings.append(message)
            continue
        for key, tokenizer, encoder in targets:
            weight = encoder.get_input_embeddings().weight
            sd.pipe.load_textual_inversion(vectors[key].to(device=weight.device, dtype=weight.dtype),
                                           token=info.name, tokenizer=tokenizer,
                                           text_encoder=encoder)
        loaded[info.name] = info.shorthash
        used[info.name] = info.shorthash
        log.info("loaded embedding %s (%d vectors)", info.name, info.vectors)
    return used
