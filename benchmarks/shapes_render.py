"""Captioned-shapes generator speed, as a table: images per minute at each size, one process and N processes.

    python benchmarks/shapes_render.py [--images 20000] [--processes 2] [--sizes 64 128 512]

Each process renders its share of examples of one seed (every shape and style, jittered) through
:func:`modules.shapes.dataset.render_example`, the path the classifier's training and the dataset writer use;
"+png" adds encoding each image as PNG, which the kohya folder writer also does. On a machine where other
work shares the cores (for instance under ``nice -n 19``) the figures are a lower bound.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.shapes.dataset import render_example  # noqa: E402
from modules.shapes.vocabulary import SHAPES, STYLES  # noqa: E402


def render_range(task: tuple[int, int, int, bool]) -> int:
    start, stop, size, png = task
    for index in range(start, stop):
        image, _ = render_example(0, index, size, shapes=SHAPES, styles=STYLES)
        if png:
            image.save(io.BytesIO(), format="PNG", compress_level=1)
    return stop - start


def images_per_minute(n: int, size: int, processes: int, png: bool) -> float:
    chunks = [(i * n // processes, (i + 1) * n // processes, size, png) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(render_range, [(0, 10, size, png)] * processes))      # start-up and imports, not timed
        started = time.perf_counter()
        done = sum(pool.map(render_range, chunks))
    return done / (time.perf_counter() - started) * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="images per measurement at 64 px (fewer above)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 512])
    args = parser.parse_args()
    print(f"{'size':>5} {'output':>7} {'1 process /min':>15} {f'{args.processes} processes /min':>17}")
    for size in args.sizes:
        n = max(200, args.images * 64 * 64 // (size * size))
        for png in (False, True):
            one = images_per_minute(n, size, 1, png)
            many = images_per_minute(n, size, args.processes, png)
            print(f"{size:>5} {'+png' if png else 'PIL':>7} {one:>15,.0f} {many:>17,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
