"""Saving generated images where A1111 users look for them, atomically and without overwriting.

Layout: ``outputs/<kind>/YYYY-MM-DD/NNNNN-SEED.png`` with the infotext in the PNG
``parameters`` text chunk. The number is one past the highest number already in
the folder. Each file is written to a temporary name first, so a reader never
sees a half-written PNG, and then *hard-linked* to its final name: ``link`` fails
instead of replacing an existing file. Picking the number and linking happen
under an advisory lock on ``.atelier-save.lock`` in the folder, so concurrent
writers (threads or processes) never share a number.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_NUMBERED = re.compile(r"^(\d+)-")
LOCK_NAME = ".atelier-save.lock"


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """flock on a fresh open file: it excludes other processes *and* other threads of this one (each open()
    is its own lock owner). Without fcntl (Windows) the hard link alone still prevents overwriting."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / LOCK_NAME, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def png_bytes_info(infotext: str | None) -> PngInfo:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    return info


def next_number(folder: Path) -> int:
    """One past the largest ``NNNNN-`` prefix in *folder* (0 for an empty or missing folder)."""
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            highest = max(highest, int(m.group(1)))
    return highest + 1


def save_png_atomic(image: Image.Image, folder: Path, stem_suffix: str, infotext: str | None,
                    *, max_tries: int = 1000) -> Path:
    """Write *image* as ``folder/NNNNN-<stem_suffix>.png``, never replacing an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".saving-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=png_bytes_info(infotext))
            fh.flush()
            os.fsync(fh.fileno())
        with _folder_lock(folder):
            number = next_number(folder)
            for _ in range(max_tries):
                target = folder / f"{number:05d}-{stem_suffix}.png"
                try:
                    os.link(tmp, target)
                    return target
                except FileExistsError:
                    number += 1
        raise RuntimeError(f"could not find a free file name in {folder} after {max_tries} tries")
    finally:
        Path(tmp).unlink(missing_ok=True)


class ImageSaver:
    """Saves one job's images under a data dir's outputs, firing the image-saved callbacks."""

    def __init__(self, outputs_root: Path, callbacks: Any = None, ctx: Any = None):
        self.outputs_root = Path(outputs_root)
        self.callbacks = callbacks
        self.ctx = ctx

    def folder(self, kind: str, day: _dt.date | None = None) -> Path:
        day = day or _dt.date.today()
        return self.outputs_root / kind / day.strftime("%Y-%m-%d")

    def save(self, image: Image.Image, kind: str, seed: int | str, infotext: str | None) -> Path:
        """Save into ``<kind>/<today>/``. ``on_before_image_saved`` gets the planned path (a concurrent
        writer may take that number first; the file then gets the next one), ``on_image_saved`` the final."""
        folder = self.folder(kind)
        if self.callbacks is not None:
            planned = folder / f"{next_number(folder):05d}-{seed}.png"
            self.callbacks.fire("on_before_image_saved", image=image, path=str(planned), infotext=infotext,
                                ctx=self.ctx)
        path = save_png_atomic(image, folder, str(seed), infotext)
        if self.callbacks is not None:
            self.callbacks.fire("on_image_saved", image=image, path=str(path), infotext=infotext, ctx=self.ctx)
        return path


def image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Lay out *images* in a near-square grid: about sqrt(n) rows, fewer until the rows come out even."""
    if not images:
        raise ValueError("image_grid: no images given; generate at least one image first")
    n = len(images)
    if rows is None:
        rows = max(1, round(n ** 0.5))
        while n % rows:
            rows -= 1
    cols = (n + rows - 1) // rows
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)) if img.size != (w, h) else img.convert("RGB"),
                   ((i % cols) * w, (i // cols) * h))
    return grid
