"""SFT family ``drawing``: free-form drawing requests whose answer is the captioned-shapes prompt.

"could you draw a big red circle up in the left corner on blue?" -> ``large red circle, top left, blue
background``. A request is a sentence frame around a scene description; the description says every
attribute of the caption (size, colour, shape and position of each object, the background colour, and the
style when it is not the default) in one of several wordings: synonyms (big/large, tiny/small, violet/
purple), position phrases ("up in the left corner", "in the upper left"), object forms ("a big red circle",
"a big circle in red"), background phrases ("on blue", "against a blue backdrop"). Objects are described in
caption order, so the answer is exactly :func:`modules.shapes.vocabulary.caption` of the scene.

Held-out requests use sentence frames and an object form that no train request uses; every word they use
is one train requests use too, so held-out accuracy measures generalising over phrasing, not guessing
unseen words.
"""
from __future__ import annotations

import random
import re

from modules.shapes.vocabulary import (
    SHAPES,
    STYLES,
    Scene,
    ShapeObject,
    caption,
    sample_scene,
)
from modules.training.llm.sft_templates import Template, chat_item, split_templates

FAMILY = "drawing"

SIZE_WORDS: dict[str, tuple[str, ...]] = {"large": ("large", "big", "huge"), "small": ("small", "tiny", "little")}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "orange": ("orange",), "yellow": ("yellow", "golden"), "green": ("green",),
    "blue": ("blue",), "purple": ("purple", "violet"), "white": ("white",), "black": ("black",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"), "square": ("square", "box"), "triangle": ("triangle",), "star": ("star",),
    "cross": ("cross", "plus sign"), "ring": ("ring", "donut"), "hexagon": ("hexagon",),
}
#: words before the colour; the default style is mostly left unsaid, as people do
STYLE_WORDS: dict[str, tuple[str, ...]] = {"filled": ("", "", "", "solid", "filled"),
                                           "outlined": ("outlined", "unfilled", "outline-only")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the upper left", "up in the left corner", "in the top-left corner",
                 "at the top left"),
    "top": ("at the top", "at the top center", "up top", "at the top middle"),
    "top right": ("in the top right", "in the upper right", "up in the right corner", "in the top-right corner",
                  "at the top right"),
    "left": ("on the left", "on the left side", "at the left edge", "in the middle of the left side"),
    "center": ("in the center", "in the middle", "in the centre", "centered"),
    "right": ("on the right", "on the right side", "at the right edge", "in the middle of the right side"),
    "bottom left": ("in the bottom left", "in the lower left", "down in the left corner",
                    "in the bottom-left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "down at the bottom", "at the bottom middle"),
    "bottom right": ("in the bottom right", "in the lower right", "down in the right corner",
                     "in the bottom-right corner", "at the bottom right"),
}
BACKGROUND_FORMS: tuple[str, ...] = ("on {c}", "on {a} {c} background", "with {a} {c} background",
                                     "against {a} {c} backdrop", "on a plain {c} canvas", "over {c}",
                                     "and make the background {c}")
CONNECTORS: tuple[str, ...] = (" and ", ", and ", " plus ", " together with ")

_ARTICLE = "\0"      # stands for "a" or "an" until the next word is known

#: how one object's words are put together ({a} is the article of the next word)
OBJECT_FORMS: tuple[Template, ...] = (
    Template("adj", "{a} {size} {style}{colour} {shape} {position}"),
    Template("in-colour", "{a} {size} {style}{shape} in {colour} {position}"),
    Template("position-first", "{position}, {a} {size} {style}{colour} {shape}"),
    Template("one", "one {size} {style}{colour} {shape}, {position}", held_out=True),
)
FRAMES: tuple[Template, ...] = (
    Template("could-you", "could you draw {scene}?"),
    Template("draw", "draw {scene}"),
    Template("please-draw", "Please draw {scene}."),
    Template("paint", "can you paint {scene}?"),
    Template("picture-of", "I'd like a picture of {scene}."),
    Template("image-of", "make an image of {scene}"),
    Template("show-me", "Show me {scene}."),
    Template("sketch", "sketch {scene}, please"),
    Template("generate", "generate {scene}"),
    Template("i-want", "I want {scene}."),
    Template("paint-me", "paint me {scene}"),
    Template("create", "Create a picture with {scene}."),
    Template("mind", "would you mind drawing {scene}?", held_out=True),
    Template("render", "render {scene} for me", held_out=True),
    Template("how-about", "How about {scene}?", held_out=True),
    Template("picture-this", "Picture this: {scene}.", held_out=True),
)


def drawing_request(scene: Scene, rng: random.Random, *, held_out: bool) -> tuple[str, str]:
    """``(request, frame id)`` describing ``scene`` in words drawn from ``rng``, with the templates of one
    split (a held-out request uses a held-out frame; its object forms may be either)."""
    frame = rng.choice(split_templates(FRAMES, held_out))
    forms = OBJECT_FORMS if held_out else split_templates(OBJECT_FORMS, False)
    objects = [_describe_object(obj, rng.choice(forms), rng) for obj in scene.objects]
    described = objects[0] if len(objects) == 1 else rng.choice(CONNECTORS).join(objects)
    background = rng.choice(BACKGROUND_FORMS).format(a=_ARTICLE, c=rng.choice(COLOUR_WORDS[scene.background]))
    return _articles(frame.text.format(scene=f"{described} {background}")), frame.id


def drawing_items(count: int, rng: random.Random, *, held_out: bool) -> list[dict]:
    """``count`` chat items over the whole world (every shape, hexagon included, and both styles: the prompt
    assistant writes prompts for the LoRA demos too)."""
    items = []
    for _ in range(count):
        scene = sample_scene(rng, shapes=SHAPES, styles=STYLES)
        request, frame = drawing_request(scene, rng, held_out=held_out)
        items.append(chat_item(FAMILY, frame, request, caption(scene)))
    return items


def _describe_object(obj: ShapeObject, form: Template, rng: random.Random) -> str:
    style = rng.choice(STYLE_WORDS[obj.style])
    return form.text.format(a=_ARTICLE, size=rng.choice(SIZE_WORDS[obj.size]), style=f"{style} " if style else "",
                            colour=rng.choice(COLOUR_WORDS[obj.colour]), shape=rng.choice(SHAPE_WORDS[obj.shape]),
                            position=rng.choice(POSITION_WORDS[obj.position]))


def _articles(text: str) -> str:
    """Each article marker becomes "a" or "an" for the word after it."""
    return re.sub(f"{_ARTICLE} (\\w)", lambda m: ("an " if m.group(1) in "aeiou" else "a ") + m.group(1), text)
