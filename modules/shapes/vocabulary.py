"""The captioned-shapes world, defined once: its words, a scene, and the caption grammar.

Atelier's demo models share this world (see ``shared/reference/demo-models.md``): the chat model turns a
free-form drawing request into a caption, the image model draws the caption, and a classifier checks the
picture against it. Every one of them must agree on the words and their order, so they all import them
from here; nothing else in the repository spells a shape, colour or position.

A scene is a square canvas of one background colour with one or two objects; each object has a size, a
style, a colour, a shape and a cell of a 3x3 grid. Its caption is comma-separated, attributes in a fixed
order, objects in the scene's order, the background last::

    large red circle, top left, blue background
    small yellow star, bottom right, large outlined green square, center, black background

``filled`` is the default style and is not written (base image training never shows ``outlined``, so its
captions never carry the word); ``outlined`` goes between size and colour. Two objects never share a cell
and no object has the background's colour, so every caption describes a picture that can be drawn and
told apart. ``hexagon`` is held out of base image training (so that DreamBooth / LoRA can teach it later):
:func:`sample_scene` leaves it out unless asked.

No torch, no Gradio, no Pillow: the vocabulary is plain data, importable anywhere.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType

#: every shape word; the image generator draws each of them
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon")
#: shapes kept out of base training (taught later by DreamBooth / LoRA)
HELD_OUT_SHAPES: frozenset[str] = frozenset({"hexagon"})
#: the shapes base training uses
BASE_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)

#: colour name -> sRGB, for the image generator; the same palette serves objects and background (read-only)
PALETTE: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType({
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 30), "green": (40, 170, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
})
COLOURS: tuple[str, ...] = tuple(PALETTE)

SIZES: tuple[str, ...] = ("small", "large")
#: fraction of a grid cell an object's bounding box spans, for the image generator
SIZE_FRACTION: MappingProxyType[str, float] = MappingProxyType({"small": 0.5, "large": 0.95})

#: position name -> (row, column) of the 3x3 grid, row 0 at the top
POSITION_CELLS: MappingProxyType[str, tuple[int, int]] = MappingProxyType({
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
})
POSITIONS: tuple[str, ...] = tuple(POSITION_CELLS)

STYLES: tuple[str, ...] = ("filled", "outlined")
#: the style a caption leaves unsaid
DEFAULT_STYLE = "filled"
#: base training shows only this style; the LoRA demo teaches the others
BASE_STYLES: tuple[str, ...] = (DEFAULT_STYLE,)

MAX_OBJECTS = 2
BACKGROUND_WORD = "background"


class CaptionError(ValueError):
    """A caption or scene outside the grammar; the message names the part and what would be valid."""


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    position: str
    style: str = DEFAULT_STYLE

    def __post_init__(self) -> None:
        problems = [f"{field} {value!r} is not one of {', '.join(allowed)}"
                    for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                                  ("size", self.size, SIZES), ("position", self.position, POSITIONS),
                                                  ("style", self.style, STYLES))
                    if value not in allowed]
        if problems:
            raise CaptionError("; ".join(problems))

    def describe(self) -> str:
        """``large outlined red circle`` (the style only when it is not the default)."""
        words = [self.size] + ([self.style] if self.style != DEFAULT_STYLE else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """One or two objects, in caption order, on a background of another colour."""

    objects: tuple[ShapeObject, ...]
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        problems = []
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            problems.append(f"a scene has 1 to {MAX_OBJECTS} objects, not {len(self.objects)}")
        if self.background not in COLOURS:
            problems.append(f"background {self.background!r} is not one of {', '.join(COLOURS)}")
        clashing = [o.describe() for o in self.objects if o.colour == self.background]
        if clashing:
            problems.append(f"the background ({self.background}) has the colour of {', '.join(clashing)}; "
                            "choose another background")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            problems.append(f"two objects share the cell {positions[0]!r}; put each in its own cell")
        if problems:
            raise CaptionError("; ".join(problems))


def vocabulary_words() -> tuple[str, ...]:
    """Every word a caption can hold, once each (for tokenizers that give each its own token)."""
    words = [*SHAPES, *COLOURS, *SIZES, *STYLES, BACKGROUND_WORD]
    words += [w for position in POSITIONS for w in position.split()]
    return tuple(dict.fromkeys(words))


def caption(scene: Scene) -> str:
    """The scene's caption: ``<object>, <position>`` per object, then ``<colour> background``."""
    parts = [part for obj in scene.objects for part in (obj.describe(), obj.position)]
    return ", ".join(parts + [f"{scene.background} {BACKGROUND_WORD}"])


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; :class:`CaptionError` names the first part that does not fit.

    Whitespace and letter case are forgiven, and an explicit ``filled`` is accepted; anything else must
    follow the grammar of :func:`caption` exactly, so ``caption(parse_caption(c)) == c`` for every
    caption ``c`` that :func:`caption` writes.
    """
    if not isinstance(text, str) or not text.strip():
        raise CaptionError("empty caption; write e.g. 'large red circle, top left, blue background'")
    parts = [" ".join(part.lower().split()) for part in text.split(",")]
    *object_parts, last = parts
    background_words = last.split()
    if len(background_words) != 2 or background_words[1] != BACKGROUND_WORD:
        raise CaptionError(f"the caption must end with '<colour> background' (colour one of {', '.join(COLOURS)}), "
                           f"not {last!r}")
    if not object_parts or len(object_parts) % 2:
        raise CaptionError(f"after the objects comes the background; each object is '<object>, <position>' "
                           f"(e.g. 'large red circle, top left'), but {text.strip()!r} has {len(object_parts)} "
                           "part(s) before the background")
    if len(object_parts) // 2 > MAX_OBJECTS:
        raise CaptionError(f"a scene has at most {MAX_OBJECTS} objects, this caption has {len(object_parts) // 2}")
    objects = [_parse_object(object_parts[i], object_parts[i + 1]) for i in range(0, len(object_parts), 2)]
    return Scene(tuple(objects), background_words[0])


def _parse_object(description: str, position: str) -> ShapeObject:
    words = description.split()
    if position not in POSITIONS:
        raise CaptionError(f"position {position!r} (after {description!r}) is not one of {', '.join(POSITIONS)}")
    style = DEFAULT_STYLE
    if len(words) == 4 and words[1] in STYLES:
        style = words.pop(1)
    if len(words) != 3:
        raise CaptionError(f"an object is '<size> [outlined] <colour> <shape>', e.g. 'large red circle', "
                           f"not {description!r}")
    size, colour, shape = words
    for field, value, allowed in (("size", size, SIZES), ("colour", colour, COLOURS), ("shape", shape, SHAPES)):
        if value not in allowed:
            raise CaptionError(f"{field} {value!r} in {description!r} is not one of {', '.join(allowed)}")
    return ShapeObject(shape=shape, colour=colour, size=size, position=position, style=style)


def sample_scene(rng: random.Random, *, shapes: tuple[str, ...] = BASE_SHAPES,
                 styles: tuple[str, ...] = BASE_STYLES, two_object_probability: float = 0.5) -> Scene:
    """A random valid scene drawn only from ``rng`` (same generator state, same scene).

    ``shapes`` and ``styles`` default to base training's (no hexagon, nothing outlined); pass
    :data:`SHAPES` / :data:`STYLES` for the whole world.
    """
    if not shapes or not set(shapes) <= set(SHAPES):
        raise CaptionError(f"shapes must be a non-empty subset of {', '.join(SHAPES)}, not {shapes!r}")
    if not styles or not set(styles) <= set(STYLES):
        raise CaptionError(f"styles must be a non-empty subset of {', '.join(STYLES)}, not {styles!r}")
    count = 2 if rng.random() < two_object_probability else 1
    positions = rng.sample(POSITIONS, count)
    objects = tuple(ShapeObject(shape=rng.choice(shapes), colour=rng.choice(COLOURS), size=rng.choice(SIZES),
                                position=position, style=rng.choice(styles)) for position in positions)
    used = {o.colour for o in objects}
    background = rng.choice([c for c in COLOURS if c not in used])
    return Scene(objects, background)
