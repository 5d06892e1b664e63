"""The rest of A1111 1.10's ``/sdapi/v1`` routes: prompt styles, upscalers, Extras (single and batch),
script-info, and the listings of things Atelier has none of (hypernetworks, face restorers, Real-ESRGAN
models), answered in A1111's shape so clients such as ``webuiapi`` work unchanged.

Upscaling runs on the job queue like every other piece of device work; bad input is a 422 in the
documented ``{"error", "detail"}`` shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Body

from modules.diffusion.sdapi import RequestError, decode_image, encode_png, error_response

log = logging.getLogger(__name__)


def script_info(ctx) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/script-info``: each script with its arguments in their positional order."""
    from modules.extensions.scripts import script_arg_defaults
    out = []
    for tab in ("txt2img", "img2img"):
        for alwayson, scripts in ((False, ctx.scripts.selectable(tab)), (True, ctx.scripts.alwayson(tab))):
            for script in scripts:
                defaults = script_arg_defaults(script)
                names = list(script.args or ())
                out.append({"name": script.title().lower(), "is_alwayson": alwayson, "is_img2img": tab == "img2img",
                            "args": [{"label": name, "value": defaults.get(name), "minimum": None, "maximum": None,
                                      "step": None, "choices": None} for name in names]})
    return out


def build_router(ctx) -> APIRouter:
    from modules.diffusion.styles import StyleError, style_store
    from modules.upscale.extras import ExtrasOptions
    from modules.upscale.upscalers import UpscalerError, upscalers_for

    router = APIRouter(tags=["sdapi"])

    @router.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        try:
            return [style.api_item() for style in style_store(ctx).load()]
        except StyleError as exc:
            return error_response(409, "Unreadable styles file", str(exc))

    @router.get("/sdapi/v1/upscalers")
    def upscalers():
        return [item.api_item() for item in upscalers_for(ctx).usable()]

    @router.get("/sdapi/v1/hypernetworks")
    def hypernetworks():
        return []  # Atelier loads no hypernetworks

    @router.get("/sdapi/v1/face-restorers")
    def face_restorers():
        return []  # no GFPGAN / CodeFormer

    @router.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models():
        return []  # A1111's separate RealESRGAN upscaler; Real-ESRGAN weights in models/ESRGAN are in /upscalers

    @router.get("/sdapi/v1/sd-modules")
    def sd_modules():
        return [{"model_name": v.name, "filename": v.filename} for v in ctx.diffusion.vaes() if not v.error]

    @router.get("/sdapi/v1/script-info")
    def get_script_info():
        return script_info(ctx)

    def run_extras(req: Any, images: list) -> Any:
        """Upscale *images* (list of (PIL image, name)); the API saves nothing, as in A1111."""
        from modules.upscale.extras import run_extras as run
        opts = ExtrasOptions.from_request(req)
        return opts, run(ctx, [image for image, _ in images], opts, save=False)[0]

    def answer(fn):
        try:
            return fn()
        except (RequestError, UpscalerError) as exc:
            status = getattr(exc, "status", 422)
            return error_response(status, getattr(exc, "error", "Invalid request"), str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed job is reported; the server keeps serving
            from modules.jobs import JobInterrupted
            if isinstance(exc, JobInterrupted):
                return error_response(409, "Interrupted", str(exc))
            log.exception("extras failed")
            return error_response(500, type(exc).__name__, str(exc))

    @router.post("/sdapi/v1/extra-single-image")
    def extra_single_image(req: Any = Body(...)):
        def work():
            if not isinstance(req, dict):
                raise RequestError("the request body must be a JSON object with an \"image\" field")
            opts, results = run_extras(req, [(decode_image(req.get("image"), "image"), "image")])
            return {"html_info": opts.infotext(), "image": encode_png(results[0], opts.infotext())}
        return answer(work)

    @router.post("/sdapi/v1/extra-batch-images")
    def extra_batch_images(req: Any = Body(...)):
        def work():
            if not isinstance(req, dict):
                raise RequestError("the request body must be a JSON object with an \"imageList\" field")
            items = req.get("imageList")
            if not isinstance(items, list) or not items:
                raise RequestError("imageList: give a list of {\"data\": base64 image, \"name\": file name}")
            images = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise RequestError(f"imageList[{i}]: expected {{\"data\": base64, \"name\": text}}")
                images.append((decode_image(item.get("data"), f"imageList[{i}].data"), str(item.get("name", i))))
            opts, results = run_extras(req, images)
            return {"html_info": opts.infotext(), "images": [encode_png(r, opts.infotext()) for r in results]}
        return answer(work)

    return router
