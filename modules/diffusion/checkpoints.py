"""Finding, naming, hashing and classifying Stable Diffusion checkpoints and VAEs.

Why this shape: A1111 users expect their ``models/Stable-diffusion`` folder to
list as ``name [shorthash]`` (sha256 of the whole file, first 10 hex), and infotext
and the API identify models by that title or hash. Hashing a multi-GB file takes
a while, so hashes are cached by size and mtime in a JSON file. Listing reads
only the safetensors *header* (a few KB) to detect SD1/SD2/SDXL and 9-channel
inpainting, so a broken or truncated file shows up as a listed model with an
``error`` instead of crashing the app.

Layout understood (relative to the checkpoint folder, searched recursively):

* ``X.safetensors`` — a single-file LDM checkpoint. ``X.ckpt`` is listed too, but
  loads only with ``--allow-unsafe-pickle``.
* ``X/`` beside ``X.safetensors`` — that file's *sidecar* (tokenizer, configs; see
  ``loading.py``); never listed as a model itself.
* ``Y/model_index.json`` with weights under ``Y/unet/`` — a diffusers folder.
* ``tokenizer/`` and ``tokenizer_2/`` — shared tokenizer files; never listed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from modules.safetensors_header import BrokenModelFile, check_file, read_header

log = logging.getLogger(__name__)

SINGLE_FILE_EXTS = (".safetensors", ".ckpt")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXTS = (".safetensors", ".bin")
SHARED_TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
HASH_CACHE_FILE = "model_hashes.json"
_CHUNK = 1024 * 1024

# Probe keys (LDM layout), as A1111's sd_models_config and diffusers' infer_diffusers_model_type use them.
_SDXL_KEYS = ("conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.1.model.positional_embedding")
_SD2_KEY = "cond_stage_model.model.token_embedding.weight"
_SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as listed: A1111's ``name`` (path relative to the folder) and ``title``."""
    name: str
    title: str
    filename: str
    shorthash: str | None
    sha256: str | None
    kind: str | None  # "sd1" | "sd2" | "sdxl" | None when unknown
    is_inpaint: bool
    format: str  # "diffusers" | "single-file"
    error: str | None = None

    @property
    def model_name(self) -> str:
        """The name without extension, as A1111's ``/sdapi/v1/sd-models`` ``model_name``."""
        return os.path.splitext(self.name)[0] if self.format == "single-file" else self.name

    @property
    def is_pickle(self) -> bool:
        return self.filename.lower().endswith(PICKLE_EXTS)


@dataclass(frozen=True)
class VaeInfo:
    """One VAE in ``models/VAE``: a single file (LDM keys) or a diffusers folder with ``config.json``."""
    name: str
    filename: str
    shorthash: str | None
    sha256: str | None
    format: str
    error: str | None = None

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name)[0] if self.format == "single-file" else self.name


# -- hashing ---------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_EXTS)


def _signature(path: Path) -> list:
    """What must be unchanged for a cached hash to stay valid: sizes and mtimes."""
    files = [path] if path.is_file() else _weight_files(path)
    return [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _sha256(path: Path) -> str:
    """sha256 of a file (A1111's model hash); for a diffusers folder, of its weight files in sorted order."""
    digest = hashlib.sha256()
    for f in ([path] if path.is_file() else _weight_files(path)):
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable hash cache %s: %s", cache_file, exc)
        return {}


def _cache_key(path: Path, tag: str) -> str:
    return f"{path}#{tag}" if tag else str(path)


def cached_hash(path: str | os.PathLike, cache_dir: str | os.PathLike | None, *, tag: str = "") -> str | None:
    """The cached digest of *path* (under *tag*) if the file's size and mtime still match."""
    if cache_dir is None:
        return None
    path = Path(path).resolve()
    entry = _read_cache(Path(cache_dir) / HASH_CACHE_FILE).get(_cache_key(path, tag))
    if entry and entry.get("signature") == _signature(path):
        return entry["sha256"]
    return None


def cached_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None,
                  compute: Callable[[Path], str], *, tag: str = "") -> str:
    """``compute(path)``, remembered in ``cache_dir/model_hashes.json`` by size and mtime.

    *tag* keeps different digests of one file apart (e.g. LoRA data hashes).
    """
    path = Path(path).resolve()
    known = cached_hash(path, cache_dir, tag=tag)
    if known:
        return known
    digest = compute(path)
    if cache_dir is not None:
        _remember(Path(cache_dir) / HASH_CACHE_FILE, _cache_key(path, tag),
                  {"sha256": digest, "signature": _signature(path)})
    return digest


def _remember(cache_file: Path, key: str, entry: dict) -> None:
    """Add *entry* to the JSON cache file atomically. Every writer (any thread, any process) writes its own
    temporary file and renames it into place, so a concurrent reader sees the old or the new file and two
    writers never rename each other's file away; at worst one entry is lost and computed again later."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent)
    try:
        cache = _read_cache(cache_file)  # read as late as possible: keeps entries other writers just added
        cache[key] = entry
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(cache, out, indent=1)
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_hash(path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> str:
    """Full sha256 of a checkpoint (A1111's model hash), cached by size and mtime."""
    return cached_digest(path, cache_dir, lambda p: _sha256(p))


# -- type detection ------------------------------------------------------------------------------------
def detect_kind(shapes: Mapping[str, Sequence[int]] | Iterable[str]) -> tuple[str | None, bool]:
    """Model type from LDM state-dict keys: ("sd1"|"sd2"|"sdxl"|None, is 9-channel inpainting).

    *shapes* maps key → shape; a plain iterable of keys also works (inpainting then can't be seen).
    """
    if not isinstance(shapes, Mapping):
        shapes = {k: () for k in shapes}
    if any(k in shapes for k in _SDXL_KEYS):
        kind = "sdxl"
    elif _SD2_KEY in shapes or any(k.startswith("cond_stage_model.model.") for k in shapes):
        kind = "sd2"
    elif _SD1_KEY in shapes or any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        kind = "sd1"
    else:
        kind = None
    in_shape = tuple(shapes.get(_UNET_IN_KEY, ()))
    return kind, len(in_shape) > 1 and in_shape[1] == 9


def _diffusers_kind(folder: Path) -> tuple[str | None, bool]:
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    unet_cfg = folder / "unet" / "config.json"
    inpaint = unet_cfg.is_file() and json.loads(unet_cfg.read_text()).get("in_channels") == 9
    if "XL" in cls:
        return "sdxl", inpaint
    te_cfg = folder / "text_encoder" / "config.json"
    if te_cfg.is_file() and json.loads(te_cfg.read_text()).get("hidden_size") == 1024:
        return "sd2", inpaint
    return "sd1", inpaint


def is_diffusers_folder(folder: Path) -> bool:
    unet = folder / "unet"
    return (folder / "model_index.json").is_file() and unet.is_dir() and any(
        p.suffix in WEIGHT_EXTS for p in unet.iterdir())


# -- listing ------------------------------------------------------------------------------------------
def _title(name: str, shorthash: str | None) -> str:
    return f"{name} [{shorthash}]" if shorthash else name


def _make_info(path: Path, root: Path, cache_dir, compute_hashes: bool) -> CheckpointInfo:
    name = path.relative_to(root).as_posix()
    fmt = "diffusers" if path.is_dir() else "single-file"
    error, kind, inpaint = None, None, False
    try:
        if fmt == "diffusers":
            for weights in _weight_files(path):
                if weights.suffix == ".safetensors":
                    check_file(weights)
            kind, inpaint = _diffusers_kind(path)
        elif path.suffix == ".safetensors":
            kind, inpaint = detect_kind(read_header(path).shapes())
            if kind is None:
                error = f"{path.name}: no Stable Diffusion text encoder keys found; not an SD1/SD2/SDXL checkpoint"
    except BrokenModelFile as exc:
        error = f"{path.name if exc.path == path else exc.path.relative_to(root).as_posix()}: {exc.reason}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # a damaged model_index/config.json
        error = f"{name}: unreadable configuration ({type(exc).__name__}: {exc})"
    if error:
        log.warning("checkpoint %s is not usable: %s", name, error)
    sha = None
    if error is None:
        sha = model_hash(path, cache_dir) if compute_hashes else cached_hash(path, cache_dir)
    short = sha[:10] if sha else None
    return CheckpointInfo(name=name, title=_title(name, short), filename=str(path), shorthash=short, sha256=sha,
                          kind=kind, is_inpaint=inpaint, format=fmt, error=error)


def _walk(root: Path, is_model_dir, file_exts: tuple[str, ...]) -> list[Path]:
    """Model files and model folders under *root*, skipping sidecars and shared tokenizer folders."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    seen: set[str] = set()  # real paths walked: symlinked folders are followed, but never in a loop
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        seen.add(os.path.realpath(here))
        stems = {os.path.splitext(f)[0] for f in filenames if f.lower().endswith(file_exts)}
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or d in stems or (here == root and d in SHARED_TOKENIZER_DIRS):
                continue
            if os.path.realpath(sub) in seen:
                continue
            if is_model_dir(sub):
                found.append(sub)
            else:
                keep.append(d)
        dirnames[:] = keep
        found.extend(here / f for f in sorted(filenames) if f.lower().endswith(file_exts))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix().lower())


def list_checkpoints(ckpt_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                     compute_hashes: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint under *ckpt_dir*, sorted by name; broken ones carry ``error``.

    With ``compute_hashes=False`` only cached hashes are used (fast startup listing; titles of
    never-hashed files are then the bare name until :func:`with_hash` is called).
    """
    root = Path(ckpt_dir)
    return [_make_info(p, root, cache_dir, compute_hashes) for p in _walk(root, is_diffusers_folder, SINGLE_FILE_EXTS)]


def with_hash(info: CheckpointInfo, cache_dir: str | os.PathLike | None) -> CheckpointInfo:
    """*info* with its sha256 and title filled in (computing and caching the hash if needed)."""
    if info.sha256 or info.error:
        return info
    sha = model_hash(info.filename, cache_dir)
    return replace(info, sha256=sha, shorthash=sha[:10], title=_title(info.name, sha[:10]))


def looks_like_hash(query: str) -> bool:
    """True for a (short) sha256 as A1111 writes it, ``abcdef1234`` or ``[abcdef1234]``: the only queries that
    hashing the checkpoints could answer."""
    hexq = query.strip().strip("[]").lower()
    return len(hexq) >= 8 and all(c in "0123456789abcdef" for c in hexq)


def find_checkpoint(infos: Iterable[CheckpointInfo], query: str | None) -> CheckpointInfo | None:
    """Look a checkpoint up as A1111 does: by title, name, name without extension, or (short) hash."""
    if not query:
        return None
    infos = list(infos)
    q = query.strip()
    for key in (lambda i: i.title, lambda i: i.name, lambda i: i.model_name,
                lambda i: os.path.basename(i.model_name)):
        for info in infos:
            if key(info) == q:
                return info
    bare = q.split(" [")[0] if q.endswith("]") else q  # "name [otherhash]": the name still identifies it
    for info in infos:
        if bare in (info.name, info.model_name):
            return info
    if looks_like_hash(q):
        hexq = q.strip("[]").lower()
        for info in infos:
            if info.sha256 and info.sha256.startswith(hexq):
                return info
    return None


def _is_vae_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(p.suffix in WEIGHT_EXTS for p in folder.iterdir())


def list_vaes(vae_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
              compute_hashes: bool = True) -> list[VaeInfo]:
    """VAEs under *vae_dir* (``.safetensors``/``.pt``/``.ckpt`` files and diffusers folders)."""
    root = Path(vae_dir)
    out = []
    for path in _walk(root, _is_vae_folder, (".safetensors", ".pt", ".ckpt")):
        error = None
        try:
            if path.suffix == ".safetensors":
                if not any("decoder." in k for k in read_header(path).tensors):
                    error = f"{path.name}: no VAE decoder weights found"
            elif path.is_dir():
                for weights in _weight_files(path):
                    if weights.suffix == ".safetensors":
                        check_file(weights)
        except BrokenModelFile as exc:
            error = str(exc)
        if error:
            log.warning("VAE %s is not usable: %s", path.relative_to(root).as_posix(), error)
        sha = None
        if error is None:
            sha = model_hash(path, cache_dir) if compute_hashes else cached_hash(path, cache_dir)
        out.append(VaeInfo(name=path.relative_to(root).as_posix(), filename=str(path),
                           shorthash=sha[:10] if sha else None, sha256=sha,
                           format="diffusers" if path.is_dir() else "single-file", error=error))
    return out


def find_vae(infos: Iterable[VaeInfo], query: str | None) -> VaeInfo | None:
    """A VAE by name, name without extension, or hash prefix; None for "", "None" or "Automatic"."""
    if not query or query in ("None", "Automatic"):
        return None
    for info in infos:
        if query in (info.name, info.model_name, info.shorthash, info.sha256):
            return info
    return None
