"""Aspect-ratio buckets, as kohya's sd-scripts makes them: a set of (width, height) sizes of about the same
area, one of which every training image is resized and center-cropped into.

Why buckets: a batch must be one tensor, so its images must share a size; cropping every image to a square
cuts off the heads and feet of portraits. kohya's answer (``--enable_bucket``), which this follows:

- the target *area* is the resolution's (512 -> 512x512 pixels; ``"512,768"`` -> 512x768);
- sides run from ``min_side`` to ``max_side`` in steps of ``step`` (64): for each width ``w`` the bucket is
  ``(w, h)`` with ``h`` the largest multiple of ``step`` that keeps ``w*h`` within the area (capped at
  ``max_side``), plus its transpose ``(h, w)`` and the square; a bucket with a side below ``min_side`` is dropped;
- an image goes to the bucket nearest its aspect ratio; it is scaled until it covers the bucket (up or down)
  and the overhang is cropped evenly from both sides (``ImageOps.fit``).

One difference from kohya: "nearest aspect ratio" is measured as ``|log(w/h) - log(bw/bh)|`` rather than
``|w/h - bw/bh|``, so that an image and its transpose always land in transposed buckets (with the plain
difference, portrait ratios, squeezed into 0..1, are matched more coarsely than landscape ones).

``enabled=False`` is kohya without ``--enable_bucket``: one bucket, the resolution itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: the VAE shrinks 8x and the SD UNet halves three more times: sides must divide by 64 (kohya's default step)
DEFAULT_STEP = 64


class BucketError(ValueError):
    """Bad bucket settings; ``problems`` lists each one (a config validator can collect them)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("Invalid bucket settings: " + "; ".join(self.problems))


def parse_resolution(value) -> tuple[int, int]:
    """``512``, ``"512"``, ``"512,768"``, ``"512x768"`` or ``[512, 768]`` -> ``(width, height)``.

    Raises :class:`BucketError` naming the value when it is none of these.
    """
    parts = value
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace("X", ",").split(",")]
        try:
            parts = [int(p.strip()) for p in parts]
        except ValueError:
            parts = None
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        parts = list(value)
    else:
        parts = None
    if not parts or len(parts) > 2:
        raise BucketError([f"resolution {value!r} must be one size (512) or width,height (\"512,768\")"])
    width, height = parts[0], parts[-1]
    return int(width), int(height)


@dataclass(frozen=True)
class BucketSpec:
    """Bucket settings. ``resolution`` is the target size (its area is every bucket's budget); ``min_side``
    and ``max_side`` bound bucket sides (None: half and twice the resolution's shorter/longer side, rounded to
    the step: kohya's 256..1024 for 512); ``step`` is the side granularity (64)."""

    resolution: tuple[int, int] | int | str = 512
    min_side: int | None = None
    max_side: int | None = None
    step: int = DEFAULT_STEP
    enabled: bool = True

    def __post_init__(self):
        try:
            resolution = parse_resolution(self.resolution)
        except BucketError as exc:
            raise BucketError(exc.problems + self._side_problems(None)) from None
        object.__setattr__(self, "resolution", resolution)
        problems = self._side_problems(resolution)
        if problems:
            raise BucketError(problems)
        if self.min_side is None:
            object.__setattr__(self, "min_side", max(self.step, min(resolution) // 2 // self.step * self.step))
        if self.max_side is None:
            object.__setattr__(self, "max_side", max(resolution) * 2)
        if self.min_side > min(resolution) or self.max_side < max(resolution):
            raise BucketError([(f"min_side {self.min_side} and max_side {self.max_side} must enclose the resolution "
                                f"{resolution[0]}x{resolution[1]}: min_side <= {min(resolution)} <= "
                                f"{max(resolution)} <= max_side")])

    def _side_problems(self, resolution) -> list[str]:
        problems = []
        step = self.step
        if isinstance(step, bool) or not isinstance(step, int) or step < 8 or step % 8:
            return [f"bucket step {step!r} must be a positive multiple of 8 (the VAE's factor); kohya and SD use 64"]
        if resolution is not None:
            for side in sorted(set(resolution)):
                if side < step or side % step:
                    lower, upper = max(step, side // step * step), (side // step + 1) * step
                    problems.append(f"resolution {side} is not a multiple of {step}: SD needs image sides in "
                                    f"steps of {step} (the UNet halves the latent three times); use {lower} or {upper}")
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < step or value % step:
                problems.append(f"{name} {value!r} must be a positive multiple of {step}")
        if not problems and self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
            problems.append(f"min_side {self.min_side} is above max_side {self.max_side}")
        return problems

    # --------------------------------------------------------------------------------- the buckets
    def resolutions(self) -> list[tuple[int, int]]:
        """Every bucket ``(width, height)``, sorted; each side a multiple of ``step``, area <= the target's."""
        width, height = self.resolution
        if not self.enabled:
            return [(width, height)]
        area, step = width * height, self.step
        square = math.isqrt(area) // step * step
        sizes = {(square, square)} if self.min_side <= square <= self.max_side else set()
        for w in range(self.min_side, self.max_side + 1, step):
            h = min(self.max_side, area // w // step * step)
            if h >= self.min_side:
                sizes.update({(w, h), (h, w)})
        return sorted(sizes)

    def assign(self, width: int, height: int, resolutions: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """The bucket for an image of ``width`` x ``height``: its own size when that is a bucket, else the one
        nearest in (log) aspect ratio; ties go to the first in sorted order."""
        buckets = resolutions if resolutions is not None else self.resolutions()
        if (width, height) in buckets:
            return width, height
        ratio = math.log(width / height)
        return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))

    def describe(self) -> dict:
        """Plain data for metadata and fingerprints (kohya's ``ss_resolution`` / ``ss_bucket_*`` style)."""
        return {"resolution": list(self.resolution), "min_side": self.min_side, "max_side": self.max_side,
                "step": self.step, "enabled": self.enabled}


def fit_to_bucket(image, bucket: tuple[int, int]):
    """``image`` (PIL, RGB) scaled to cover ``bucket`` and center-cropped to exactly it (Lanczos).

    ``ImageOps.fit`` crops the source to the bucket's aspect ratio first, then resizes, so no pixel is
    resampled twice and the result is exactly ``bucket`` with no rounding slack.
    """
    from PIL import Image, ImageOps

    if image.size == tuple(bucket):
        return image
    return ImageOps.fit(image, tuple(bucket), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def upscale_factor(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """How much ``fit_to_bucket`` enlarges an image of ``size`` (above 1: it is upscaled, and blurrier)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])
