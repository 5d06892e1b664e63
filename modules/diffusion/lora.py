"""LoRA files from ``models/Lora``, applied for one generation job.

Why this shape: A1111 prompts carry ``<lora:name:te[:unet]>``; the weights must be
active only while that job runs, several at once, each with its own text-encoder
and UNet multipliers. diffusers (with PEFT) already reads both common layouts —
kohya (``lora_unet_…``, ``lora_te_…``, ``lora_te1_/lora_te2_`` with ``alpha``) and
diffusers/PEFT (``unet.…lora_A/lora_B``) — so each file is loaded as a named
adapter with ``load_lora_weights(..., adapter_name=)``, weighted with
``set_adapters`` per component, and everything is removed again with
``unload_lora_weights`` when the job ends. PEFT adds the LoRA as a side branch
(``base(x) + scale·B(A(x))``), so the base weights are never modified and removal
restores them exactly.

Infotext "Lora hashes" use A1111's short hash: the first 12 hex of the sha256 of
the file's tensor data (after the safetensors header), or ``sshs_model_hash``
from the metadata when kohya wrote one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from modules.safetensors_header import BrokenModelFile, read_header

log = logging.getLogger(__name__)

LORA_EXTS = (".safetensors",)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


@dataclass(frozen=True)
class LoraInfo:
    name: str  # file stem, as written in <lora:name:...>
    alias: str  # ss_output_name when present, else the name
    filename: str
    shorthash: str | None
    format: str | None  # "kohya" | "diffusers" | None when unreadable
    base: str | None  # "sd1" | "sd2" | "sdxl" from the keys/metadata, None when unknown
    metadata: dict = field(default_factory=dict, compare=False)
    error: str | None = None

    def api_item(self) -> dict:
        """An item of A1111's ``GET /sdapi/v1/loras``."""
        return {"name": self.name, "alias": self.alias, "path": self.filename, "metadata": self.metadata}


@dataclass
class AppliedLoras:
    """What ``apply_loras`` did: {name: short hash} for infotext, and warnings for the user."""
    hashes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash: sha256 of everything after the safetensors header (the "addnet" hash)."""
    path = Path(path)
    start = read_header(path).data_start
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _base_from(keys: list[str], metadata: dict) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2"):
        return "sd2"
    if any(k.startswith(("lora_te_", "lora_unet_down_blocks", "unet.", "text_encoder.")) for k in keys):
        return "sd1"
    return None


def read_lora_info(path: str | Path, *, compute_hash: bool = False, cache_dir: str | Path | None = None) -> LoraInfo:
    """Header-only facts about a LoRA file; the (slow) data hash only with *compute_hash*."""
    path = Path(path)
    name = path.stem
    try:
        header = read_header(path)
    except BrokenModelFile as exc:
        return LoraInfo(name, name, str(path), None, None, None, error=str(exc))
    metadata, keys = header.metadata, list(header.tensors)
    fmt = "kohya" if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys) else "diffusers"
    full = metadata.get("sshs_model_hash") or (cached_lora_hash(path, cache_dir) if compute_hash else None)
    short = full[:12] if full else None
    return LoraInfo(name, metadata.get("ss_output_name") or name, str(path), short, fmt,
                    _base_from(keys, metadata), metadata)


def cached_lora_hash(path: Path, cache_dir: str | Path | None) -> str:
    """:func:`lora_hash`, remembered by size and mtime in the model hash cache when *cache_dir* is given."""
    from modules.diffusion.checkpoints import cached_digest
    return cached_digest(path, cache_dir, lora_hash, tag="lora-data")


def _lora_files(lora_dir: str | Path) -> list[Path]:
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.rglob("*") if p.suffix in LORA_EXTS and p.is_file()), key=lambda p: p.stem.lower())


def list_loras(lora_dir: str | Path, *, compute_hashes: bool = False,
               cache_dir: str | Path | None = None) -> list[LoraInfo]:
    """Every LoRA under *lora_dir* (recursively), sorted by name; unreadable files carry ``error``.

    Only headers are read; ``shorthash`` is filled from kohya's ``sshs_model_hash`` metadata, or by
    hashing the file when *compute_hashes* (cached in *cache_dir*).
    """
    return [read_lora_info(p, compute_hash=compute_hashes, cache_dir=cache_dir) for p in _lora_files(lora_dir)]


def find_lora(infos: list[LoraInfo], name: str) -> LoraInfo | None:
    """By file stem first, then by alias (``ss_output_name``), as A1111 resolves ``<lora:name>``."""
    for key in (lambda i: i.name, lambda i: i.alias):
        for info in infos:
            if key(info) == name:
                return info
    return None


def _adapter_weights(pipe, adapter: str, te: float, unet: float) -> dict:
    """Per-component multipliers, only for the components this adapter really has layers in."""
    present = [component for component, names in pipe.get_list_adapters().items() if adapter in names]
    return {component: (unet if component == "unet" else te) for component in present}


@contextlib.contextmanager
def apply_loras(sd, calls: list, lora_dir: str | Path, *,
                cache_dir: str | Path | None = None) -> Iterator[AppliedLoras]:
    """Activate the LoRAs named by *calls* (``ExtraNetworkParams`` of ``<lora:…>`` tags) for a block.

    Unknown, unreadable or incompatible LoRAs become warnings and are skipped; the generation
    goes on. On exit every adapter is removed and the pipeline is as before. Only the LoRAs used
    are hashed (cached in *cache_dir* when given).
    """
    from safetensors import SafetensorError
    pipe = sd.pipe
    applied = AppliedLoras()
    infos = list_loras(lora_dir)
    weights = []
    attempted = False  # a load that failed half-way may still have injected layers: clean up then too
    try:
        for i, call in enumerate(calls):
            name = call.name
            try:
                te, unet = call.lora_weights()
            except ValueError as exc:
                applied.warnings.append(str(exc))
                continue
            info = find_lora(infos, name)
            if info is None:
                applied.warnings.append(f"LoRA '{name}' not found in {lora_dir}; it was ignored")
                continue
            if info.error:
                applied.warnings.append(f"LoRA '{name}' is broken: {info.error}; it was ignored")
                continue
            if info.base and info.base != sd.kind and not (info.base == "sd1" and sd.kind == "sd2"):
                applied.warnings.append(f"LoRA '{name}' was made for {info.base}, not this {sd.kind} model; "
                                        "it was ignored")
                continue
            adapter = f"lora{i}_{''.join(c if c.isalnum() else '_' for c in name)}"
            attempted = True
            try:
                pipe.load_lora_weights(info.filename, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, TypeError, IndexError, OSError, SafetensorError) as exc:
                applied.warnings.append(f"LoRA '{name}' could not be applied to this model ({exc}); it was ignored")
                log.warning("LoRA %s failed to load: %s", name, exc)
                continue
            applied.adapters.append(adapter)
            weights.append(_adapter_weights(pipe, adapter, te, unet))
            applied.hashes[name] = info.shorthash or cached_lora_hash(Path(info.filename), cache_dir)[:12]
        if applied.adapters:
            pipe.set_adapters(applied.adapters, adapter_weights=weights)
        for warning in applied.warnings:
            log.warning(warning)
        yield applied
    finally:
        if attempted:
            pipe.unload_lora_weights()
