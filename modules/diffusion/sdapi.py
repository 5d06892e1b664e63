"""A1111-compatible image routes under ``/sdapi/v1``: txt2img, img2img, png-info and the listings.

Payloads use A1111's field names (see ``GenerationParams``). Responses match
A1111: ``{images: [base64 PNG with the parameters chunk], parameters: <request>,
info: <JSON string>}``. Bad input is a 4xx JSON ``{"error": ..., "detail": ...}``;
generation runs on the shared job queue, so API and UI requests are served in
arrival order and an error in one request never takes the server down.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from modules.job_owner import api_owner

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client mistake: answered with *status* and a JSON message."""

    def __init__(self, detail: str, status: int = 422, error: str = "Invalid request"):
        super().__init__(detail)
        self.detail, self.status, self.error = detail, status, error


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})


def decode_image(data: Any, field: str):
    """A PIL image from base64 (optionally a ``data:`` URI); RequestError naming *field* otherwise."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field}: expected a base64-encoded image string, got {type(data).__name__}")
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{field}: not valid base64 ({exc}); send the image file's bytes base64-encoded, "
                           "optionally as a data:image/png;base64,... URI") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"{field}: the base64 data is not a readable image ({type(exc).__name__}: {exc}); "
                           "send a PNG, JPEG or WebP file") from None
    return image


def encode_png(image, infotext: str | None = None) -> str:
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def params_from_request(req: dict[str, Any], *, img2img: bool):
    """GenerationParams from an A1111 request body (legacy ``sampler_index``, list ``script_args``...)."""
    from modules.diffusion.infotext import params_from_infotext, parse_generation_parameters
    from modules.diffusion.processing import GenerationParams
    if not isinstance(req, dict):
        raise RequestError("the request body must be a JSON object")
    data = dict(req)
    if data.get("infotext"):
        base = params_from_infotext(parse_generation_parameters(str(data["infotext"])))
        for key, value in base.items():
            if key in GenerationParams.__dataclass_fields__ and key not in req:
                data[key] = value
    if not data.get("sampler_name") and data.get("sampler_index"):
        data["sampler_name"] = data["sampler_index"]
    if data.get("sampler_name") in (None, ""):
        data.pop("sampler_name", None)
    if data.get("scheduler") in (None, ""):
        data.pop("scheduler", None)
    args = data.get("script_args")
    if isinstance(args, list):
        if args:
            raise RequestError("script_args: Atelier takes the script's values by name, as an object "
                               "{\"name\": value}, not a positional list")
        data["script_args"] = {}
    elif args is not None and not isinstance(args, dict):
        raise RequestError("script_args must be an object of the script's values by name")
    alwayson = data.get("alwayson_scripts") or {}
    if not isinstance(alwayson, dict):
        raise RequestError("alwayson_scripts must be an object {script title: {args: {name: value}}}")
    data["alwayson_scripts"] = {title: (v.get("args") if isinstance(v, dict) and "args" in v else v) or {}
                                for title, v in alwayson.items()}
    if not isinstance(data.get("override_settings") or {}, dict):
        raise RequestError("override_settings must be an object {option: value}")
    data.setdefault("save_images", False)  # A1111's API default
    if img2img:
        images = data.get("init_images")
        if not isinstance(images, list) or not images:
            raise RequestError("init_images: img2img needs a list with at least one base64-encoded image")
        data["init_images"] = [decode_image(img, f"init_images[{i}]") for i, img in enumerate(images)]
        if data.get("mask"):
            data["mask"] = decode_image(data["mask"], "mask")
        else:
            data["mask"] = None
        if isinstance(data.get("inpainting_mask_invert"), bool):
            data["inpainting_mask_invert"] = int(data["inpainting_mask_invert"])
    else:
        data["init_images"], data["mask"] = [], None
    for key in ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "mask_blur",
                "inpaint_full_res_padding", "hr_second_pass_steps", "resize_mode", "inpainting_fill",
                "hr_resize_x", "hr_resize_y"):
        value = data.get(key)
        if isinstance(value, float) and value.is_integer():
            data[key] = int(value)
    try:
        return GenerationParams.from_dict(data)
    except TypeError as exc:
        raise RequestError(f"bad field: {exc}") from None


def _echo(req: dict[str, Any]) -> dict[str, Any]:
    out = dict(req)
    for key in ("init_images", "mask"):
        if key in out:
            out[key] = None
    return out


def build_router(ctx) -> APIRouter:
    router = APIRouter(tags=["sdapi"])

    def service():
        return ctx.diffusion

    def generate(req: dict[str, Any], img2img: bool, request: Request) -> Any:
        try:
            p = params_from_request(req, img2img=img2img)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))  # who may interrupt it
            processed = service().generate(p, img2img=img2img, owner=owner)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except ValueError as exc:
            return error_response(422, "Invalid generation parameters", str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed job is reported; the server keeps serving
            from modules.jobs import JobInterrupted
            if isinstance(exc, JobInterrupted):
                return error_response(409, "Interrupted", str(exc))
            log.exception("generation failed")
            return error_response(500, type(exc).__name__, str(exc))
        send = req.get("send_images", True) if isinstance(req, dict) else True
        images = [encode_png(img, img.info.get("parameters")) for img in processed.images] if send else []
        return {"images": images, "parameters": _echo(req), "info": processed.js()}

    @router.post("/sdapi/v1/txt2img")
    def txt2img(request: Request, req: Any = Body(...)):
        return generate(req, img2img=False, request=request)

    @router.post("/sdapi/v1/img2img")
    def img2img(request: Request, req: Any = Body(...)):
        return generate(req, img2img=True, request=request)

    @router.post("/sdapi/v1/png-info")
    def png_info(req: Any = Body(...)):
        from modules.diffusion.infotext import parse_generation_parameters, read_info_from_image
        try:
            if not isinstance(req, dict):
                raise RequestError("the request body must be {\"image\": base64}")
            image = decode_image(req.get("image"), "image")
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        text, items = read_info_from_image(image)
        params = parse_generation_parameters(text) if text else {}
        return {"info": text or "", "items": {**items, **({"parameters": text} if text else {})},
                "parameters": params}

    @router.get("/sdapi/v1/samplers")
    def samplers():
        from modules.diffusion.samplers import sampler_aliases
        return sampler_aliases()

    @router.get("/sdapi/v1/schedulers")
    def schedulers():
        from modules.diffusion.samplers import schedulers_api
        return schedulers_api()

    @router.get("/sdapi/v1/upscalers")
    def upscalers():
        from modules.diffusion.images import PIL_UPSCALERS
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in PIL_UPSCALERS]

    @router.get("/sdapi/v1/latent-upscale-modes")
    def latent_modes():
        from modules.diffusion.images import LATENT_UPSCALE_MODES
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @router.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": c.title, "model_name": c.model_name, "hash": c.shorthash, "sha256": c.sha256,
                 "filename": c.filename, "config": None} for c in service().usable_checkpoints()]

    @router.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return [{"model_name": v.name, "filename": v.filename} for v in service().vaes() if not v.error]

    @router.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        service().checkpoints(refresh=True)
        return {}

    @router.post("/sdapi/v1/refresh-vae")
    def refresh_vae():
        service().vaes(refresh=True)
        return {}

    @router.get("/sdapi/v1/loras")
    def loras():
        from modules.diffusion.lora import list_loras
        return [_lora_item(item) for item in list_loras(ctx.paths.model_dir("Lora"))]

    @router.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        from modules.diffusion.lora import list_loras
        list_loras(ctx.paths.model_dir("Lora"))
        return {}

    @router.get("/sdapi/v1/embeddings")
    def embeddings():
        from modules.diffusion.embeddings import list_embeddings
        loaded = {}
        skipped = {}
        for item in list_embeddings(ctx.paths.model_dir("embeddings")):
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": next(iter(item.dims.values()), None) if item.dims else None, "vectors": item.vectors}
            (skipped if item.error else loaded)[item.name] = entry
        return {"loaded": loaded, "skipped": skipped}

    @router.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [s.title().lower() for s in ctx.scripts.selectable("txt2img")],
                "img2img": [s.title().lower() for s in ctx.scripts.selectable("img2img")]}

    return router


def _lora_item(item: Any) -> dict[str, Any]:
    """An A1111 ``/sdapi/v1/loras`` item ``{name, alias, path, metadata}``."""
    if hasattr(item, "api_item"):
        return item.api_item()
    return {"name": item.name, "alias": getattr(item, "alias", item.name), "path": item.filename, "metadata": {}}
