"""A1111-compatible image routes under ``/sdapi/v1``: txt2img, img2img, png-info and the listings.

Payloads use A1111's field names (see ``GenerationParams``). Responses match
A1111: ``{images: [base64 PNG with the parameters chunk], parameters: <request>,
info: <JSON string>}``. Bad input is a 4xx in A1111's error shape ``{"error", "detail", "body", "errors"}``
(``errors`` maps each bad field to its problem; types are strict: ``steps: true`` or ``denoising_strength: "x"``
are 422s naming the field);
generation runs on the shared job queue, so API and UI requests are served in
arrival order and an error in one request never takes the server down.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import warnings
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from modules.job_owner import api_owner

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client mistake: answered with *status* and a JSON message; *errors* maps fields to problems."""

    def __init__(self, detail: str, status: int = 422, error: str = "Invalid request",
                 errors: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail, self.status, self.error, self.errors = detail, status, error, errors or {}


def error_response(status: int, error: str, detail: str, errors: dict[str, str] | None = None) -> JSONResponse:
    from modules.api.errors import sdapi_error
    return sdapi_error(status, error, detail, errors=errors)


#: JSON types a GenerationParams field accepts, by its annotation (strict: a bool is not an int)
#: (objects and lists have their own checks in params_from_request: A1111 clients send ``script_args: []``)
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "str | None": (str,)}
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
               "str | None": "a string"}
#: int fields where A1111 also takes a boolean
_BOOL_AS_INT = {"inpainting_mask_invert"}


def check_field_types(data: dict[str, Any]) -> None:
    """RequestError (422) naming every field whose JSON type is wrong, or whose text holds a lone surrogate."""
    from dataclasses import fields

    from modules.diffusion.processing import GenerationParams
    errors = {}
    for f in fields(GenerationParams):
        if f.name not in data or data[f.name] is None or f.type not in _FIELD_TYPES:
            continue
        value = data[f.name]
        if f.type == "int" and isinstance(value, float) and value.is_integer():
            continue  # 20.0 is 20 (JavaScript clients send integral floats)
        ok = isinstance(value, _FIELD_TYPES[f.type]) and not (
            isinstance(value, bool) and f.type in ("int", "float") and f.name not in _BOOL_AS_INT)
        if not ok:
            errors[f.name] = f"expected {_TYPE_WORDS[f.type]}, got {json_type(value)} {value!r:.60}"
        elif isinstance(value, str) and has_lone_surrogate(value):
            errors[f.name] = "the text holds a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode"
    if errors:
        raise RequestError("; ".join(f"{k}: {v}" for k, v in errors.items()), errors=errors)


#: A1111 request fields Atelier has no feature behind, with the values that mean "off" (A1111's defaults, which
#: clients such as webuiapi always send). Any other value is a 422 naming the field, never silently ignored.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "restore_faces": ((False,), "Atelier has no face restoration"),
    "tiling": ((False,), "tiling (seamless textures) is not implemented"),
    "s_churn": ((0,), "sampler noise parameters (s_churn, s_tmin, s_tmax, s_noise) are not implemented"),
    "s_tmin": ((0,), "sampler noise parameters (s_churn, s_tmin, s_tmax, s_noise) are not implemented"),
    "s_tmax": ((0, float("inf")), "sampler noise parameters (s_churn, s_tmin, s_tmax, s_noise) are not implemented"),
    "s_noise": ((1,), "sampler noise parameters (s_churn, s_tmin, s_tmax, s_noise) are not implemented"),
    "s_min_uncond": ((0,), "s_min_uncond (skipping the negative prompt early) is not implemented"),
    "initial_noise_multiplier": ((1,), "initial_noise_multiplier is not implemented"),
    "hr_checkpoint_name": (("", "Use same checkpoint"), "hires fix with another checkpoint is not implemented"),
    "hr_sampler_name": (("", "Use same sampler"), "hires fix with another sampler is not implemented"),
    "hr_scheduler": (("", "Use same scheduler"), "hires fix with another scheduler is not implemented"),
    "hr_prompt": (("",), "a separate hires-fix prompt is not implemented"),
    "hr_negative_prompt": (("",), "a separate hires-fix negative prompt is not implemented"),
    "refiner_checkpoint": (("", "None"), "the SDXL refiner is not implemented"),
    "refiner_switch_at": ((0,), "the SDXL refiner is not implemented"),
    "disable_extra_networks": ((False,), "disable_extra_networks is not implemented"),
    "firstphase_width": ((0,), "firstphase_width/height (old hires fix) are not implemented: use hr_scale"),
    "firstphase_height": ((0,), "firstphase_width/height (old hires fix) are not implemented: use hr_scale"),
}


def check_unsupported_fields(data: dict[str, Any]) -> None:
    """RequestError (422) naming each A1111 field that asks for something Atelier does not do."""
    errors = {}
    for name, (off, why) in UNSUPPORTED_FIELDS.items():
        value = data.get(name)
        if value is None or any(_same(value, v) for v in off):
            continue
        errors[name] = f"{why}; send {off[0]!r} or leave it out (got {value!r:.60})"
    if errors:
        raise RequestError("; ".join(f"{k}: {v}" for k, v in errors.items()), errors=errors)


def _same(a: Any, b: Any) -> bool:
    """Equal JSON values, where a boolean equals only a boolean (``0 == False`` in Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def check_prompt_size(data: dict[str, Any], limit: int) -> None:
    """413 naming the field when a prompt is longer than the ``api.max_prompt_chars`` setting."""
    for key in ("prompt", "negative_prompt"):
        value = data.get(key)
        if isinstance(value, str) and len(value) > limit:
            raise RequestError(f"{key}: {len(value)} characters is more than the limit of {limit} "
                               "(setting api.max_prompt_chars)", status=413, error="Prompt too long",
                               errors={key: f"longer than {limit} characters"})


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
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its pixel limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"{field}: the image is too large to decode safely ({exc}); send at most "
                           f"{Image.MAX_IMAGE_PIXELS} pixels", status=413, error="Image too large",
                           errors={field: "image too large"}) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"{field}: the base64 data is not a readable image ({type(exc).__name__}: {exc}); "
                           "send a PNG, JPEG or WebP file") from None
    return image


def check_override_settings(ctx, overrides: Any) -> None:
    """422 naming ``override_settings.<option>`` for a value the option (or setting) itself would refuse, with the
    same validation as ``POST /sdapi/v1/options``; nothing is applied here."""
    if not isinstance(overrides, dict):
        return  # params_from_request says what is wrong with it
    from modules.settings import SettingTypeError
    errors = {}
    for key, value in overrides.items():
        found = ctx.api.option_for(key)
        try:
            if found is not None and not found[1].read_only:
                found[1].check(value)
            elif key in ctx.settings.as_dict():
                ctx.settings.spec(key).validate(value)
        except (SettingTypeError, ValueError) as exc:
            errors[f"override_settings.{key}"] = str(exc)
    if errors:
        raise RequestError("; ".join(f"{k}: {v}" for k, v in errors.items()), errors=errors)


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
    check_field_types(req)
    check_unsupported_fields(req)
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
    if isinstance(args, list):  # A1111's positional form: mapped onto the script's declared order on submit
        data["script_args"] = args if data.get("script_name") else {}
    elif args is not None and not isinstance(args, dict):
        raise RequestError("script_args must be an object of the script's values by name, or a list in the "
                           "order the script declares (GET /sdapi/v1/script-info)")
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
    check_field_types(data)  # again: the infotext may have filled fields
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
            if isinstance(req, dict):
                check_prompt_size(req, ctx.settings.get("api.max_prompt_chars"))
                check_override_settings(ctx, req.get("override_settings"))
            p = params_from_request(req, img2img=img2img)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))  # who may interrupt it
            processed = service().generate(p, img2img=img2img, owner=owner)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail, exc.errors)
        except Exception as exc:  # noqa: BLE001 - a failed job is reported; the server keeps serving
            from modules.api.client_errors import classify
            from modules.diffusion.processing import InvalidGenerationParams
            status, error, detail = classify(exc)
            if isinstance(exc, ValueError) and status == 422:
                error = "Invalid generation parameters"
            if status >= 500:
                log.exception("generation failed")
            fields = exc.errors if isinstance(exc, InvalidGenerationParams) else None
            return error_response(status, error, detail, fields)
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
            return error_response(exc.status, exc.error, exc.detail, exc.errors)
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
        return [_lora_item(item) for item in service().loras() if not item.error]

    @router.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        service().loras(refresh=True)
        return {}

    @router.get("/atelier/v1/broken-models", tags=["atelier"])
    def broken_models():
        """Model files that cannot be used, by models/ folder, each with the reason (A1111's lists omit them)."""
        return service().broken_files()

    @router.get("/sdapi/v1/embeddings")
    def embeddings():
        loaded = {}
        skipped = {}
        for item in service().embeddings():
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
