"""The kohya dataset folder: repeats from N_concept names, caption precedence and fallback, plain folders,
bad files reported by name and skipped, clear errors for empty folders, every image in exactly one bucket,
and pixels as the VAE wants them (EXIF orientation, transparency on white, changed files refused)."""
from __future__ import annotations

import numpy as np
import pytest
from image_files import truncated_copy, write_image
from PIL import Image

from modules.training.images.buckets import BucketSpec
from modules.training.images.dataset import DatasetError, ImageDataset, Sample, scan_dataset

SPEC = BucketSpec(128)   # buckets 64x256 .. 256x64: small files, real aspect-ratio buckets


def by_path(dataset):
    return {r.relative: r for r in dataset.records}


def test_repeats_concepts_and_caption_precedence(tmp_path):
    dog, cat = tmp_path / "10_sks dog", tmp_path / "2_cat_tabby"
    write_image(dog / "a.png", seed=1)
    (dog / "a.txt").write_text("from txt", encoding="utf-8")
    (dog / "a.caption").write_text("from caption", encoding="utf-8")
    write_image(dog / "b.jpg", seed=2)
    (dog / "b.caption").write_text("from caption", encoding="utf-8")
    write_image(dog / "c.webp", seed=3)
    write_image(cat / "d.bmp", seed=4)
    write_image(cat / "E.PNG", seed=5)
    (cat / "notes.md").write_text("not part of the dataset")
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    records = by_path(dataset)
    assert sorted(records) == ["10_sks dog/a.png", "10_sks dog/b.jpg", "10_sks dog/c.webp", "2_cat_tabby/E.PNG",
                               "2_cat_tabby/d.bmp"]
    assert records["10_sks dog/a.png"].caption_lines == ("from txt",)
    assert records["10_sks dog/a.png"].caption_source == "10_sks dog/a.txt"
    assert records["10_sks dog/b.jpg"].caption_lines == ("from caption",)
    assert records["10_sks dog/c.webp"].caption_lines == ("sks dog",)
    assert records["10_sks dog/c.webp"].caption_source == "folder name"
    assert records["2_cat_tabby/d.bmp"].caption_lines == ("cat_tabby",)   # kohya keeps the rest of the name
    assert [(c.name, c.repeats) for c in dataset.concepts] == [("sks dog", 10), ("cat_tabby", 2)]
    assert dataset.images_per_epoch == 3 * 10 + 2 * 2
    assert dataset.skipped == [] and dataset.warnings == []
    sample = Sample(index=dataset.records.index(records["10_sks dog/a.png"]), epoch=0, slot=0, seed=0)
    assert dataset.caption(sample) == "from txt"


def test_caption_extensions_can_be_narrowed(tmp_path):
    write_image(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / "a.txt").write_text("txt")
    (tmp_path / "1_x" / "a.caption").write_text("caption")
    only_caption = ImageDataset(tmp_path, buckets=SPEC, caption_extensions=(".caption",))
    assert only_caption.records[0].caption_lines == ("caption",)


def test_plain_folder_is_one_concept_with_one_repeat(tmp_path):
    folder = tmp_path / "my pictures"
    write_image(folder / "a.png", seed=1)
    write_image(folder / "b.png", seed=2)
    (folder / "b.txt").write_text("a caption")
    dataset = ImageDataset(folder, buckets=SPEC)
    assert [(c.folder, c.name, c.repeats) for c in dataset.concepts] == [(".", "my pictures", 1)]
    assert [r.caption_lines for r in dataset.records] == [("my pictures",), ("a caption",)]
    assert dataset.images_per_epoch == 2
    # the concept folder itself chosen as the dataset: its name still gives repeats and caption
    concept = tmp_path / "5_sks dog"
    write_image(concept / "a.png")
    direct = ImageDataset(concept, buckets=SPEC)
    assert [(c.name, c.repeats) for c in direct.concepts] == [("sks dog", 5)]


def test_folders_and_files_outside_the_convention_are_reported(tmp_path):
    write_image(tmp_path / "3_ok" / "a.png")
    write_image(tmp_path / "loose.png")
    write_image(tmp_path / "misc" / "b.png")
    write_image(tmp_path / "0_none" / "c.png")
    write_image(tmp_path / ".atelier-latents" / "d.png")   # hidden: silently ignored
    write_image(tmp_path / "3_ok" / "nested" / "e.png")    # sub-folders are not searched (as kohya)
    (tmp_path / "2_empty").mkdir()
    scan = scan_dataset(tmp_path, SPEC)
    assert [r.relative for r in scan.records] == ["3_ok/a.png"]
    assert [(s.path, "move it into" in s.reason) for s in scan.skipped] == [("loose.png", True)]
    warned = {w.path: w.reason for w in scan.warnings}
    assert set(warned) == {"misc/", "0_none/", "2_empty/"}
    assert "N_concept" in warned["misc/"] and "repeat count is 0" in warned["0_none/"]
    assert "no usable image" in warned["2_empty/"]


def test_bad_files_are_reported_by_name_and_skipped(tmp_path):
    good = write_image(tmp_path / "4_x" / "good.png", (96, 64), seed=1)
    write_image(tmp_path / "4_x" / "bom.png", seed=2)
    (tmp_path / "4_x" / "bom.txt").write_bytes(b"\xef\xbb\xbftag one, tag two")
    (tmp_path / "4_x" / "text.png").write_text("this is not a picture")
    (tmp_path / "4_x" / "empty.jpg").write_bytes(b"")
    truncated_copy(write_image(tmp_path / "full.png", (64, 64), seed=3), tmp_path / "4_x" / "cut.png")
    truncated_copy(write_image(tmp_path / "full.jpg", (64, 64), seed=4), tmp_path / "4_x" / "cut.jpg")
    write_image(tmp_path / "4_x" / "pixel.png", (1, 1))
    write_image(tmp_path / "4_x" / "thin.png", (5, 200))
    write_image(tmp_path / "4_x" / "latin.png", seed=5)
    (tmp_path / "4_x" / "latin.txt").write_bytes("café au lait".encode("latin-1"))
    write_image(tmp_path / "4_x" / "anim.gif")
    (tmp_path / "full.png").unlink()
    (tmp_path / "full.jpg").unlink()
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    assert [r.relative for r in dataset.records] == ["4_x/bom.png", "4_x/good.png"]
    assert dataset.records[0].caption_lines == ("tag one, tag two",)
    assert dataset.records[1].path == good
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert set(reasons) == {"4_x/text.png", "4_x/empty.jpg", "4_x/cut.png", "4_x/cut.jpg", "4_x/pixel.png",
                            "4_x/thin.png", "4_x/latin.png", "4_x/anim.gif"}
    assert "not an image" in reasons["4_x/text.png"] and "not an image" in reasons["4_x/empty.jpg"]
    assert "truncated" in reasons["4_x/cut.png"] and "truncated" in reasons["4_x/cut.jpg"]
    assert "too small (1x1 px)" in reasons["4_x/pixel.png"] and "5x200" in reasons["4_x/thin.png"]
    assert "4_x/latin.txt is not UTF-8" in reasons["4_x/latin.png"]
    assert ".gif images are not read" in reasons["4_x/anim.gif"]


def test_empty_caption_file_falls_back_with_a_warning(tmp_path):
    write_image(tmp_path / "1_sks dog" / "a.png")
    (tmp_path / "1_sks dog" / "a.txt").write_text("\n  \n")
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    assert dataset.records[0].caption_lines == ("sks dog",)
    assert [(w.path, "empty" in w.reason) for w in dataset.warnings] == [("1_sks dog/a.txt", True)]


def test_empty_or_unusable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError) as info:
        ImageDataset(tmp_path, buckets=SPEC)
    message = str(info.value)
    assert str(tmp_path) in message and "no usable image" in message
    assert "N_concept" in message and "10_sks dog" in message and ".txt or .caption" in message
    (tmp_path / "2_dog").mkdir()
    (tmp_path / "2_dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"Skipped: 2_dog/broken.png: is truncated or damaged"):
        ImageDataset(tmp_path, buckets=SPEC)
    with pytest.raises(DatasetError, match="does not exist"):
        ImageDataset(tmp_path / "missing", buckets=SPEC)


def test_every_image_is_in_exactly_one_bucket(tmp_path):
    sizes = [(64, 64), (300, 300), (256, 64), (640, 150), (64, 256), (90, 300), (200, 120), (120, 200), (77, 91)]
    for n, size in enumerate(sizes):
        write_image(tmp_path / "1_x" / f"{n}.png", size, seed=n)
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    members = [i for indices in dataset.buckets.values() for i in indices]
    assert sorted(members) == list(range(len(sizes)))                  # a partition of the images
    allowed = SPEC.resolutions()
    for (width, height), indices in dataset.buckets.items():
        assert (width, height) in allowed and width % 64 == 0 and height % 64 == 0
        assert all(dataset.records[i].bucket == (width, height) for i in indices)
    by_name = {r.relative: r.bucket for r in dataset.records}
    assert by_name["1_x/3.png"] == (256, 64) and by_name["1_x/5.png"] == (64, 192)
    assert by_name["1_x/1.png"] == (128, 128)


def test_pixels_are_bucket_sized_and_scaled(tmp_path):
    for n in range(3):
        write_image(tmp_path / "1_x" / f"{n}.png", (200, 70), seed=n)
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    pixels = dataset.pixels([0, 1, 2])
    assert pixels.shape == (3, 3, 64, 192) and pixels.dtype.is_floating_point
    assert -1.0 <= pixels.min() < -0.9 and 0.9 < pixels.max() <= 1.0
    expected = np.asarray(dataset.load_image(1), dtype=np.float32) / 127.5 - 1
    assert np.allclose(pixels[1].permute(1, 2, 0).numpy(), expected)
    batch = dataset.batch([Sample(i, 0, i, 0) for i in (2, 0)])
    assert batch.bucket == (192, 64) and batch.latents is None and batch.captions == ["x", "x"]
    assert batch.pixels.shape == (2, 3, 64, 192)


def test_exif_orientation_and_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees: stored 192x64, displayed 64x192
    write_image(tmp_path / "1_x" / "rotated.jpg", (192, 64), exif=exif.tobytes())
    cutout = np.zeros((64, 64, 4), dtype=np.uint8)
    cutout[16:48, 16:48] = (255, 0, 0, 255)                              # an opaque red square on nothing
    Image.fromarray(cutout, "RGBA").save(tmp_path / "1_x" / "cutout.png")
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    records = by_path(dataset)
    assert records["1_x/rotated.jpg"].size == (64, 192) and records["1_x/rotated.jpg"].bucket == (64, 192)
    assert dataset.load_image(dataset.records.index(records["1_x/rotated.jpg"])).size == (64, 192)
    flat = np.asarray(dataset.load_image(dataset.records.index(records["1_x/cutout.png"])))
    assert flat.shape == (128, 128, 3)
    assert (flat[:20, :20] >= 250).all()                                  # transparent -> white, not black
    assert flat[64, 64, 0] > 240 and flat[64, 64, 1:].max() < 20


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    (tmp_path / "1_x").mkdir()
    Image.fromarray(ramp).save(tmp_path / "1_x" / "deep.png")
    dataset = ImageDataset(tmp_path, buckets=BucketSpec(64))
    grey = np.asarray(dataset.load_image(0))[..., 0].astype(int)
    assert abs(grey.mean() - 127.5) < 3 and grey.min() < 5 and grey.max() > 250


def test_a_file_changed_after_the_scan_is_refused(tmp_path):
    path = write_image(tmp_path / "1_x" / "a.png", seed=1)
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    write_image(path, seed=2)
    with pytest.raises(DatasetError, match="changed since the dataset was scanned"):
        dataset.load_image(0)
    path.unlink()
    with pytest.raises(DatasetError, match="cannot be read any more"):
        dataset.pixels([0])


def test_a_batch_spans_one_bucket(tmp_path):
    write_image(tmp_path / "1_x" / "wide.png", (256, 64))
    write_image(tmp_path / "1_x" / "square.png", (64, 64))
    dataset = ImageDataset(tmp_path, buckets=SPEC)
    with pytest.raises(ValueError, match="one bucket"):
        dataset.pixels([0, 1])


def test_fingerprint_follows_order_not_content(tmp_path):
    path = write_image(tmp_path / "2_x" / "a.png", seed=1)
    (tmp_path / "2_x" / "a.txt").write_text("one")
    first = ImageDataset(tmp_path, buckets=SPEC).fingerprint
    write_image(path, seed=9)
    (tmp_path / "2_x" / "a.txt").write_text("two")
    assert ImageDataset(tmp_path, buckets=SPEC).fingerprint == first          # same order of samples
    write_image(tmp_path / "2_x" / "b.png", seed=3)
    assert ImageDataset(tmp_path, buckets=SPEC).fingerprint != first          # one more image
    assert ImageDataset(tmp_path, buckets=BucketSpec(64)).fingerprint != first
