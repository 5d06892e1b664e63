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
        state = load_file(str(path))
    elif allow_unsafe_pickle:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path.name} is a pickled embedding; convert it to safetensors or start with "
                         "--allow-unsafe-pickle")
    if "clip_l" in state or "clip_g" in state:
        out = {k: state[k] for k in ("clip_l", "clip_g") if k in state}
    elif "emb_params" in state:
        out = {"clip_l": state["emb_params"]}
    elif "string_to_param" in state:
        out = {"clip_l": state["string_to_param"]["*"]}
    elif "string_to_param.*" in state:  # the same A1111 layout, flattened into safetensors
        out = {"clip_l": state["string_to_param.*"]}
    else:
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path.name}: not a textual-inversion embedding (keys: {sorted(state)[:5]}); "
                             "expected emb_params, string_to_param, clip_l/clip_g or a single token tensor")
        out = {"clip_l": tensors[0]}
    return {k: (v.unsqueeze(0) if v.ndim == 1 else v).float() for k, v in out.items()}


def _kind(dims: dict) -> str | None:
    if "clip_g" in dims:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(dims.get("clip_l"))


def _embedding_files(emb_dir: str | Path) -> list[Path]:
    root = Path(emb_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in EMBEDDING_EXTS and p.is_file())


def read_embedding_info(path: Path) -> EmbeddingInfo:
    """Name, hash, vector count and widths of one embedding file (errors are reported, not raised)."""
    try:
        vectors = read_embedding(path) if path.suffix == ".safetensors" else None
    except (ValueError, OSError, RuntimeError) as exc:
        return EmbeddingInfo(path.stem, str(path), None, 0, {}, None, error=str(exc))
    if vectors is None:
        return EmbeddingInfo(path.stem, str(path), _file_hash(path)[:12], 0, {}, None,
                             error="pickled embedding: needs --allow-unsafe-pickle")
    dims = {k: int(v.shape[-1]) for k, v in vectors.items()}
    first = next(iter(vectors.values()))
    return EmbeddingInfo(path.stem, str(path), _file_hash(path)[:12], int(first.shape[0]), dims, _kind(dims))


def list_embeddings(emb_dir: str | Path) -> list[EmbeddingInfo]:
    """Every embedding under *emb_dir* (recursively), sorted by name; unreadable files carry ``error``."""
    return [read_embedding_info(p) for p in _embedding_files(emb_dir)]


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
        info = read_embedding_info(path)
        if info.error:
            warnings.append(f"embedding {info.name} was ignored: {info.error}")
            continue
        vectors = read_embedding(info.filename)
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
