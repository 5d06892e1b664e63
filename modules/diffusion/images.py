"""Image utilities for img2img: A1111's resize modes and PIL <-> tensor conversion."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: A1111's resize modes, by index (the API's ``resize_mode``).
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")

#: A1111 hires upscalers that work in latent space, with their torch interpolation settings.
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: Upscalers that resize the decoded image with PIL before re-encoding.
PIL_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                 "Nearest": Image.Resampling.NEAREST, "Bicubic": Image.Resampling.BICUBIC}
HR_UPSCALERS = tuple(LATENT_UPSCALE_MODES) + tuple(PIL_UPSCALERS)


def resize_mode_index(mode: int | str) -> int:
    if isinstance(mode, str) and mode in RESIZE_MODES:
        return RESIZE_MODES.index(mode)
    return int(mode)


def resize_image(mode: int | str, image: Image.Image, width: int, height: int,
                 resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Fit *image* to ``width x height`` the way A1111's resize modes do.

    0 Just resize: stretch. 1 Crop and resize: scale to cover, centre-crop. 2 Resize and fill: scale to fit,
    then extend the borders by stretching the outermost rows/columns into the gap. 3 (latent upscale) is
    resized in latent space by the caller; here it behaves like 0.
    """
    mode = resize_mode_index(mode)
    if mode in (0, 3):
        return image.resize((width, height), resample)
    src_ratio = image.width / image.height
    dst_ratio = width / height
    if mode == 1:
        if dst_ratio > src_ratio:
            w, h = width, max(1, round(width / src_ratio))
        else:
            w, h = max(1, round(height * src_ratio)), height
        scaled = image.resize((w, h), resample)
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    if mode == 2:
        if dst_ratio < src_ratio:
            w, h = width, max(1, round(width / src_ratio))
        else:
            w, h = max(1, round(height * src_ratio)), height
        scaled = image.resize((w, h), resample)
        out = Image.new(image.mode, (width, height))
        left, top = (width - w) // 2, (height - h) // 2
        out.paste(scaled, (left, top))
        if top > 0:  # stretch the first and last rows into the bands above and below
            out.paste(scaled.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
            bottom = height - top - h
            if bottom > 0:
                out.paste(scaled.crop((0, h - 1, w, h)).resize((w, bottom)), (left, top + h))
        if left > 0:
            out.paste(scaled.crop((0, 0, 1, h)).resize((left, h)), (0, top))
            right = width - left - w
            if right > 0:
                out.paste(scaled.crop((w - 1, 0, w, h)).resize((right, h)), (left + w, top))
        return out
    raise ValueError(f"resize_mode {mode!r} is not one of 0..3 ({', '.join(RESIZE_MODES)})")


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images (same size) to a ``(B, 3, H, W)`` float tensor in [-1, 1]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def round_to_8(value: int) -> int:
    return max(8, int(value) // 8 * 8)
