"""Generation parameters as text ("infotext"), in AUTOMATIC1111's exact format, and back.

A1111 users paste these strings between tools, sites and the PNG Info tab, so the
format is kept byte for byte: the prompt (any number of lines), an optional
``Negative prompt: ...`` line, then one line of ``Key: value`` pairs joined by
``", "`` in A1111's key order, with values that contain ``,``, ``:`` or a newline
JSON-quoted. Parsing follows ``parse_generation_parameters``: the last line is the
parameter line only if it holds at least three pairs, quoted values are
``json.loads``-ed, ``WxH`` values split into ``Key-1``/``Key-2``, and missing keys
get A1111's defaults. Values stay strings, as in A1111.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable

#: A1111's parameter regex (``infotext_utils.re_param_code``).
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

#: The fixed keys of ``create_infotext`` in order; anything else (hires, Lora hashes...) follows them,
#: then ``Version`` and ``User`` close the line.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD",
    "Token merging ratio", "Init image hash", "RNG", "Tiling",
)
TAIL_KEYS = ("Version", "User")

#: Defaults ``parse_generation_parameters`` fills in for keys an infotext does not carry.
PARSE_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Emphasis": "Original",
}


def quote(value: Any) -> Any:
    """JSON-quote a value that would otherwise break the ``k: v, k: v`` line (A1111's ``quote``)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_number(value: Any) -> Any:
    """Write floats that are whole numbers as A1111 does for sliders given ints (``7`` not ``7.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def ordered_params(params: dict[str, Any]) -> dict[str, Any]:
    """Put *params* in A1111's key order: fixed keys, the extra keys as given, then Version/User."""
    out: dict[str, Any] = {}
    for key in KEY_ORDER:
        if key in params:
            out[key] = params[key]
    for key, value in params.items():
        if key not in out and key not in TAIL_KEYS:
            out[key] = value
    for key in TAIL_KEYS:
        if key in params:
            out[key] = params[key]
    return out


def create_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Build the infotext string. Pairs whose value is None are dropped; a key equal to its value is
    written bare (A1111's convention for flags)."""
    pairs = []
    for key, value in ordered_params(params).items():
        if value is None:
            continue
        value = format_number(value)
        pairs.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def join_hashes(pairs: Iterable[tuple[str, str]]) -> str | None:
    """``Lora hashes`` / ``TI hashes`` value: ``"name: hash, name2: hash2"`` (None when empty)."""
    items = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in pairs if h]
    return ", ".join(items) or None


def parse_generation_parameters(text: str, skip_fields: Iterable[str] = ()) -> dict[str, Any]:
    """Parse an infotext back into a dict of strings keyed by infotext name, plus ``Prompt`` and
    ``Negative prompt``, with A1111's defaults for missing keys."""
    res: dict[str, Any] = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = (text or "").strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for key, value in RE_PARAM.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    for key, value in PARSE_DEFAULTS.items():
        res.setdefault(key, value)
    _split_legacy_sampler(res)
    for key in skip_fields:
        res.pop(key, None)
    return res


_LEGACY_SCHEDULE_SUFFIXES = {" Karras": "Karras", " Exponential": "Exponential"}


def _split_legacy_sampler(res: dict[str, Any]) -> None:
    """Old infotexts name the schedule inside the sampler ("DPM++ 2M Karras"); split it as A1111 does."""
    sampler = res.get("Sampler")
    if not isinstance(sampler, str):
        return
    for suffix, schedule in _LEGACY_SCHEDULE_SUFFIXES.items():
        if sampler.endswith(suffix) and res.get("Schedule type", "Automatic") == "Automatic":
            res["Sampler"] = sampler[: -len(suffix)]
            res["Schedule type"] = schedule
            return


def _hash_map(value: str) -> dict[str, str]:
    out = {}
    for item in str(value or "").split(","):
        name, sep, h = item.strip().rpartition(":")
        if sep:
            out[name.strip()] = h.strip()
    return out


#: infotext key -> GenerationParams field, for "Send to txt2img/img2img" and the API's ``infotext``.
FIELDS: dict[str, tuple[str, type]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Denoising strength": ("denoising_strength", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Mask blur": ("mask_blur", int),
    "Masked area padding": ("inpaint_full_res_padding", int),
    "Clip skip": ("clip_skip", int),
}
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def params_from_infotext(res: dict[str, Any]) -> dict[str, Any]:
    """Map a parsed infotext onto GenerationParams field values (only the keys present and valid)."""
    out: dict[str, Any] = {}
    for key, (field_name, kind) in FIELDS.items():
        if key not in res:
            continue
        try:
            out[field_name] = kind(float(res[key])) if kind is int else kind(res[key])
        except (TypeError, ValueError):
            continue
    if "Hires upscale" in res or "Hires upscaler" in res:
        out["enable_hr"] = True
    if res.get("Masked content") in MASKED_CONTENT:
        out["inpainting_fill"] = MASKED_CONTENT.index(res["Masked content"])
    out["inpaint_full_res"] = res.get("Inpaint area") == "Only masked"
    out["inpainting_mask_invert"] = 1 if res.get("Mask mode") == "Inpaint not masked" else 0
    if res.get("Model"):
        out["sd_model_checkpoint"] = res["Model"]
    if res.get("Model hash"):
        out["sd_model_hash"] = res["Model hash"]
    return out


def read_info_from_image(image) -> tuple[str | None, dict[str, Any]]:
    """Find the generation parameters in a PIL image: the PNG ``parameters`` chunk (ours and A1111's),
    an EXIF UserComment (A1111's JPEG/WebP), a plain ``comment``, or NovelAI's ``Comment`` JSON.
    Returns (infotext or None, the other metadata items worth showing)."""
    items = {k: v for k, v in (getattr(image, "info", None) or {}).items() if isinstance(v, (str, int, float))}
    text = items.pop("parameters", None)
    if text is None:
        text = _exif_user_comment(image)
    if text is None and isinstance(items.get("comment"), str):
        text = items.pop("comment")
    if text is None and items.get("Software") == "NovelAI" and isinstance(items.get("Comment"), str):
        text = _novelai_infotext(items.get("Description", ""), items["Comment"])
    for key in ("exif", "icc_profile", "dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density", "loop",
                "duration", "transparency", "gamma"):
        items.pop(key, None)
    return text, items


def _exif_user_comment(image) -> str | None:
    try:
        exif = image.getexif()
    except (AttributeError, OSError, ValueError):
        return None
    raw = exif.get_ifd(0x8769).get(0x9286) if exif else None  # Exif IFD -> UserComment
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        # piexif writes UTF-16 big-endian; some tools write little-endian with a BOM
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        return body.decode("utf-16-be", errors="replace")
    if prefix.startswith(b"ASCII"):
        return body.decode("ascii", errors="replace")
    return raw.decode("utf-8", errors="replace").strip("\x00")


def _novelai_infotext(prompt: str, comment: str) -> str | None:
    try:
        data = json.loads(comment)
    except json.JSONDecodeError:
        return None
    sampler = {"k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "ddim": "DDIM"}.get(
        data.get("sampler", ""), data.get("sampler", "Euler a"))
    params = {"Steps": data.get("steps"), "Sampler": sampler, "CFG scale": data.get("scale"),
              "Seed": data.get("seed"), "Size": f"{data.get('width', 512)}x{data.get('height', 512)}",
              "Clip skip": 2}
    return create_infotext(prompt, data.get("uc", ""), params)
