"""Small real image files for the image-dataset tests, written with Pillow into temporary folders."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Seeded random pixels of ``size`` (width, height): every image differs, so hashes and latents differ."""
    width, height = size
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def write_image(path: Path, size: tuple[int, int] = (64, 64), *, seed: int = 0, mode: str = "RGB", **save) -> Path:
    """A real image file (format from the suffix) of ``size``; ``save`` goes to ``Image.save`` (``exif=``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, seed, mode).save(path, **save)
    return path


def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """``target``: the first ``keep`` share of ``source``'s bytes (a download cut off half-way)."""
    data = source.read_bytes()
    target.write_bytes(data[:int(len(data) * keep)])
    return target


def image_bytes(size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    out = io.BytesIO()
    noise_image(size, seed).save(out, fmt)
    return out.getvalue()
