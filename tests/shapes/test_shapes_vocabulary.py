"""The captioned-shapes vocabulary: captions round-trip through the parser, sampled scenes obey the world's
rules (background never an object's colour, one object per cell, held-out shape and style only on request),
sampling is deterministic, and every malformed caption gets an error naming the part to fix."""
from __future__ import annotations

import random

import pytest

from modules.shapes.vocabulary import (
    BASE_SHAPES,
    COLOURS,
    HELD_OUT_SHAPES,
    PALETTE,
    POSITION_CELLS,
    POSITIONS,
    SHAPES,
    STYLES,
    CaptionError,
    Scene,
    ShapeObject,
    caption,
    parse_caption,
    sample_scene,
)


def test_documented_captions_parse_to_their_scenes_and_write_back_identically():
    one = parse_caption("large red circle, top left, blue background")
    assert one == Scene((ShapeObject("circle", "red", "large", "top left"),), "blue")
    two_text = "small yellow star, bottom right, large outlined green square, center, black background"
    two = parse_caption(two_text)
    assert two.objects == (ShapeObject("star", "yellow", "small", "bottom right"),
                           ShapeObject("square", "green", "large", "center", style="outlined"))
    assert two.background == "black" and caption(two) == two_text
    # case, spacing and an explicit default style are forgiven; the caption written back is canonical
    assert caption(parse_caption("  Large  FILLED red circle,top left ,  blue background ")) == \
        "large red circle, top left, blue background"


def test_every_sampled_scene_round_trips_and_obeys_the_rules():
    rng = random.Random(7)
    scenes = [sample_scene(rng, shapes=SHAPES, styles=STYLES) for _ in range(3000)]
    for scene in scenes:
        assert parse_caption(caption(scene)) == scene
        assert scene.background not in {o.colour for o in scene.objects}
        assert len({o.position for o in scene.objects}) == len(scene.objects)
    assert {len(s.objects) for s in scenes} == {1, 2}
    seen = {attr: {getattr(o, attr) for s in scenes for o in s.objects}
            for attr in ("shape", "colour", "size", "position", "style")}
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS) and seen["style"] == set(STYLES)
    assert seen["position"] == set(POSITIONS) and {s.background for s in scenes} == set(COLOURS)


def test_base_sampling_leaves_out_the_held_out_shape_and_outlined_style():
    assert "hexagon" in SHAPES and HELD_OUT_SHAPES == {"hexagon"} and "hexagon" not in BASE_SHAPES
    rng = random.Random(0)
    objects = [o for _ in range(2000) for o in sample_scene(rng).objects]
    assert {o.shape for o in objects} == set(BASE_SHAPES)
    assert {o.style for o in objects} == {"filled"}
    assert all("outlined" not in caption(sample_scene(rng)) for _ in range(200))


def test_sampling_is_deterministic_per_seed():
    def draw(seed):
        rng = random.Random(seed)
        return [caption(sample_scene(rng, shapes=SHAPES, styles=STYLES)) for _ in range(50)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_image_tables_cover_the_vocabulary_and_cannot_be_changed():
    assert set(PALETTE) == set(COLOURS) and all(len(rgb) == 3 for rgb in PALETTE.values())
    assert sorted(POSITION_CELLS.values()) == [(r, c) for r in range(3) for c in range(3)]
    with pytest.raises(TypeError):
        PALETTE["pink"] = (255, 0, 255)


@pytest.mark.parametrize("text, words", [
    ("", ["empty caption"]),
    ("large red circle, top left", ["<colour> background", "top left"]),
    ("large red circle, blue background", ["<object>, <position>"]),
    ("huge red circle, top left, blue background", ["size 'huge'", "small, large"]),
    ("large pink circle, top left, blue background", ["colour 'pink'"]),
    ("large red oval, top left, blue background", ["shape 'oval'", "hexagon"]),
    ("large red circle, middle, blue background", ["position 'middle'", "center"]),
    ("large striped red circle, top, blue background", ["<size> [outlined] <colour> <shape>"]),
    ("large red circle, top left, red background", ["background (red)", "choose another background"]),
    ("large red circle, top, small blue star, top, green background", ["share the cell 'top'"]),
    ("small red circle, top, small red star, left, small red ring, right, blue background", ["at most 2 objects"]),
    ("large red circle, top left, teal background", ["background 'teal'"]),
])
def test_malformed_captions_name_the_part_to_fix(text, words):
    with pytest.raises(CaptionError) as err:
        parse_caption(text)
    for word in words:
        assert word in str(err.value)


def test_scene_constructor_checks_every_value():
    with pytest.raises(CaptionError, match="shape 'blob'.*colour 'teal'"):
        ShapeObject("blob", "teal", "large", "top")
    with pytest.raises(CaptionError, match="1 to 2 objects"):
        Scene((), "blue")
