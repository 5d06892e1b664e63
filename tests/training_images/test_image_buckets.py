"""Aspect-ratio buckets as kohya makes them: sizes in steps of 64 within the target area and side bounds,
every image to the nearest aspect ratio (transposes to transposed buckets), exact resize-and-center-crop,
and clear errors for sizes SD cannot use."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from modules.training.images.buckets import BucketError, BucketSpec, fit_to_bucket, parse_resolution


@pytest.mark.parametrize("resolution", [512, "512,768", 1024, 128])
def test_buckets_are_multiples_of_the_step_within_area_and_bounds(resolution):
    spec = BucketSpec(resolution)
    width, height = spec.resolution
    buckets = spec.resolutions()
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert spec.min_side <= w <= spec.max_side and spec.min_side <= h <= spec.max_side
        assert w * h <= width * height
        assert (h, w) in buckets   # transposes come in pairs
        # a bucket, or its transpose, is as tall as the area allows at its width (capped by max_side)
        def tallest(side):
            return min(spec.max_side, width * height // side // 64 * 64)
        assert w == h or h == tallest(w) or w == tallest(h)


def test_kohya_default_512_buckets():
    spec = BucketSpec(512)
    assert (spec.min_side, spec.max_side) == (256, 1024)   # sd-scripts' --min/max_bucket_reso defaults
    buckets = set(spec.resolutions())
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (768, 320),
            (256, 1024), (1024, 256)} <= buckets
    assert max(w * h for w, h in buckets) == 512 * 512


def test_every_size_goes_to_the_nearest_aspect_ratio_and_transposes_mirror():
    spec = BucketSpec(512)
    buckets = spec.resolutions()
    rng = np.random.default_rng(0)
    for width, height in rng.integers(16, 4000, size=(300, 2)):
        width, height = int(width), int(height)
        chosen = spec.assign(width, height)
        assert chosen in buckets
        error = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert error == min(abs(math.log(w / h) - math.log(width / height)) for w, h in buckets)
        assert spec.assign(height, width) == (chosen[1], chosen[0])
    assert spec.assign(448, 576) == (448, 576)
    assert spec.assign(1000, 1000) == (512, 512)
    assert spec.assign(4000, 100) == (1024, 256)   # beyond the widest bucket: the widest


def test_bucketing_off_is_one_bucket():
    spec = BucketSpec("512,768", enabled=False)
    assert spec.resolutions() == [(512, 768)]
    assert spec.assign(2000, 100) == (512, 768)


def test_fit_to_bucket_scales_to_cover_then_center_crops():
    # 300x100: blue | red | green thirds; a 64x64 bucket must keep the red middle only
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :100] = (0, 0, 255)
    pixels[:, 100:200] = (255, 0, 0)
    pixels[:, 200:] = (0, 255, 0)
    out = fit_to_bucket(Image.fromarray(pixels), (64, 64))
    assert out.size == (64, 64)
    inner = np.asarray(out)[:, 2:-2].astype(int)   # Lanczos rings at the seams
    assert inner[..., 0].min() > 240 and inner[..., 1:].max() < 15
    small = fit_to_bucket(Image.fromarray(pixels[:50, :60]), (128, 192))   # upscaled, portrait crop
    assert small.size == (128, 192)


@pytest.mark.parametrize("value, expected", [(512, (512, 512)), ("512", (512, 512)), ("512,768", (512, 768)),
                                             ("640x384", (640, 384)), ([768, 512], (768, 512))])
def test_resolution_forms(value, expected):
    assert parse_resolution(value) == expected


def test_resolution_not_a_multiple_of_64_is_a_clear_error():
    with pytest.raises(BucketError) as info:
        BucketSpec(500)
    assert "500 is not a multiple of 64" in str(info.value) and "448 or 512" in str(info.value)
    with pytest.raises(BucketError, match="768.*500|500"):
        BucketSpec("768,500")


def test_all_bucket_problems_at_once():
    with pytest.raises(BucketError) as info:
        BucketSpec(500, min_side=100, max_side=1000)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "500" in text and "min_side 100" in text and "max_side 1000" in text
    for bad, words in [("abc", "must be one size"), ((512, 512, 512), "must be one size"), (True, "must be one size")]:
        with pytest.raises(BucketError, match=words):
            BucketSpec(bad)
    with pytest.raises(BucketError, match="step 12"):
        BucketSpec(512, step=12)
    with pytest.raises(BucketError, match="enclose the resolution"):
        BucketSpec(512, min_side=640)
    with pytest.raises(BucketError, match="min_side 1024 is above max_side 512"):
        BucketSpec(512, min_side=1024, max_side=512)
