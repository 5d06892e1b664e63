"""Which upscalers exist and how an image is upscaled with one, as A1111's ``modules/upscaler.py`` does.

Built in: None (no upscaling: a plain Lanczos resize to the target size, as in A1111), Lanczos, Nearest
and Bicubic. Models: ESRGAN-family files in ``models/ESRGAN``. ``.safetensors`` always load; ``.pth``
files are pickles and load only with ``--allow-unsafe-pickle``, and even then through
``torch.load(weights_only=True)``, which refuses anything but tensors. A file that cannot be used is
listed with its reason and never breaks the listing.

Scanning is cheap (names and sizes only), so each call rescans; nothing is cached between requests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

#: Upscalers that need no model file, in A1111's order.
BUILTIN_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                     "Nearest": Image.Resampling.NEAREST, "Bicubic": Image.Resampling.BICUBIC}
MODEL_SUFFIXES = (".safetensors", ".pth")
#: A1111's ESRGAN tile size and overlap (settings ``ESRGAN_tile`` / ``ESRGAN_tile_overlap``)
TILE, TILE_OVERLAP = 192, 8


class UpscalerError(ValueError):
    """A client-facing problem with an upscaler name or file (answered as a 4xx)."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    path: Path | None = None
    #: the model's own scale (4 for the built-ins, as A1111 reports them); None when the file is unusable
    scale: int | None = 4
    error: str | None = None

    def api_item(self) -> dict[str, Any]:
        """An A1111 ``/sdapi/v1/upscalers`` item."""
        return {"name": self.name, "model_name": self.path.stem if self.path else None,
                "model_path": str(self.path) if self.path else None, "model_url": None, "scale": self.scale}


class Upscalers:
    """The upscalers of one data dir. *allow_unsafe_pickle* is the ``--allow-unsafe-pickle`` flag."""

    def __init__(self, folder: Path, *, allow_unsafe_pickle: bool = False, device: Any = "cpu"):
        self.folder = Path(folder)
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.device = device

    def list(self) -> list[UpscalerInfo]:
        """Built-ins first, then every model file (usable or with its reason)."""
        items = [UpscalerInfo(name) for name in BUILTIN_UPSCALERS]
        if self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
                    items.append(self._describe(path))
        return items

    def usable(self) -> list[UpscalerInfo]:
        return [item for item in self.list() if not item.error]

    def names(self) -> list[str]:
        return [item.name for item in self.usable()]

    def find(self, name: str) -> UpscalerInfo:
        items = self.list()
        for item in items:
            if item.name == name or (item.path is not None and name in (item.path.name, item.path.stem)):
                if item.error:
                    raise UpscalerError(f"upscaler {name!r} cannot be used: {item.error}")
                return item
        lowered = [item for item in items if item.name.lower() == str(name).lower() and not item.error]
        if lowered:
            return lowered[0]
        valid = ", ".join(item.name for item in items if not item.error)
        raise UpscalerError(f"unknown upscaler {name!r}; GET /sdapi/v1/upscalers lists them (now: {valid})")

    def _describe(self, path: Path) -> UpscalerInfo:
        if path.suffix.lower() == ".pth" and not self.allow_unsafe_pickle:
            return UpscalerInfo(path.stem, path, None, "a .pth file is a pickle and loads only with "
                                                       "--allow-unsafe-pickle; convert it to .safetensors")
        try:
            from modules.upscale.rrdb import canonical_state_dict, infer_shape
            return UpscalerInfo(path.stem, path, infer_shape(canonical_state_dict(self._shapes(path))).scale)
        except Exception as exc:  # noqa: BLE001 - a broken file is listed with its reason, never raised
            log.warning("upscaler %s is unusable: %s", path, exc)
            return UpscalerInfo(path.stem, path, None, f"{type(exc).__name__}: {exc}")

    def _shapes(self, path: Path) -> dict:
        """The file's tensors as shape-only ``meta`` tensors: enough to check the layout and read the scale
        without reading the weights."""
        if path.suffix.lower() != ".safetensors":
            return self._read(path)
        import torch
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}

    def _read(self, path: Path) -> dict:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        import torch
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a state dict, found {type(state).__name__}")
        return state

    def load(self, info: UpscalerInfo):
        from modules.upscale.rrdb import build_rrdb
        return build_rrdb(self._read(info.path)).to(self.device)

    # -- applying ------------------------------------------------------------------------
    def upscale(self, image: Image.Image, name: str, width: int, height: int) -> Image.Image:
        """*image* upscaled with *name* to exactly ``width x height``: a model runs (up to three passes, as
        in A1111) until the image is at least that large, then Lanczos fits it."""
        info = self.find(name)
        image = image.convert("RGB")
        if info.path is None:
            return image.resize((width, height), BUILTIN_UPSCALERS[info.name])
        if width <= image.width and height <= image.height:
            return image.resize((width, height), Image.Resampling.LANCZOS)
        net = self.load(info)
        for _ in range(3):
            if image.width >= width and image.height >= height:
                break
            before = image.size
            image = run_tiled(net, image)
            if image.size == before:  # a 1x model: one pass is all it does
                break
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def run_tiled(net, image: Image.Image, tile: int = TILE, overlap: int = TILE_OVERLAP) -> Image.Image:
    """*net* over *image* in ``tile``-sized pieces, each with *overlap* pixels of context that are cut off
    again, so memory stays bounded for any image size and the seams see their neighbours."""
    import numpy as np
    import torch
    param = next(net.parameters())
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    scale = net.scale
    _, _, h, w = x.shape
    out = torch.zeros(1, 3, h * scale, w * scale)
    with torch.inference_mode():
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                bottom, right = min(top + tile, h), min(left + tile, w)
                t0, l0 = max(0, top - overlap), max(0, left - overlap)
                b0, r0 = min(h, bottom + overlap), min(w, right + overlap)
                piece = net(x[:, :, t0:b0, l0:r0].to(param.device, param.dtype)).float().cpu()
                dy, dx = (top - t0) * scale, (left - l0) * scale
                out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                    piece[:, :, dy:dy + (bottom - top) * scale, dx:dx + (right - left) * scale]
    array = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(array, "RGB")


def upscalers_for(ctx) -> Upscalers:
    """The upscalers of the app's ``models/ESRGAN`` folder, honouring ``--allow-unsafe-pickle``."""
    return Upscalers(ctx.paths.model_dir("ESRGAN"),
                     allow_unsafe_pickle=bool(getattr(ctx.opts, "allow_unsafe_pickle", False)),
                     device=ctx.devices.device)
