"""Inpainting masks: normalise, blur, crop to the masked region, fill, and paste the result back.

White (255) marks the area to repaint. The final image is ``original * (1 - a) +
generated * a`` with ``a`` the blurred mask doubled and clipped (A1111's overlay),
so every pixel outside the blurred mask is exactly the original pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps


def to_mask(image: Image.Image) -> Image.Image:
    """An L-mode mask from an upload or a painted layer: the alpha channel when the image has a
    meaningful one (a brush layer on transparency), else the luminance."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        lo, hi = alpha.getextrema()
        if lo < 255:
            return alpha
        return rgba.convert("L")
    return image.convert("L")


def prepare_mask(mask: Image.Image, size: tuple[int, int], invert: bool, blur: int) -> tuple[Image.Image, list[str]]:
    """Normalise *mask* to *size*; returns (mask, warnings). A mask of another size is resized (and said so)."""
    warnings = []
    mask = to_mask(mask)
    if mask.size != size:
        warnings.append(f"The mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; "
                        "the mask was resized to the image size.")
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask, warnings


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x1, y1, x2, y2) of the nonzero mask grown by *padding*, clipped to the image."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (max(0, x1 - padding), max(0, y1 - padding), min(mask.width, x2 + padding), min(mask.height, y2 + padding))


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int,
                    image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow *box* so its aspect ratio matches ``width:height`` (the processing size), staying in the image,
    so the crop is not distorted when scaled to the processing size."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    target = width / height
    if bw / bh < target:
        want = min(image_w, round(bh * target))
        grow = want - bw
        x1 -= grow // 2
        x2 += grow - grow // 2
        if x1 < 0:
            x2, x1 = x2 - x1, 0
        if x2 > image_w:
            x1, x2 = max(0, x1 - (x2 - image_w)), image_w
    else:
        want = min(image_h, round(bw / target))
        grow = want - bh
        y1 -= grow // 2
        y2 += grow - grow // 2
        if y1 < 0:
            y2, y1 = y2 - y1, 0
        if y2 > image_h:
            y1, y2 = max(0, y1 - (y2 - image_h)), image_h
    return x1, y1, x2, y2


def overlay_alpha(mask: Image.Image) -> Image.Image:
    """The blend weight of the generated image: the blurred mask doubled and clipped."""
    arr = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L")


@dataclass
class Overlay:
    """How to put a generated image back over the original."""
    original: Image.Image  # RGB, the size of the final result
    alpha: Image.Image  # L, same size: 255 where the generated image shows
    paste_box: tuple[int, int, int, int] | None = None  # only-masked: where the generated crop goes

    def apply(self, generated: Image.Image) -> Image.Image:
        base = self.original.copy()
        if self.paste_box is not None:
            x1, y1, x2, y2 = self.paste_box
            base.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = base
        elif generated.size != base.size:
            generated = generated.resize(base.size, Image.Resampling.LANCZOS)
        return Image.composite(generated.convert("RGB"), self.original, self.alpha)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": replace the masked area with colours pulled in from its surroundings.

    Normalised convolution at shrinking radii: blur the known pixels and a weight map alike, divide, and
    let each finer pass overwrite the coarser one where it has support. Pixels outside the mask are kept.
    """
    known = (np.asarray(mask.convert("L"), dtype=np.float32) < 128).astype(np.float32)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    result = rgb.mean(axis=(0, 1), keepdims=True).repeat(rgb.shape[0], 0).repeat(rgb.shape[1], 1)
    if known.sum() == 0:
        return Image.fromarray(result.astype(np.uint8), "RGB")
    weight_img = Image.fromarray((known * 255).astype(np.uint8), "L")
    for radius in (128, 32, 8, 2):
        w = np.asarray(weight_img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
        channels = []
        for c in range(3):
            layer = Image.fromarray(np.clip(rgb[..., c] * known, 0, 255).astype(np.uint8), "L")
            channels.append(np.asarray(layer.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32))
        blurred = np.stack(channels, axis=-1)
        support = w > 0.02
        result[support] = blurred[support] / w[support][:, None]
    result = np.where(known[..., None] > 0, rgb, result)
    return Image.fromarray(np.clip(result, 0, 255).astype(np.uint8), "RGB")
