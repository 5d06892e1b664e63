"""Draw a captioned-shapes :class:`~modules.shapes.vocabulary.Scene` with Pillow.

The picture is what the caption says and nothing else: one background colour; each object in its own cell
of the 3x3 grid, its bounding box :data:`~modules.shapes.vocabulary.SIZE_FRACTION` of a cell, in the exact
palette colour. ``filled`` objects are solid; ``outlined`` ones are a line of :data:`OUTLINE_FRACTION` of
the box, so their centre shows the background (a ``ring`` is solid between two radii, so its centre shows
the background in either style, and its band is wider than an outline so the two stay apart).

Why supersampling: Pillow draws polygons without anti-aliasing, and a small object at 64 px is about ten
pixels wide, so stair-stepped edges would be a large part of it. Drawing at :data:`SUPERSAMPLE` times the
size and box-downsampling (``Image.reduce``) gives smooth edges for a fraction of a millisecond.

Why jitter is optional: ``render(scene)`` is the one canonical picture of a scene (tests, the classifier's
check of a prompt); ``render(scene, jitter_seed=s)`` moves and shrinks each object a little, deterministic
per seed, for training variety. Jitter never moves an object out of its cell and never brings ``small``
near ``large`` (scale stays within :data:`JITTER_SCALE`), so the attributes stay unambiguous.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable
from types import MappingProxyType

from PIL import Image, ImageDraw

from modules.shapes.vocabulary import PALETTE, POSITION_CELLS, SIZE_FRACTION, CaptionError, Scene, ShapeObject, \
    parse_caption

#: drawn at this many times the output size, then box-downsampled (anti-aliasing)
SUPERSAMPLE = 4
#: outline width as a fraction of the object's box side (at least one output pixel)
OUTLINE_FRACTION = 0.1
#: a ring's inner radius as a fraction of its outer radius: its band (0.275 of the box) is 2.75 outlines
#: wide, and an outlined ring's two outlines keep a gap between them
RING_INNER = 0.45
#: a star's inner radius as a fraction of its outer radius (fat enough to read at ten pixels)
STAR_INNER = 0.45
#: half the width of a cross's arms, as a fraction of the box's half side
CROSS_ARM = 0.34
#: jitter draws each object's box at this range of its nominal size
JITTER_SCALE = (0.88, 1.0)
#: jitter moves an object's centre by at most this fraction of a cell (and never out of the cell)
JITTER_SHIFT = 0.1
MIN_SIZE, MAX_SIZE, SIZE_STEP = 8, 512, 8


class RenderError(ValueError):
    """A canvas size the generator cannot draw; the message says which sizes it can."""


def check_size(size: object) -> int:
    """``size`` as an int, or :class:`RenderError` naming the allowed sizes."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE or size % SIZE_STEP:
        raise RenderError(f"image size must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE} pixels "
                          f"(e.g. 64 or 128), not {size!r}")
    return size


def render(scene: Scene | str, size: int = 64, *, jitter_seed: int | str | None = None) -> Image.Image:
    """The scene (or a caption, parsed with its errors) as an RGB image of ``size`` x ``size`` pixels.

    Same scene, size and ``jitter_seed`` give the same pixels; ``jitter_seed=None`` draws every object
    centred in its cell at its nominal size.
    """
    if isinstance(scene, str):
        scene = parse_caption(scene)
    if not isinstance(scene, Scene):
        raise CaptionError(f"render takes a Scene or a caption string, not {type(scene).__name__}")
    return render_layout(scene.objects, scene.background, size, jitter_seed=jitter_seed)


def render_layout(objects: Iterable[ShapeObject], background: str, size: int = 64, *,
                  jitter_seed: int | str | None = None) -> Image.Image:
    """Like :func:`render` for any number of objects (up to one per cell), not only a captionable scene.

    Why: the classifier learns faster from crowded grids (every cell it sees teaches it), and it must read
    a picture with one object too many as such; a caption cannot describe those, so they are no Scene.
    """
    objects = tuple(objects)
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions) or background not in PALETTE:
        raise CaptionError(f"a layout has one object per cell and a palette background, not {positions} on "
                           f"{background!r}")
    big = check_size(size) * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(image)
    for obj, (cx, cy, half) in zip(objects, object_boxes(objects, big, jitter_seed=jitter_seed)):
        line = max(OUTLINE_FRACTION * 2 * half, SUPERSAMPLE)
        _draw_shape(draw, obj, cx, cy, half, line, PALETTE[obj.colour], PALETTE[background])
    return image.reduce(SUPERSAMPLE)


def object_boxes(objects: Iterable[ShapeObject], size: int, *,
                 jitter_seed: int | str | None = None) -> list[tuple[float, float, float]]:
    """Where :func:`render_layout` puts each object on a ``size`` canvas: (centre x, centre y, half side) in
    pixels, the same jitter for the same seed (tests use it to look at an object's centre)."""
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    cell = size / 3
    boxes = []
    for obj in objects:
        row, column = POSITION_CELLS[obj.position]
        half = SIZE_FRACTION[obj.size] * cell / 2
        cx, cy = (column + 0.5) * cell, (row + 0.5) * cell
        if rng is not None:
            half *= rng.uniform(*JITTER_SCALE)
            room = min(JITTER_SHIFT * cell, cell / 2 - half)     # the box stays inside its cell
            cx += rng.uniform(-room, room)
            cy += rng.uniform(-room, room)
        boxes.append((cx, cy, half))
    return boxes


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, cx: float, cy: float, half: float, line: float,
                colour: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    filled = obj.style == "filled"
    width = max(1, round(line))
    box = (cx - half, cy - half, cx + half, cy + half)
    if obj.shape == "circle":
        draw.ellipse(box, fill=colour if filled else None, outline=None if filled else colour, width=width)
    elif obj.shape == "ring":
        inner = half * RING_INNER
        inner_box = (cx - inner, cy - inner, cx + inner, cy + inner)
        if filled:
            draw.ellipse(box, fill=colour)
            draw.ellipse(inner_box, fill=background)
        else:
            draw.ellipse(box, outline=colour, width=width)
            draw.ellipse((inner_box[0] - width, inner_box[1] - width, inner_box[2] + width, inner_box[3] + width),
                         outline=colour, width=width)
    else:
        points = [(cx + x * half, cy + y * half) for x, y in _UNIT_POLYGONS[obj.shape]]
        if filled:
            draw.polygon(points, fill=colour)
        else:
            draw.polygon(points, outline=colour, width=width)


def _star(points: int = 5) -> tuple[tuple[float, float], ...]:
    corners = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else STAR_INNER
        angle = -math.pi / 2 + k * math.pi / points
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(corners)


def _cross(arm: float = CROSS_ARM) -> tuple[tuple[float, float], ...]:
    a = arm
    return ((-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
            (-a, -a))


#: polygon corners in a box from -1 to 1 (y down); circle and ring are drawn as ellipses
_UNIT_POLYGONS: MappingProxyType[str, tuple[tuple[float, float], ...]] = MappingProxyType({
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "star": _star(),
    "cross": _cross(),
    # flat top and bottom, corners left and right: at ten pixels it still differs from a circle
    "hexagon": tuple((math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)),
})
