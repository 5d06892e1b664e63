"""SD upscale (img2img): upscale the image, cut it into overlapping tiles the size of the img2img
width x height, redraw every tile with img2img, and blend the tiles back together.

A built-in script on the public Script API, like ``xyz_grid.py``. It follows A1111's
``scripts/sd_upscale.py``: every tile of one output uses the same seed; "Batch count" gives that many
outputs (seed, seed+1, ...); the seams are blended over *overlap* pixels with a linear ramp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from modules.extensions.scripts import Script


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


@dataclass
class TileGrid:
    tiles: list[list[Tile]]  # rows of tiles
    tile_w: int
    tile_h: int
    width: int
    height: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """Tiles of ``tile_w x tile_h`` covering *image*, neighbours sharing at least *overlap* pixels; the
    last row and column end flush with the image."""
    if image.width < tile_w or image.height < tile_h:
        raise ValueError(f"SD upscale: the upscaled image ({image.width}x{image.height}) is smaller than one tile "
                         f"({tile_w}x{tile_h}, the img2img width x height); raise the scale factor or lower the "
                         "width and height")
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"SD upscale: tile overlap must be from 0 to less than the tile size "
                         f"({min(tile_w, tile_h)}), got {overlap}")
    cols = max(1, math.ceil((image.width - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((image.height - overlap) / (tile_h - overlap)))
    dx = (image.width - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (image.height - tile_h) / (rows - 1) if rows > 1 else 0
    grid = []
    for r in range(rows):
        y = min(int(r * dy), image.height - tile_h)
        row = []
        for c in range(cols):
            x = min(int(c * dx), image.width - tile_w)
            row.append(Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.append(row)
    return TileGrid(grid, tile_w, tile_h, image.width, image.height, overlap)


def _ramp(length: int, across: int, horizontal: bool) -> Image.Image:
    ramp = (np.arange(length, dtype=np.float32) * 255 / max(1, length)).astype(np.uint8)
    array = np.repeat(ramp[None, :], across, 0) if horizontal else np.repeat(ramp[:, None], across, 1)
    return Image.fromarray(array, "L")


def combine_grid(grid: TileGrid) -> Image.Image:
    """The tiles pasted back; each tile's first *overlap* pixels fade in over its left/upper neighbour."""
    ov = grid.overlap
    out = Image.new("RGB", (grid.width, grid.height))
    for row in grid.tiles:
        y = row[0].y
        strip = Image.new("RGB", (grid.width, grid.tile_h))
        for tile in row:
            img = tile.image.convert("RGB").resize((grid.tile_w, grid.tile_h))
            if tile.x == 0 or ov == 0:
                strip.paste(img, (tile.x, 0))
                continue
            strip.paste(img.crop((0, 0, ov, grid.tile_h)), (tile.x, 0), _ramp(ov, grid.tile_h, True))
            strip.paste(img.crop((ov, 0, grid.tile_w, grid.tile_h)), (tile.x + ov, 0))
        if y == 0 or ov == 0:
            out.paste(strip, (0, y))
            continue
        out.paste(strip.crop((0, 0, grid.width, ov)), (0, y), _ramp(ov, grid.width, False))
        out.paste(strip.crop((0, ov, grid.width, grid.tile_h)), (0, y + ov))
    return out


class SDUpscale(Script):
    #: positional ``script_args`` order (A1111 clients send [info, overlap, upscaler index, scale]; we take
    #: the upscaler by name)
    args = ("overlap", "upscaler", "scale_factor")

    def title(self) -> str:
        return "SD upscale"

    def show(self, tab: str) -> bool:
        return tab == "img2img"

    def _upscalers(self):
        from modules.upscale.upscalers import upscalers_for
        if self.ctx is None:
            raise RuntimeError("SD upscale needs the app context to find models/ESRGAN; load it through the "
                               "app's ScriptRunner")
        return upscalers_for(self.ctx)

    def ui(self, tab: str) -> dict[str, Any]:
        import gradio as gr
        from modules.upscale.upscalers import BUILTIN_UPSCALERS
        names = self._upscalers().names() if self.ctx is not None else list(BUILTIN_UPSCALERS)
        gr.Markdown("Will upscale the image by the selected scale factor; use width and height sliders to set "
                    "tile size")
        return {
            "overlap": gr.Slider(0, 256, value=64, step=16, label="Tile overlap", elem_id=f"{tab}_sd_upscale_overlap"),
            "scale_factor": gr.Slider(1, 4, value=2, step=0.05, label="Scale Factor",
                                      elem_id=f"{tab}_sd_upscale_scale_factor"),
            "upscaler": gr.Radio(names, value="Lanczos" if "Lanczos" in names else names[0], label="Upscaler",
                                 elem_id=f"{tab}_sd_upscale_upscaler"),
        }

    def run(self, p: Any, overlap: int = 64, upscaler: str = "Lanczos", scale_factor: float = 2.0,
            **_: Any) -> Any:
        from modules.diffusion.processing import Processed, resolve_seed
        if not p.init_images:
            raise ValueError("SD upscale works on img2img: give an init image")
        if not isinstance(scale_factor, (int, float)) or not 1 <= scale_factor <= 8:
            raise ValueError(f"SD upscale: scale_factor must be from 1 to 8, got {scale_factor!r}")
        source = p.init_images[0].convert("RGB")
        width, height = round(source.width * scale_factor), round(source.height * scale_factor)
        upscaled = self._upscalers().upscale(source, upscaler, width, height)
        grid = split_grid(upscaled, p.width, p.height, int(overlap))
        tiles = [tile for row in grid.tiles for tile in row]
        originals = [tile.image for tile in tiles]
        seed = resolve_seed(p.seed)
        outputs, infotexts, seeds, paths, last = [], [], [], [], None
        for n in range(max(1, p.n_iter)):
            done = []
            for start in range(0, len(tiles), p.batch_size):
                batch = tiles[start:start + p.batch_size]
                q = p.copy(init_images=originals[start:start + len(batch)], batch_size=len(batch), n_iter=1, seed=seed + n,
                           resize_mode=0, mask=None, script_name=None, script_args={}, save_images=False)
                q.runner = p.runner
                last = q.process()
                if len(last.images) < len(batch):  # interrupted: return what is finished
                    return self._result(p, outputs, infotexts, seeds, paths, last, Processed)
                done.extend(last.images[:len(batch)])
            for tile, image in zip(tiles, done):
                tile.image = image
            outputs.append(combine_grid(grid))
            infotexts.append(last.infotexts[0] if last.infotexts else "")
            seeds.append(seed + n)
            if p.save_images and self.ctx is not None:
                from modules.diffusion.outputs import ImageSaver
                saver = ImageSaver(self.ctx.paths.outputs_dir, self.ctx.callbacks, self.ctx)
                paths.append(str(saver.save(outputs[-1], "img2img-images", seed + n, infotexts[-1])))
        return self._result(p, outputs, infotexts, seeds, paths, last, Processed)

    @staticmethod
    def _result(p, images, infotexts, seeds, paths, last, processed_cls):
        for image, text in zip(images, infotexts):
            image.info["parameters"] = text
        return processed_cls(images=images, infotexts=infotexts, seeds=seeds, subseeds=[], prompts=[], paths=paths,
                             negative_prompts=[], params=p, model_name=getattr(last, "model_name", ""),
                             model_hash=getattr(last, "model_hash", ""),
                             warnings=list(getattr(last, "warnings", []) or []),
                             interrupted=bool(getattr(last, "interrupted", False)))
