"""What a txt2img / img2img request asks for (:class:`GenerationParams`) and what it produced
(:class:`Processed`).

Field names are A1111's, so the API payloads, infotext "Send to" buttons and
scripts written against A1111's ``p`` read naturally. :func:`parameter_problems` collects
every problem with the fields (the service adds checkpoint, script and override problems to the
same list) and :class:`InvalidGenerationParams` carries them all in one error.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any

from modules.diffusion.images import HR_UPSCALERS, RESIZE_MODES

#: A1111's masked-content choices, by index (the API's ``inpainting_fill``).
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")
MAX_SEED = 2**32 - 1


@dataclass
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    #: prompt styles (names in styles.csv) applied to the prompts when the job is submitted
    styles: list = field(default_factory=list)
    steps: int = 20
    sampler_name: str = "Euler a"
    #: A1111's "Schedule type": Automatic, Uniform, Karras, Exponential, SGM Uniform
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    batch_size: int = 1
    #: "Batch count": how many batches run one after another
    n_iter: int = 1
    eta: float = 0.0
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    #: explicit second-pass size (A1111's "Resize width/height to"); 0 = use hr_scale
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float = 0.75
    # img2img / inpainting
    init_images: list = field(default_factory=list)  # PIL images
    resize_mode: int = 0
    mask: Any = None  # PIL image; white = repaint
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0
    # model and settings
    clip_skip: int = 1
    override_settings: dict = field(default_factory=dict)
    script_name: str | None = None
    #: the selected script's values by name; for AlwaysVisible scripts, {title: {name: value}}
    script_args: dict = field(default_factory=dict)
    alwayson_scripts: dict = field(default_factory=dict)
    save_images: bool = True
    do_not_save_grid: bool = False
    #: filled while processing: extra infotext keys (Hires..., Lora hashes...) in insertion order
    extra_generation_params: dict = field(default_factory=dict)
    #: set by the service: runs a GenerationParams to a Processed, so scripts (X/Y/Z) can generate
    runner: Any = field(default=None, repr=False, compare=False)

    def process(self) -> "Processed":
        """Generate with these parameters (what A1111 scripts do with ``process_images(p)``)."""
        if self.runner is None:
            raise RuntimeError("these GenerationParams are not attached to a running job; submit them through "
                               "ctx.diffusion instead")
        return self.runner(self)

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def hr_size(self) -> tuple[int, int]:
        """Second-pass size: ``hr_resize_x/y`` when given (one of them alone keeps the aspect ratio), else the
        first-pass size times ``hr_scale``; down to a multiple of 8."""
        if self.hr_resize_x or self.hr_resize_y:
            w = self.hr_resize_x or round(self.width * self.hr_resize_y / self.height)
            h = self.hr_resize_y or round(self.height * self.hr_resize_x / self.width)
        else:
            w, h = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        return max(8, int(w) // 8 * 8), max(8, int(h) // 8 * 8)

    def copy(self, **changes: Any) -> "GenerationParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["init_images"] = list(self.init_images)
        values["extra_generation_params"] = dict(self.extra_generation_params)
        values["override_settings"] = dict(self.override_settings)
        values.update(changes)
        return GenerationParams(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationParams":
        """Build from an API payload; unknown keys are ignored (A1111 payloads carry many)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})


class InvalidGenerationParams(ValueError):
    """Every problem with one request, found at once (the API answers it with 422, the UI shows it).

    A ValueError so every caller that maps ValueError to a client error keeps doing so."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("Invalid generation parameters: " + "; ".join(self.problems))

    @property
    def errors(self) -> dict[str, str]:
        """Each problem by the field it names (problems read ``field=value: fix``), for the API's ``errors``."""
        out: dict[str, str] = {}
        for problem in self.problems:
            head, sep, _rest = problem.partition("=")
            field = head.strip() if sep and re.fullmatch(r"[\w.\[\]'\"]+", head.strip()) else "request"
            out[field] = problem if field not in out else out[field] + "; " + problem
        return out


def _whole(value: Any, low: int, high: int) -> bool:
    """A whole number (not a bool, which JSON clients send by mistake) within [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any, low: float, high: float) -> bool:
    """A real number (int or float, not a bool or a string) within [low, high]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def parameter_problems(p: GenerationParams, *, samplers: list[str] | None = None,
                       schedules: list[str] | None = None, memory_budget: int | None = None,
                       img2img: bool | None = None) -> list[str]:
    """Every problem with *p*'s own fields, each as ``name=value: fix``. *samplers*/*schedules* are the
    valid names (None: not checked); *memory_budget* the bytes free for activations (None: not checked).

    Pure: it reads *p* and changes nothing, so the service can add what only it knows (checkpoint,
    scripts, override_settings) to the same list and raise one :class:`InvalidGenerationParams`."""
    problems: list[str] = []

    def bad(name: str, value: Any, fix: str) -> None:
        problems.append(f"{name}={value!r}: {fix}")

    if not isinstance(p.prompt, str):
        bad("prompt", p.prompt, "must be text")
    if not isinstance(p.negative_prompt, str):
        bad("negative_prompt", p.negative_prompt, "must be text")
    for name in ("width", "height"):
        value = getattr(p, name)
        if not _whole(value, 1, 2**31):
            bad(name, value, "must be a positive whole number of pixels, e.g. 512")
        elif value % 8:
            bad(name, value, f"must be a multiple of 8 (try {max(8, round(value / 8) * 8)})")
        elif value > 8192:
            bad(name, value, "must be at most 8192")
    if not _whole(p.steps, 1, 1000):
        bad("steps", p.steps, "must be a whole number from 1 to 1000")
    if not _number(p.cfg_scale, 0, 100):
        bad("cfg_scale", p.cfg_scale, "must be a number from 0 to 100 (7 is typical)")
    if not _whole(p.batch_size, 1, 64):
        bad("batch_size", p.batch_size, "must be a whole number from 1 to 64")
    if not _whole(p.n_iter, 1, 1000):
        bad("n_iter", p.n_iter, "(batch count) must be a whole number from 1 to 1000")
    for name in ("seed", "subseed"):
        value = getattr(p, name)
        if not _whole(value, -1, MAX_SEED):
            bad(name, value, f"must be -1 (random) or a whole number from 0 to {MAX_SEED}")
    if not _number(p.subseed_strength, 0, 1):
        bad("subseed_strength", p.subseed_strength, "must be a number from 0 to 1")
    if not _number(p.eta, 0, 1):
        bad("eta", p.eta, "must be a number from 0 to 1")
    if samplers is not None and p.sampler_name not in samplers:
        bad("sampler_name", p.sampler_name, f"unknown sampler; valid samplers: {', '.join(samplers)}")
    if schedules is not None and p.scheduler not in schedules:
        bad("scheduler", p.scheduler, f"unknown schedule type; valid: {', '.join(schedules)}")
    if not _number(p.denoising_strength, 0, 1):
        bad("denoising_strength", p.denoising_strength, "must be a number from 0 to 1")
    if p.enable_hr and not _number(p.hr_scale, 1, 8):
        bad("hr_scale", p.hr_scale, "must be a number from 1 to 8")
    elif not _number(p.hr_scale, 0, 8):  # unused without enable_hr, but never a nonsense value
        bad("hr_scale", p.hr_scale, "must be a number from 1 to 8 (it is used with enable_hr)")
    if p.enable_hr:
        if p.hr_upscaler not in HR_UPSCALERS:
            bad("hr_upscaler", p.hr_upscaler, f"unknown upscaler; valid: {', '.join(HR_UPSCALERS)}")
        for name in ("hr_resize_x", "hr_resize_y"):
            value = getattr(p, name)
            if not _whole(value, 0, 8192):
                bad(name, value, "must be 0 (use hr_scale) or a size in pixels up to 8192")
        if not _whole(p.hr_second_pass_steps, 0, 1000):
            bad("hr_second_pass_steps", p.hr_second_pass_steps, "must be 0 (same as steps) to 1000")
    if img2img and not p.init_images:
        bad("init_images", p.init_images, "img2img needs at least one init image")
    if p.init_images and _whole(p.batch_size, 1, 64) and len(p.init_images) not in (1, p.batch_size):
        bad("init_images", f"{len(p.init_images)} images",
            f"give one image, or one per batch item ({p.batch_size})")
    if not _whole(p.resize_mode, 0, len(RESIZE_MODES) - 1):
        bad("resize_mode", p.resize_mode, "must be " + ", ".join(f"{i} ({n})" for i, n in enumerate(RESIZE_MODES)))
    if not _whole(p.inpainting_fill, 0, len(INPAINTING_FILL) - 1):
        bad("inpainting_fill", p.inpainting_fill,
            "must be " + ", ".join(f"{i} ({n})" for i, n in enumerate(INPAINTING_FILL)))
    if not _whole(p.mask_blur, 0, 256):
        bad("mask_blur", p.mask_blur, "must be from 0 to 256 pixels")
    if not _whole(p.inpaint_full_res_padding, 0, 1024):
        bad("inpaint_full_res_padding", p.inpaint_full_res_padding, "must be from 0 to 1024 pixels")
    if not _whole(p.clip_skip, 1, 12):
        bad("clip_skip", p.clip_skip, "must be from 1 to 12")
    if memory_budget is not None and not problems:
        w, h = p.hr_size if p.enable_hr and not p.init_images else (p.width, p.height)
        need = estimate_activation_bytes(w, h, p.batch_size)
        if need > memory_budget:
            bad("width x height", f"{w}x{h} x batch {p.batch_size}",
                f"needs about {need / 2**30:.1f} GiB, but only {max(0, memory_budget) / 2**30:.1f} GiB is free; "
                "use a smaller size or batch size, or free memory (unload other models)")
    return problems


def check_params(p: GenerationParams, **limits: Any) -> None:
    """Raise one :class:`InvalidGenerationParams` for everything :func:`parameter_problems` finds."""
    problems = parameter_problems(p, **limits)
    if problems:
        raise InvalidGenerationParams(problems)


def estimate_activation_bytes(width: int, height: int, batch_size: int, bytes_per_value: int = 4) -> int:
    """Rough peak working memory of one SD step plus the VAE decode, beyond the weights.

    Two terms dominate: the VAE decoder's full-resolution feature maps (128-256 channels, a few alive at
    once) and the UNet's first self-attention (tokens^2 per head when attention is materialised).
    """
    pixels = width * height
    tokens = pixels // 64
    vae = 3 * 256 * pixels * bytes_per_value
    attention = 2 * 8 * tokens * tokens * bytes_per_value
    return batch_size * (vae + attention)


def resolve_seed(seed: int) -> int:
    """-1 means random (A1111 draws from 0..2^32-2); anything else is used as is."""
    if seed is None or int(seed) == -1:
        return random.randrange(MAX_SEED)
    return int(seed)


@dataclass
class Processed:
    """The result of one generation job (mirrors A1111's ``Processed`` and its JSON ``info``)."""
    images: list
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    params: GenerationParams
    model_name: str = ""
    model_hash: str = ""
    paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    grid: Any = None
    #: images beyond the generated ones (an X/Y/Z grid first, say); index_of_first_image counts them
    index_of_first_image: int = 0
    job_timestamp: str = ""
    #: the VAE file the images were decoded with (None: the checkpoint's own)
    vae_name: str | None = None
    #: a 9-channel inpainting model received mask + masked-image conditioning (A1111's flag of that name)
    inpainting_conditioning: bool = False

    def info(self) -> dict[str, Any]:
        p = self.params
        return {
            "prompt": p.prompt, "all_prompts": self.prompts, "negative_prompt": p.negative_prompt,
            "all_negative_prompts": self.negative_prompts, "seed": self.seeds[0] if self.seeds else p.seed,
            "all_seeds": self.seeds, "subseed": self.subseeds[0] if self.subseeds else p.subseed,
            "all_subseeds": self.subseeds, "subseed_strength": p.subseed_strength,
            "width": p.width, "height": p.height, "sampler_name": p.sampler_name, "cfg_scale": p.cfg_scale,
            "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": self.model_name, "sd_model_hash": self.model_hash, "sd_vae_name": self.vae_name,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": p.denoising_strength if (p.init_images or p.enable_hr) else None,
            "extra_generation_params": dict(p.extra_generation_params),
            "index_of_first_image": self.index_of_first_image, "infotexts": self.infotexts,
            "styles": list(p.styles), "job_timestamp": self.job_timestamp, "clip_skip": p.clip_skip,
            "is_using_inpainting_conditioning": self.inpainting_conditioning, "version": "atelier",
            "warnings": self.warnings, "interrupted": self.interrupted, "paths": self.paths,
        }

    def js(self) -> str:
        return json.dumps(self.info(), ensure_ascii=False, default=str)
