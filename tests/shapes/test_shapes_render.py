"""The captioned-shapes renderer and datasets: the same scene and seed give the same pixels, every attribute
is visible where the caption says (centre colour by style, object inside its cell, size by area), and bad
sizes, words and output folders get errors that say what to do."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest

from modules.shapes.dataset import META_FILE, DatasetError, render_dataset, render_example, write_kohya_folder
from modules.shapes.render import RenderError, object_boxes, render, render_layout
from modules.shapes.vocabulary import BASE_SHAPES, PALETTE, POSITION_CELLS, SHAPES, STYLES, CaptionError, Scene, \
    ShapeObject, caption, parse_caption, sample_scene


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_same_scene_and_seed_give_the_same_pixels_and_seeds_vary_them():
    scene = parse_caption("large red circle, top left, small outlined green star, center, blue background")
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene, jitter_seed=3).tobytes() == render(scene, jitter_seed=3).tobytes()
    jittered = {render(scene, jitter_seed=s).tobytes() for s in range(5)}
    assert len(jittered) == 5 and render(scene).tobytes() not in jittered
    assert render(caption(scene)).tobytes() == render(scene).tobytes()      # a caption draws its scene
    for size in (8, 64, 128, 512):
        image = render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("style", STYLES)
def test_the_centre_shows_the_object_colour_when_filled_and_the_background_otherwise(shape, style):
    for seed in (None, 1, 2):
        for size in ("small", "large"):
            scene = Scene((ShapeObject(shape, "yellow", size, "bottom right", style),
                           ShapeObject("square", "black", "large", "top", "filled")), "purple")
            px = pixels(render(scene, 64, jitter_seed=seed))
            cx, cy, _ = object_boxes(scene.objects, 64, jitter_seed=seed)[0]
            y, x = int(cy), int(cx)                     # the pixel holding the (jittered) object centre
            hollow = style == "outlined" or shape == "ring"
            want = PALETTE["purple"] if hollow else PALETTE["yellow"]
            assert np.abs(px[y, x] - want).max() <= 2, (shape, style, size, seed, px[y, x])
            # the object's colour is really there (a one-pixel outline too), and only in its own cell
            to_yellow = np.abs(px - PALETTE["yellow"]).sum(axis=-1)
            yellowish = to_yellow < np.abs(px - PALETTE["purple"]).sum(axis=-1)
            assert yellowish[43:, 43:].sum() >= 6 and yellowish[:42].sum() == 0 and yellowish[:, :42].sum() == 0


def test_jittered_objects_stay_inside_their_cell_and_large_stays_larger_than_small():
    rng = random.Random(5)
    for index in range(200):
        scene = sample_scene(rng, shapes=SHAPES, styles=STYLES, two_object_probability=0.0)
        obj = scene.objects[0]
        px = pixels(render(scene, 96, jitter_seed=index))
        drawn = np.abs(px - PALETTE[scene.background]).max(axis=-1) > 0
        rows, columns = np.nonzero(drawn)
        row, column = POSITION_CELLS[obj.position]
        assert rows.min() >= row * 32 and rows.max() < (row + 1) * 32, (caption(scene), index)
        assert columns.min() >= column * 32 and columns.max() < (column + 1) * 32, (caption(scene), index)
    for shape in SHAPES:
        extents = {}
        for size in ("small", "large"):
            px = pixels(render(Scene((ShapeObject(shape, "red", size, "center"),), "black"), 96, jitter_seed=9))
            rows, _ = np.nonzero(np.abs(px - PALETTE["black"]).max(axis=-1) > 40)
            extents[size] = rows.max() - rows.min() + 1
        assert extents["large"] >= 1.6 * extents["small"], (shape, extents)


@pytest.mark.parametrize("size", [0, 4, 60, 100, 520, 64.0, "64", True, None])
def test_a_size_that_is_not_a_multiple_of_8_up_to_512_is_refused(size):
    scene = parse_caption("large red circle, top left, blue background")
    with pytest.raises(RenderError, match=r"multiple of 8 from 8 to 512"):
        render(scene, size)
    with pytest.raises(RenderError, match=r"multiple of 8"):
        render_dataset(0, 3, size)


def test_unknown_words_name_the_word_and_the_choices():
    with pytest.raises(CaptionError, match=r"shape 'blob'.*circle"):
        render("large red blob, top left, blue background")
    with pytest.raises(CaptionError, match=r"shapes must be a non-empty subset"):
        render_dataset(0, 3, 64, shapes=("blob",))
    with pytest.raises(CaptionError, match=r"styles must be a non-empty subset"):
        render_dataset(0, 3, 64, styles=("dotted",))
    with pytest.raises(CaptionError, match="Scene or a caption"):
        render(42)
    with pytest.raises(DatasetError, match=">= 0"):
        render_dataset(0, -1)


def test_datasets_are_deterministic_per_seed_and_example_index_and_follow_the_base_world():
    first = [(image.tobytes(), text) for image, text in render_dataset(3, 40)]
    assert first == [(image.tobytes(), text) for image, text in render_dataset(3, 40)]
    assert first[:10] == [(image.tobytes(), text) for image, text in render_dataset(3, 10)]
    assert [t for _, t in first] != [t for _, t in render_dataset(4, 40)]
    image, scene = render_example(3, 17)
    assert (image.tobytes(), caption(scene)) == first[17]
    objects = [o for _, text in first for o in parse_caption(text).objects]
    assert {o.shape for o in objects} <= set(BASE_SHAPES) and {o.style for o in objects} == {"filled"}
    whole = [parse_caption(t) for _, t in render_dataset(3, 300, 64, shapes=SHAPES, styles=STYLES)]
    assert "hexagon" in {o.shape for s in whole for o in s.objects}
    assert "outlined" in {o.style for s in whole for o in s.objects}


def test_kohya_folder_holds_each_image_with_its_caption_and_is_never_written_twice(tmp_path):
    from PIL import Image
    folder = write_kohya_folder(tmp_path / "data", seed=2, n=6, size=32, concept="shapes", repeats=3)
    assert folder == tmp_path / "data" / "3_shapes" and (tmp_path / "data" / META_FILE).is_file()
    pairs = list(render_dataset(2, 6, 32))
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.{ext}" for i in range(6) for ext in ("png", "txt")]
    for i, (image, text) in enumerate(pairs):
        assert (folder / f"{i:06d}.txt").read_text(encoding="utf-8") == text
        assert Image.open(folder / f"{i:06d}.png").convert("RGB").tobytes() == image.tobytes()
    before = (folder / "000000.txt").read_text(encoding="utf-8")
    with pytest.raises(DatasetError, match="already exists; choose another"):
        write_kohya_folder(tmp_path / "data", seed=9, n=2, size=32, concept="shapes", repeats=3)
    assert (folder / "000000.txt").read_text(encoding="utf-8") == before
    with pytest.raises(DatasetError, match="repeats must be.*; concept"):
        write_kohya_folder(tmp_path / "other", seed=0, n=1, repeats=0, concept="../up")
    with pytest.raises(RenderError):
        write_kohya_folder(tmp_path / "other", seed=0, n=1, size=30)
    assert not (tmp_path / "other").exists()            # nothing written for bad settings


def test_make_shapes_data_command_writes_the_folder_and_reports_bad_input(tmp_path, capsys):
    from modules.shapes import data_command
    from modules.training.__main__ import COMMANDS
    assert COMMANDS["make-shapes-data"] == "modules.shapes.data_command"
    parser = argparse.ArgumentParser()
    data_command.add_arguments(parser)
    out = tmp_path / "dreambooth"
    assert data_command.run(parser.parse_args(["--out", str(out), "--n", "5", "--shapes", "hexagon",
                                               "--concept", "sks hexagon", "--repeats", "20"])) == 0
    captions = [p.read_text(encoding="utf-8") for p in sorted((out / "20_sks hexagon").glob("*.txt"))]
    assert len(captions) == 5 and all("hexagon" in c for c in captions)
    assert data_command.run(parser.parse_args(["--out", str(tmp_path / "x"), "--size", "65"])) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_a_crowded_layout_draws_every_cell_and_refuses_two_objects_in_one():
    objects = [ShapeObject(SHAPES[i % len(SHAPES)], "red", "large", position) for i, position in
               enumerate(POSITION_CELLS)]
    px = pixels(render_layout(objects, "white", 48))
    for obj, (cx, cy, _) in zip(objects, object_boxes(objects, 48)):
        hollow = obj.shape == "ring"
        assert np.abs(px[int(cy), int(cx)] - PALETTE["white" if hollow else "red"]).max() <= 2, obj
    with pytest.raises(CaptionError, match="one object per cell"):
        render_layout(objects[:2] + objects[:1], "white")
    with pytest.raises(CaptionError, match="palette background"):
        render_layout(objects[:1], "pink")
