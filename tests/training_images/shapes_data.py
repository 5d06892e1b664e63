"""A tiny captioned-shapes dataset for trainer tests: flat-coloured shapes drawn with Pillow, one caption each."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def write_shapes(folder: Path, *, size: int = 64, count: int = 6, repeats: int = 1) -> Path:
    """``folder/<repeats>_shapes/NN.png`` + ``NN.txt``: a red/blue/green square or circle on white."""
    concept = folder / f"{repeats}_shapes"
    concept.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        colour = names[i % len(names)]
        shape = "square" if (i // len(names)) % 2 == 0 else "circle"
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        image.save(concept / f"{i:02d}.png")
        (concept / f"{i:02d}.txt").write_text(f"a {colour} {shape}", encoding="utf-8")
    return folder
