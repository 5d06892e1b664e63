"""The Extras tab and ``/sdapi/v1/extra-single-image`` / ``extra-batch-images``: upscale images as A1111's
postprocessing "Upscale" step does, with A1111's request fields.

* ``resize_mode`` 0: scale by ``upscaling_resize``; 1: to ``upscaling_resize_w x upscaling_resize_h``
  (scaled to cover that size, centre-cropped to it when ``upscaling_crop``).
* ``upscaler_1`` runs first; ``upscaler_2`` (when not "None") runs on the original too and is blended in
  with ``extras_upscaler_2_visibility`` (0..1), as in A1111. "None" for ``upscaler_1`` leaves the image
  as it is (A1111 skips the step).
* Face restoration (``gfpgan_visibility`` / ``codeformer_visibility`` > 0) is not available: asking for it
  is an error rather than a silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from modules.upscale.upscalers import UpscalerError, Upscalers

MAX_SIDE = 8192


@dataclass(frozen=True)
class ExtrasOptions:
    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> "ExtrasOptions":
        """Options from an A1111 extras request; UpscalerError naming the field for a bad value."""
        def number(name: str, default, kind, low, high):
            value = req.get(name, default)
            if value is None:
                value = default
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            if kind is int and ok and not float(value).is_integer():
                ok = False
            if not ok:
                raise UpscalerError(f"{name}={value!r}: must be a {'whole ' if kind is int else ''}number from "
                                    f"{low} to {high}")
            return kind(value)

        for name in ("gfpgan_visibility", "codeformer_visibility"):
            value = req.get(name) or 0
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value > 0:
                raise UpscalerError(f"{name}={value!r}: face restoration is not available in Atelier (GET "
                                    "/sdapi/v1/face-restorers is empty); send 0")
        names = {}
        for name in ("upscaler_1", "upscaler_2"):
            value = req.get(name) or "None"
            if not isinstance(value, str):
                raise UpscalerError(f"{name}={value!r}: must be an upscaler name from GET /sdapi/v1/upscalers")
            names[name] = value
        crop = req.get("upscaling_crop", True)
        if not isinstance(crop, bool):
            raise UpscalerError(f"upscaling_crop={crop!r}: must be true or false")
        return cls(resize_mode=number("resize_mode", 0, int, 0, 1),
                   upscaling_resize=number("upscaling_resize", 2.0, float, 1, 8),
                   upscaling_resize_w=number("upscaling_resize_w", 512, int, 1, MAX_SIDE),
                   upscaling_resize_h=number("upscaling_resize_h", 512, int, 1, MAX_SIDE),
                   upscaling_crop=crop, **names,
                   extras_upscaler_2_visibility=number("extras_upscaler_2_visibility", 0.0, float, 0, 1))

    def infotext(self) -> str:
        """What A1111 records in ``html_info`` / the PNG for the upscale step."""
        parts = [f"Postprocess upscale by: {self.upscaling_resize:g}" if self.resize_mode == 0
                 else f"Postprocess upscale to: {self.upscaling_resize_w}x{self.upscaling_resize_h}",
                 f"Postprocess upscaler: {self.upscaler_1}"]
        if self.upscaler_2 != "None" and self.extras_upscaler_2_visibility > 0:
            parts += [f"Postprocess upscaler 2: {self.upscaler_2}",
                      f"Postprocess upscaler 2 visibility: {self.extras_upscaler_2_visibility:g}"]
        return ", ".join(parts)


def target_size(image: Image.Image, opts: ExtrasOptions) -> tuple[int, int]:
    """The size the upscaler produces (before an optional crop)."""
    if opts.resize_mode == 0:
        scale = opts.upscaling_resize
    else:
        scale = max(opts.upscaling_resize_w / image.width, opts.upscaling_resize_h / image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if max(width, height) > MAX_SIDE:
        raise UpscalerError(f"the result would be {width}x{height}; at most {MAX_SIDE} pixels a side: lower "
                            "upscaling_resize or the target size")
    return width, height


def upscale_image(upscalers: Upscalers, image: Image.Image, opts: ExtrasOptions) -> Image.Image:
    """One image through the upscale step."""
    image = image.convert("RGB")
    upscalers.find(opts.upscaler_1)  # an unknown name is an error even when nothing would run
    if opts.upscaler_2 != "None":
        upscalers.find(opts.upscaler_2)
    if opts.upscaler_1 == "None":
        return image
    width, height = target_size(image, opts)
    result = upscalers.upscale(image, opts.upscaler_1, width, height)
    if opts.upscaler_2 != "None" and opts.extras_upscaler_2_visibility > 0:
        second = upscalers.upscale(image, opts.upscaler_2, width, height)
        result = Image.blend(result, second, opts.extras_upscaler_2_visibility)
    if opts.resize_mode == 1 and opts.upscaling_crop:
        w, h = opts.upscaling_resize_w, opts.upscaling_resize_h
        left, top = (result.width - w) // 2, (result.height - h) // 2
        result = result.crop((left, top, left + w, top + h))
    result.info["postprocessing"] = opts.infotext()
    return result


def run_extras(ctx, images: list[Image.Image], opts: ExtrasOptions, *, save: bool) -> tuple[list, list[str]]:
    """Upscale *images* on the job queue (device work has one owner); with *save*, each result is written
    to ``outputs/extras-images`` (as A1111's Extras tab does). Returns (images, saved paths)."""
    from modules.upscale.upscalers import upscalers_for
    ups = upscalers_for(ctx)

    def work(job):
        results, paths = [], []
        for image in images:
            result = upscale_image(ups, image, opts)
            results.append(result)
            if save:
                from modules.diffusion.outputs import ImageSaver
                saver = ImageSaver(ctx.paths.outputs_dir, ctx.callbacks, ctx)
                paths.append(str(saver.save(result, "extras-images", "extras", opts.infotext())))
        return results, paths

    return ctx.jobs.submit(work, name=f"extras: {len(images)} image(s)").result()


def options_from_form(values: dict[str, Any]) -> ExtrasOptions:
    """ExtrasOptions from the Extras tab's widget values (``resize_mode`` as its label)."""
    req = dict(values)
    if isinstance(req.get("resize_mode"), str):
        req["resize_mode"] = RESIZE_LABELS.index(req["resize_mode"])
    for key in ("upscaling_resize_w", "upscaling_resize_h"):
        if isinstance(req.get(key), float):
            req[key] = int(req[key])
    return ExtrasOptions.from_request(req)


#: the Extras tab's resize modes, by ``resize_mode`` index
RESIZE_LABELS = ("Scale by", "Scale to")
