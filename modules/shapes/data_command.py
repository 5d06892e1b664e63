"""make-shapes-data: write a kohya-style folder of captioned-shapes images for the image trainer.

    python -m modules.training make-shapes-data --out DIR [--n 10000] [--size 64] [--seed 0]
                                                [--concept shapes] [--repeats 1] [--shapes ...] [--styles ...]

Writes ``DIR/<repeats>_<concept>/000000.png`` with its caption in ``000000.txt`` (and so on), plus
``DIR/shapes-dataset.json`` with the settings. Base training's world unless told (no hexagon, nothing
outlined); e.g. ``--shapes hexagon --n 5`` gives DreamBooth instance images. A folder that exists is
never written into.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from modules.shapes.dataset import DatasetError, write_kohya_folder
from modules.shapes.render import RenderError
from modules.shapes.vocabulary import BASE_SHAPES, BASE_STYLES, SHAPES, STYLES, CaptionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (the concept folder goes inside)")
    parser.add_argument("--n", type=int, default=10000, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (a multiple of 8, <= 512)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same images)")
    parser.add_argument("--concept", default="shapes", help="concept name of the kohya folder")
    parser.add_argument("--repeats", type=int, default=1, help="kohya repeats (the folder's N_ prefix)")
    parser.add_argument("--shapes", nargs="+", default=list(BASE_SHAPES), metavar="SHAPE",
                        help=f"shapes to draw, of {', '.join(SHAPES)} (default: all but the held-out ones)")
    parser.add_argument("--styles", nargs="+", default=list(BASE_STYLES), metavar="STYLE",
                        help=f"styles to draw, of {', '.join(STYLES)} (default: {', '.join(BASE_STYLES)})")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        folder = write_kohya_folder(args.out, seed=args.seed, n=args.n, size=args.size, concept=args.concept,
                                    repeats=args.repeats, shapes=tuple(args.shapes), styles=tuple(args.styles))
    except (DatasetError, RenderError, CaptionError) as exc:
        print(f"make-shapes-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.n} images with captions written to {folder} in {time.perf_counter() - started:.1f} s")
    return 0
