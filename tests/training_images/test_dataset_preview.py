"""The dataset preview for the Train tab: counts, concepts, buckets with their images, skipped files with
reasons, small-bucket warnings, samples from every concept, an error instead of an exception for an empty
folder, and nothing but plain JSON-ready data."""
from __future__ import annotations

import json

from image_files import write_image

from modules.training.images.buckets import BucketSpec
from modules.training.images.preview import preview_dataset

SPEC = BucketSpec(128)


def test_preview_contents(tmp_path):
    for n in range(3):
        write_image(tmp_path / "10_sks dog" / f"{n}.png", (64, 64), seed=n)
    (tmp_path / "10_sks dog" / "0.txt").write_text("sks dog, on grass")
    write_image(tmp_path / "10_sks dog" / "wide.png", (256, 64), seed=9)
    write_image(tmp_path / "2_dog" / "a.jpg", (64, 64), seed=20)
    (tmp_path / "2_dog" / "broken.png").write_text("not an image")
    write_image(tmp_path / "2_dog" / "dot.png", (1, 1))
    preview = preview_dataset(tmp_path, buckets=SPEC, batch_size=4, samples=3)
    data = json.loads(json.dumps(preview.to_dict()))                       # plain data only
    assert data["error"] is None and data["root"] == str(tmp_path)
    assert data["image_count"] == 5 and data["images_per_epoch"] == 4 * 10 + 2
    assert data["concepts"] == [
        {"folder": "10_sks dog", "name": "sks dog", "repeats": 10, "images": 4, "captioned": 1},
        {"folder": "2_dog", "name": "dog", "repeats": 2, "images": 1, "captioned": 0}]
    assert [(b["width"], b["height"], b["count"], b["samples"]) for b in data["buckets"]] == [
        (128, 128, 4, 32), (256, 64, 1, 10)]
    assert sum(b["count"] for b in data["buckets"]) == data["image_count"]
    assert data["buckets"][1]["images"] == ["10_sks dog/wide.png"]
    assert {s["path"]: s["reason"].split(" (")[0] for s in data["skipped"]} == {
        "2_dog/broken.png": "is not an image Pillow can read", "2_dog/dot.png": "is too small"}
    assert data["warnings"] == []                                            # 10 samples >= batch of 4
    assert [(s["caption"], s["caption_source"]) for s in data["samples"]] == [
        ("sks dog, on grass", "10_sks dog/0.txt"), ("dog", "folder name"), ("sks dog", "folder name")]
    assert data["samples"][0]["path"] == str(tmp_path / "10_sks dog" / "0.png")


def test_small_bucket_warning_names_the_bucket(tmp_path):
    for n in range(4):
        write_image(tmp_path / "1_x" / f"{n}.png", (64, 64), seed=n)
    write_image(tmp_path / "1_x" / "tall.png", (64, 256))
    preview = preview_dataset(tmp_path, buckets=SPEC, batch_size=4)
    assert [(w["path"], "fewer than the batch of 4" in w["reason"]) for w in preview.warnings] == [
        ("bucket 64x256", True)]


def test_preview_of_an_empty_folder_says_what_to_put_there(tmp_path):
    preview = preview_dataset(tmp_path, buckets=SPEC)
    assert preview.image_count == 0 and preview.buckets == [] and preview.samples == []
    assert "no usable image" in preview.error and "N_concept" in preview.error
