"""Saving: A1111's folder and file names, PNG parameters chunk, never overwriting, callbacks."""
from __future__ import annotations

import datetime as dt
import threading

from PIL import Image

from modules.diffusion.outputs import ImageSaver, image_grid, next_number, save_png_atomic
from modules.extensions.callbacks import Callbacks


def test_saves_numbered_png_with_parameters_and_fires_callbacks(tmp_path):
    callbacks = Callbacks(raise_errors=True)
    seen = []
    callbacks.add("on_before_image_saved", lambda image, path, infotext, ctx: seen.append(("before", path, infotext)))
    callbacks.add("on_image_saved", lambda image, path, infotext, ctx: seen.append(("after", path, infotext)))
    saver = ImageSaver(tmp_path / "outputs", callbacks, ctx="CTX")
    img = Image.new("RGB", (16, 16), "red")
    first = saver.save(img, "txt2img-images", 1234, "a cat\nSteps: 4, Sampler: Euler, Seed: 1234")
    second = saver.save(img, "txt2img-images", 1235, "second")
    day = dt.date.today().strftime("%Y-%m-%d")
    assert first == tmp_path / "outputs" / "txt2img-images" / day / "00000-1234.png"
    assert second.name == "00001-1235.png"
    with Image.open(first) as reread:
        assert reread.info["parameters"] == "a cat\nSteps: 4, Sampler: Euler, Seed: 1234"
    assert seen[0] == ("before", str(first), "a cat\nSteps: 4, Sampler: Euler, Seed: 1234")
    assert seen[1] == ("after", str(first), "a cat\nSteps: 4, Sampler: Euler, Seed: 1234")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".saving-")]  # no temp files left


def test_never_overwrites_existing_files_and_continues_numbering(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"keep me")
    (tmp_path / "notes.txt").write_text("not numbered")
    assert next_number(tmp_path) == 8
    path = save_png_atomic(Image.new("RGB", (4, 4)), tmp_path, "99", None)
    assert path.name == "00008-99.png"
    assert (tmp_path / "00007-1.png").read_bytes() == b"keep me"


def test_concurrent_writers_get_distinct_numbers(tmp_path):
    paths, errors = [], []

    def write(i):
        try:
            paths.append(save_png_atomic(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path, str(i), f"image {i}"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({p.name for p in paths}) == 12
    numbers = sorted(int(p.name.split("-")[0]) for p in paths)
    assert numbers == list(range(12))
    for p in paths:  # each file holds the image its writer made
        i = int(p.stem.split("-")[1])
        with Image.open(p) as im:
            assert im.getpixel((0, 0))[0] == i and im.info["parameters"] == f"image {i}"


def test_grid_layout():
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)]
    grid = image_grid(images)
    assert grid.size == (24, 16)  # 2 rows x 3 columns
    assert grid.getpixel((8, 0))[0] == 40 and grid.getpixel((0, 8))[0] == 120
    assert image_grid(images[:1]).size == (8, 8)
