"""Latent caching: encode each training image through the VAE once, keep the latent in memory or on disk.

Why: with the VAE frozen, the latent of an image in its bucket never changes, and encoding costs about as
much as a UNet step at 512 px (kohya's ``--cache_latents`` / ``--cache_latents_to_disk``).

Each latent is stored under a key that hashes everything it depends on: the image file's bytes, its
bucket (so a new resolution or bucket setting re-encodes), the resize-and-crop method, and the encoder's
fingerprint (:func:`vae_fingerprint`: the VAE's weights and config, plus whatever the caller's ``encode``
does differently, such as sampling or scaling). A change to any of them is a different key and so a miss;
nothing stale is ever read. On disk a latent is ``<directory>/<key>.safetensors`` (written to a temporary
file, then renamed, so an interrupted run or two processes never leave a half-written one); files of old
keys stay until :meth:`LatentCache.prune`, and a damaged file is encoded again.

Encoding goes through the caller's ``encode(pixels) -> latents``: ``pixels`` is ``(B, 3, H, W)`` float32
in [-1, 1] on the CPU, the result ``(B, C, H/f, W/f)`` on any device; this module never sees the trainer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from modules.training.images.dataset import ImageDataset, ImageRecord

FORMAT = "atelier-latent-v1"
#: names the pixel pipeline (to_rgb + fit_to_bucket); change it when that pipeline changes what it makes
PIXEL_PIPELINE = "rgb-white-lanczos-center-crop-v1"
#: a hidden folder inside the dataset, which the dataset scan ignores (kohya writes .npz beside each image)
DATASET_CACHE_FOLDER = ".atelier-latents"
_KEY_FILE = re.compile(r"^[0-9a-f]{64}\.safetensors$")


class LatentCacheError(ValueError):
    """An encoder that breaks the ``encode(pixels) -> latents`` contract; the message says how."""


#: state-dict prefixes of the weights only decoding uses (diffusers' AutoencoderKL and AutoencoderTiny)
DECODE_ONLY = ("decoder.", "post_quant_conv.")


def vae_fingerprint(vae, extra: str = "") -> str:
    """A hash of a VAE's class, config and every weight encoding uses (with dtype and shape), plus ``extra``.

    Config keys starting with ``_`` (diffusers' ``_name_or_path``, ``_diffusers_version``) are left out:
    the same weights loaded from another folder encode the same. The decode-only weights (``decoder.*``,
    ``post_quant_conv.*``) are left out too: they cannot change a latent, and reading them would page the
    whole decoder of a memory-mapped checkpoint into RAM, which training never touches otherwise (about
    200 MB of peak memory for SD's VAE, measured with benchmarks/train_sd.py). Pass in ``extra`` what
    ``encode`` adds (``"mean*0.18215"``, ``"sample:seed=0"``). About 0.2 s for SD's 84M-parameter VAE.
    """
    import torch

    digest = hashlib.sha256(f"{type(vae).__module__}.{type(vae).__qualname__}|{extra}".encode())
    config = getattr(vae, "config", None)
    if config is not None:
        plain = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(DECODE_ONLY):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:32]


def dataset_cache_dir(dataset_root: str | Path) -> Path:
    """The on-disk cache folder that lives with a dataset (shared by every run that trains on it)."""
    return Path(dataset_root) / DATASET_CACHE_FOLDER


class LatentCache:
    """Latents by image, in memory (``directory=None``) or as files in ``directory``.

    Args:
        encode: ``encode(pixels) -> latents`` (see the module docstring); called only on misses.
        fingerprint: identifies the encoder, e.g. :func:`vae_fingerprint` of the VAE.
        directory: on-disk cache folder (created when needed), or None to keep latents in memory.
        encode_batch: images per ``encode`` call when filling misses (one bucket at a time).
    ``hits``, ``misses`` and ``repaired`` (damaged files encoded again) count what happened.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], fingerprint: str, *,
                 directory: str | Path | None = None, encode_batch: int = 8):
        if not callable(encode):
            raise LatentCacheError(f"encode must be a function pixels -> latents, got {type(encode).__name__}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise LatentCacheError("fingerprint must be a non-empty string identifying the encoder "
                                   "(use vae_fingerprint(vae))")
        if isinstance(encode_batch, bool) or not isinstance(encode_batch, int) or encode_batch < 1:
            raise LatentCacheError(f"encode_batch={encode_batch!r} must be a positive whole number")
        self.encode, self.fingerprint, self.encode_batch = encode, fingerprint, encode_batch
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = self.repaired = 0

    def key(self, record: ImageRecord) -> str:
        """The cache key of ``record``'s latent (see the module docstring for what goes in)."""
        text = json.dumps([FORMAT, record.sha256, list(record.bucket), PIXEL_PIPELINE, self.fingerprint])
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------------------------ reading
    def latents(self, dataset: ImageDataset, indices: list[int]) -> torch.Tensor:
        """``(len(indices), C, h, w)`` latents of images ``indices`` (one bucket), encoding the missing ones."""
        import torch

        keys = [self.key(dataset.records[i]) for i in indices]
        found = {}
        for key in dict.fromkeys(keys):
            latent = self._get(key)
            if latent is not None:
                found[key] = latent
        missing = list(dict.fromkeys(i for i, k in zip(indices, keys) if k not in found))
        self.hits += sum(1 for k in keys if k in found)
        self.misses += sum(1 for k in keys if k not in found)
        for start in range(0, len(missing), self.encode_batch):
            chunk = missing[start:start + self.encode_batch]
            for index, latent in zip(chunk, self._encode(dataset, chunk)):
                key = self.key(dataset.records[index])
                self._put(key, latent, dataset.records[index])
                found[key] = latent
        return torch.stack([found[k] for k in keys])

    def prepare(self, dataset: ImageDataset, progress: Callable[[int, int], None] | None = None, *,
                rank: int = 0, world_size: int = 1) -> int:
        """Encode every image of ``dataset`` not cached yet (before training, as kohya does); returns how many.

        ``progress(done, total)`` is called after each ``encode`` call. With several processes and a disk
        cache, each rank encodes its share (images ``rank``, ``rank + world_size``, ...): call it on every
        rank, then wait at a barrier, and every rank finds every latent on disk.
        """
        todo = {bucket: [i for i in indices if i % world_size == rank and not self._has(self.key(dataset.records[i]))]
                for bucket, indices in dataset.buckets.items()}
        total, done = sum(len(v) for v in todo.values()), 0
        for indices in todo.values():
            for start in range(0, len(indices), self.encode_batch):
                chunk = indices[start:start + self.encode_batch]
                for index, latent in zip(chunk, self._encode(dataset, chunk)):
                    self._put(self.key(dataset.records[index]), latent, dataset.records[index])
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return total

    def prune(self, dataset: ImageDataset) -> list[Path]:
        """Delete cache files in ``directory`` that no image of ``dataset`` uses now (old keys); returns them.

        Only files named like this cache's own (``<64 hex>.safetensors``) are touched. In memory: drops
        the entries of other keys.
        """
        keep = {self.key(r) for r in dataset.records}
        for key in [k for k in self._memory if k not in keep]:
            del self._memory[key]
        removed = []
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if _KEY_FILE.match(path.name) and path.name[:64] not in keep:
                    path.unlink()
                    removed.append(path)
        return removed

    # ---------------------------------------------------------------------------------- internals
    def _encode(self, dataset: ImageDataset, indices: list[int]) -> list[torch.Tensor]:
        import torch

        pixels = dataset.pixels(indices)
        with torch.no_grad():
            latents = self.encode(pixels)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[0] != len(indices):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise LatentCacheError(f"encode returned {shape} for {len(indices)} images of shape "
                                   f"{tuple(pixels.shape)}; it must return a (B, C, h, w) tensor with B = "
                                   f"{len(indices)} (e.g. vae.encode(x).latent_dist.mean)")
        if not torch.isfinite(latents).all():
            raise LatentCacheError(f"encode returned NaN or infinite latents for {dataset.records[indices[0]].path} "
                                   "(and its batch); run the VAE in fp32 (SD VAEs overflow in fp16)")
        return list(latents.detach().to("cpu").contiguous().unbind(0))

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _has(self, key: str) -> bool:
        # on disk only the file's presence: a damaged one is found, and encoded again, when it is read
        return key in self._memory if self.directory is None else self._path(key).is_file()

    def _get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    raise ValueError("key mismatch")
                return handle.get_tensor("latent")
        except (OSError, ValueError, KeyError, SafetensorError):
            self.repaired += 1
            return None

    def _put(self, key: str, latent: torch.Tensor, record: ImageRecord) -> None:
        if self.directory is None:
            self._memory[key] = latent
            return
        from safetensors.torch import save_file
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{key}.{os.getpid()}.tmp"
        save_file({"latent": latent.contiguous()}, str(tmp),
                  metadata={"format": FORMAT, "key": key, "image": record.relative,
                            "bucket": f"{record.bucket[0]}x{record.bucket[1]}", "fingerprint": self.fingerprint})
        os.replace(tmp, self._path(key))
