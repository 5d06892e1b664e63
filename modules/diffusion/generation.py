"""Running a txt2img / img2img job: seeds, batches, passes, progress, and the finished images.

``process_images(run, p)`` is A1111's ``process_images`` on top of
:mod:`modules.diffusion.denoise`: it resolves seeds (-1 = random, batch item *i*
uses seed + *i*), draws each item's initial noise with its own
``torch.Generator("cpu").manual_seed(seed)`` exactly as diffusers does, strips
``<lora:...>`` tags and applies the LoRAs for the job, encodes the prompt schedule
once, runs the txt2img pass (and the hires-fix pass) or the img2img pass per batch,
decodes, lays inpainting results over the original, writes infotexts and saves.
Progress goes to ``job.report`` (which raises on Interrupt); Skip ends the current
batch's sampling early.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from modules.diffusion import denoise as dn
from modules.diffusion.images import LATENT_UPSCALE_MODES, PIL_UPSCALERS, to_tensor
from modules.diffusion.img2img import (InitState, a1111_steps, apply_masked_content, full_mask_conditioning,
                                       make_blend, prepare_init)
from modules.diffusion.infotext import create_infotext, join_hashes
from modules.diffusion.loading import sequential_offload
from modules.diffusion.previews import latent_preview
from modules.diffusion.processing import INPAINTING_FILL, GenerationParams, Processed, check_params, resolve_seed
from modules.jobs import JobInterrupted

log = logging.getLogger(__name__)
VERSION = "atelier"


@dataclass
class Tools:
    """The model-side functions generation uses (``modules.diffusion.samplers`` & co. by default),
    injectable so the loop can be tested or benchmarked on its own."""
    make_scheduler: Callable[..., Any]  # (scheduler_config, sampler, schedule, seed=) -> scheduler
    schedule_label: Callable[[str, str], str]  # (sampler, schedule) -> infotext "Schedule type"
    encode_schedule: Callable[..., Any]  # (sd, prompt, negative, steps, batch, hires_steps=, clip_skip=,
    #                                      embeddings_dir=) -> ConditioningSchedule
    extract_extra_networks: Callable[[str], tuple[str, dict]]
    apply_loras: Callable[..., Any] | None = None  # (sd, calls, lora_dir) -> context manager -> AppliedLoras

    #: (sampler, schedule) -> canonical A1111 names (legacy "DPM++ 2M Karras" split)
    resolve: Callable[[str, str], tuple[str, str]] = lambda sampler, schedule: (sampler, schedule)

    @classmethod
    def default(cls) -> "Tools":
        from modules.diffusion import conditioning, lora, prompt_parser, samplers
        return cls(make_scheduler=samplers.make_scheduler, schedule_label=infotext_schedule,
                   encode_schedule=conditioning.encode_schedule,
                   extract_extra_networks=prompt_parser.extract_extra_networks, apply_loras=lora.apply_loras,
                   resolve=samplers.resolve_sampler)


def infotext_schedule(sampler: str, schedule: str) -> str:
    """What A1111 writes as "Schedule type": the chosen type, or for Automatic the sampler's own default
    when it has a named one (Karras for DPM++ 2M), else "Automatic"."""
    from modules.diffusion import samplers
    if schedule != "Automatic":
        return schedule
    default = next((s.default_schedule for s in samplers.SAMPLER_SPECS if s.name == sampler), "Uniform")
    return default if default != "Uniform" else "Automatic"


@dataclass
class Run:
    """One job's environment: the leased model and where progress, images and hooks go."""
    sd: Any  # loading.SDModel: .pipe, .kind, .is_inpaint
    tools: Tools
    job: Any = None  # modules.jobs.Job, or None when run directly
    tab: str = "txt2img"
    preview_every: int = 0
    saver: Any = None  # outputs.ImageSaver, or None to keep images in memory only
    scripts: Any = None  # ScriptRunner for AlwaysVisible hooks
    lora_dir: Any = None
    embeddings_dir: Any = None
    model_name: str = ""
    model_hash: str = ""
    vae_name: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # progress bookkeeping
    step: int = 0
    total: int = 0
    started: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def report(self, text: str = "", preview=None) -> None:
        if self.job is not None:
            self.job.report(self.step, self.total, text=text, preview=preview)

    def take_skip(self) -> bool:
        return bool(self.job is not None and self.job.take_skip())


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (A1111's variation seeds), per batch item."""
    a_n = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    b_n = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    dot = (a_n * b_n).flatten(1).sum(1).clamp(-1, 1).view(-1, 1, 1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    linear = (1 - t) * a + t * b
    spherical = (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b
    return torch.where(dot.abs() > 0.9995, linear, spherical)


def make_noise(shape: tuple, seeds: list[int], subseeds: list[int], subseed_strength: float,
               device, dtype) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise per item from ``torch.Generator("cpu").manual_seed(seed)`` (diffusers' draw), blended
    toward the subseed's noise when a variation strength is set. Returns the generators too: ancestral
    samplers keep drawing from them, as in diffusers."""
    from diffusers.utils.torch_utils import randn_tensor
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if subseed_strength > 0:
        sub_gens = [torch.Generator("cpu").manual_seed(int(s)) for s in subseeds]
        subnoise = randn_tensor(shape, generator=sub_gens, device=device, dtype=dtype)
        noise = _slerp(subseed_strength, noise, subnoise)
    return noise, generators


def _pass_steps(p: GenerationParams) -> int:
    """Sampling steps one batch takes, for the progress bar."""
    if p.is_img2img:
        return a1111_steps(p.steps, p.denoising_strength)[1]
    total = p.steps
    if p.enable_hr:
        total += a1111_steps(p.hr_second_pass_steps or p.steps, p.denoising_strength)[1]
    return total


class _Pass:
    """Step callback for one sampling pass: progress, live previews and Skip."""

    def __init__(self, run: Run, steps_run: int, n_timesteps: int, label: str):
        self.run, self.steps_run, self.n_timesteps, self.label = run, steps_run, n_timesteps, label
        self.base = run.step
        self.skipped = False

    def __call__(self, i: int, latents: torch.Tensor) -> None:
        run = self.run
        run.step = self.base + (i + 1) * self.steps_run // self.n_timesteps
        preview = None
        every = run.preview_every
        if every and (run.step % every == 0 or i == self.n_timesteps - 1):
            preview = latent_preview(latents, run.sd.kind)
        elapsed = time.monotonic() - run.started
        rate = run.step / elapsed if elapsed > 0 else 0.0
        run.report(f"{self.label}: step {run.step}/{run.total}, {rate:.2f} it/s", preview)
        if run.take_skip():
            self.skipped = True
            raise dn.SkipRequested()


def _timesteps(run: Run, p: GenerationParams, steps: int):
    scheduler = run.tools.make_scheduler(run.sd.pipe.scheduler.config, p.sampler_name, p.scheduler, seed=p.seed)
    scheduler.set_timesteps(steps, device=run.device)
    return scheduler, scheduler.timesteps


def txt2img_pass(run: Run, p: GenerationParams, cond, noise, generators, image_cond=None) -> tuple[torch.Tensor, bool]:
    scheduler, timesteps = _timesteps(run, p, p.steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = noise * scheduler.init_noise_sigma
    callback = _Pass(run, p.steps, len(timesteps), "txt2img")
    latents = dn.denoise(run.sd.pipe, scheduler, dn.DenoiseInputs(
        latents=latents, timesteps=timesteps, cfg_scale=p.cfg_scale, cond_at=cond.at_step,
        generators=generators, width=p.width, height=p.height, image_cond=image_cond, on_step=callback, eta=p.eta))
    return latents, callback.skipped


def img2img_pass(run: Run, p: GenerationParams, *, init: torch.Tensor, noise: torch.Tensor, generators,
                 steps: int, cond_at, width: int, height: int, mask: torch.Tensor | None = None,
                 image_cond: torch.Tensor | None = None, label: str = "img2img",
                 step_offset: int = 0) -> tuple[torch.Tensor, bool]:
    """Noise *init* to A1111's starting step for ``p.denoising_strength`` and denoise the rest.
    *step_offset* shifts prompt-schedule indices (the hires pass follows the first pass's steps)."""
    scheduler, all_timesteps = _timesteps(run, p, steps)
    start, steps_run = a1111_steps(steps, p.denoising_strength)
    order = getattr(scheduler, "order", 1)
    timesteps = all_timesteps[start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    blend = make_blend(scheduler, init, noise, mask, timesteps) if mask is not None and image_cond is None else None
    callback = _Pass(run, steps_run, len(timesteps), label)
    latents = dn.denoise(run.sd.pipe, scheduler, dn.DenoiseInputs(
        latents=latents, timesteps=timesteps, cfg_scale=p.cfg_scale,
        cond_at=(lambda i: cond_at(i + start + step_offset)) if step_offset or start else cond_at,
        generators=generators, width=width, height=height, image_cond=image_cond, blend=blend,
        on_step=callback, eta=p.eta))
    if mask is not None and image_cond is None:
        latents = (1 - mask) * init + mask * latents
    return latents, callback.skipped


def hires_pass(run: Run, p: GenerationParams, latents: torch.Tensor, cond, seeds, subseeds) -> tuple[torch.Tensor, bool]:
    """Hires fix: upscale the first pass (in latent space, or decoded and resized with PIL) and run an
    img2img pass over it at ``denoising_strength``."""
    width, height = p.hr_size
    scale = dn.latent_scale(run.sd.pipe)
    size = (height // scale, width // scale)
    if p.hr_upscaler in LATENT_UPSCALE_MODES:
        mode, antialias = LATENT_UPSCALE_MODES[p.hr_upscaler]
        init = F.interpolate(latents, size=size, mode=mode, antialias=antialias)
    else:
        images = dn.to_pil(run.sd.pipe, dn.decode(run.sd.pipe, latents))
        images = [im.resize((width, height), PIL_UPSCALERS[p.hr_upscaler]) for im in images]
        init = dn.encode(run.sd.pipe, to_tensor(images).to(run.device, run.dtype))
    noise, generators = make_noise(tuple(init.shape), seeds, subseeds, p.subseed_strength, run.device, init.dtype)
    image_cond = full_mask_conditioning(run.sd.pipe, init) if run.sd.is_inpaint else None
    return img2img_pass(run, p, init=init, noise=noise, generators=generators,
                        steps=p.hr_second_pass_steps or p.steps, cond_at=cond.at_step, width=width, height=height,
                        image_cond=image_cond, label="hires fix", step_offset=p.steps)


def infotext_params(run: Run, p: GenerationParams, seed: int, subseed: int, schedule: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "Steps": p.steps, "Sampler": p.sampler_name, "Schedule type": schedule, "CFG scale": p.cfg_scale,
        "Seed": seed, "Size": f"{p.width}x{p.height}", "Model hash": run.model_hash or None,
        "Model": run.model_name or None, "VAE": run.vae_name,
        "Variation seed": subseed if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Denoising strength": p.denoising_strength if (p.is_img2img or p.enable_hr) else None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
    }
    params.update(p.extra_generation_params)
    params["Version"] = VERSION
    return params


def _extra_params(p: GenerationParams) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if p.is_img2img and p.mask is not None:
        extra["Mask blur"] = p.mask_blur
        if p.inpainting_mask_invert:
            extra["Mask mode"] = "Inpaint not masked"
        if p.inpainting_fill != 1:
            extra["Masked content"] = INPAINTING_FILL[p.inpainting_fill]
        if p.inpaint_full_res:
            extra["Inpaint area"] = "Only masked"
            extra["Masked area padding"] = p.inpaint_full_res_padding
    if p.enable_hr and not p.is_img2img:
        if p.hr_resize_x or p.hr_resize_y:
            extra["Hires resize"] = "{}x{}".format(*p.hr_size)
        else:
            extra["Hires upscale"] = p.hr_scale
        if p.hr_second_pass_steps:
            extra["Hires steps"] = p.hr_second_pass_steps
        extra["Hires upscaler"] = p.hr_upscaler
    return extra


@dataclass
class JobPlan:
    """What step 1 settles for the whole job: the prompts without their extra-network tags, the LoRAs
    they name, every item's seed and subseed, the infotext schedule label, and the result being filled."""
    prompt: str
    negative: str
    loras: list
    seeds: list[int]
    subseeds: list[int]
    schedule: str
    result: Processed

    def batch(self, n: int, size: int) -> tuple[list[int], list[int]]:
        return self.seeds[n * size:(n + 1) * size], self.subseeds[n * size:(n + 1) * size]


def process_images(run: Run, p: GenerationParams) -> Processed:
    """Generate ``p.n_iter`` batches of ``p.batch_size`` images. An Interrupt keeps the finished images.

    Reads as the numbered steps of a diffusers pipeline's ``__call__``; each step is one function below."""
    p = p.copy()
    tab = "img2img" if p.is_img2img else "txt2img"
    # 1. Check inputs (after the scripts' before_process / process hooks, which may change p)
    plan = check_inputs(run, p, tab)
    lora_cm = run.tools.apply_loras(run.sd, plan.loras, run.lora_dir) if (plan.loras and run.tools.apply_loras) \
        else contextlib.nullcontext(None)
    # the offload stack closes first: its hooks come off before the LoRAs are unloaded
    with lora_cm as applied, torch.inference_mode(), contextlib.ExitStack() as stack:
        # 2. Encode prompts
        cond = encode_prompts(run, p, plan, applied)
        # 3. Prepare latents: the init images once per job (img2img), the noise per batch
        offload = sequential_offload(run.sd) if hasattr(run.sd, "offload") else contextlib.nullcontext()
        stack.enter_context(offload)  # --lowvram: layer by layer from here on (prompts are encoded)
        init = prepare_init_latents(run, p)
        try:
            for n in range(p.n_iter):
                seeds, subseeds = plan.batch(n, p.batch_size)
                scale = dn.latent_scale(run.sd.pipe)
                channels = run.sd.pipe.vae.config.latent_channels      # 4 for SD; more for a wider VAE
                noise, generators = make_noise((len(seeds), channels, p.height // scale, p.width // scale), seeds,
                                               subseeds,
                                               p.subseed_strength, run.device, run.dtype)
                # 4. Denoise
                latents = denoise_batch(run, p, cond, init, noise, generators, seeds, subseeds)
                # 5. Decode
                images = decode_batch(run, init, latents)
                # 6. Save
                for image, seed, subseed in zip(images, seeds, subseeds):
                    _finish_image(run, p, plan.result, image, seed, subseed, prompt_text=p.prompt,
                                  negative_text=p.negative_prompt, schedule=plan.schedule, tab=tab)
        except JobInterrupted:
            plan.result.interrupted = True
    save_grid(run, p, plan.result, tab)
    if run.scripts is not None:
        run.scripts.call("postprocess", tab, p, p.alwayson_scripts or {}, plan.result)
    return plan.result


def check_inputs(run: Run, p: GenerationParams, tab: str) -> JobPlan:
    """Step 1: run the scripts' ``before_process`` and ``process`` hooks, resolve seeds and sampler names,
    and check *p* once more (a hook may have changed it since the service checked the request)."""
    script_args = p.alwayson_scripts or {}
    if run.scripts is not None:
        run.scripts.call("before_process", tab, p, script_args)
    seed, subseed = resolve_seed(p.seed), resolve_seed(p.subseed)
    p.seed, p.subseed = seed, subseed
    total = p.total_images
    prompt, networks = run.tools.extract_extra_networks(p.prompt)
    negative, _ = run.tools.extract_extra_networks(p.negative_prompt)
    if run.scripts is not None:
        run.scripts.call("process", tab, p, script_args)
    p.extra_generation_params = {**_extra_params(p), **p.extra_generation_params}
    p.sampler_name, p.scheduler = run.tools.resolve(p.sampler_name, p.scheduler)
    check_params(p, img2img=p.is_img2img)
    result = Processed(images=[], infotexts=[], seeds=[], subseeds=[], prompts=[], negative_prompts=[], params=p,
                       model_name=run.model_name, model_hash=run.model_hash, warnings=run.warnings,
                       job_timestamp=_dt.datetime.now().strftime("%Y%m%d%H%M%S"), vae_name=run.vae_name,
                       inpainting_conditioning=bool(run.sd.is_inpaint))
    run.total, run.step, run.started = p.n_iter * _pass_steps(p), 0, time.monotonic()
    return JobPlan(prompt=prompt, negative=negative, loras=networks.get("lora") or [],
                   seeds=[seed + i for i in range(total)], subseeds=[subseed + i for i in range(total)],
                   schedule=run.tools.schedule_label(p.sampler_name, p.scheduler), result=result)


def encode_prompts(run: Run, p: GenerationParams, plan: JobPlan, applied) -> Any:
    """Step 2: the prompt schedule's embeddings, once per job (with the job's LoRAs applied), plus the
    LoRA and textual-inversion hashes for the infotext."""
    if applied is not None:
        run.warnings.extend(getattr(applied, "warnings", []) or [])
        hashes = getattr(applied, "hashes", None) or {}
        value = join_hashes(hashes.items() if isinstance(hashes, dict) else hashes)
        if value:
            p.extra_generation_params["Lora hashes"] = value
    hires_steps = (p.hr_second_pass_steps or p.steps) if p.enable_hr and not p.is_img2img else None
    cond = run.tools.encode_schedule(run.sd, plan.prompt, plan.negative, p.steps, p.batch_size,
                                     hires_steps=hires_steps, clip_skip=p.clip_skip,
                                     embeddings_dir=run.embeddings_dir)
    _collect_cond_info(run, p, cond)
    return cond


def prepare_init_latents(run: Run, p: GenerationParams) -> InitState | None:
    """Step 3 (img2img): resize, mask and encode the init images once for the whole job."""
    if not p.is_img2img:
        return None
    init = prepare_init(run.sd.pipe, p, is_inpaint_model=run.sd.is_inpaint, device=run.device, dtype=run.dtype)
    run.warnings.extend(w for w in init.warnings if w not in run.warnings)
    return init


def denoise_batch(run: Run, p: GenerationParams, cond, init: InitState | None, noise: torch.Tensor, generators,
                  seeds: list[int], subseeds: list[int]) -> torch.Tensor:
    """Step 4: the txt2img pass (and the hires-fix pass), or the img2img pass, for one batch."""
    batch = noise.shape[0]
    if init is None:
        image_cond = full_mask_conditioning(run.sd.pipe, noise) if run.sd.is_inpaint else None
        latents, skipped = txt2img_pass(run, p, cond, noise, generators, image_cond=image_cond)
        if p.enable_hr and not skipped:
            latents, skipped = hires_pass(run, p, latents, cond, seeds, subseeds)
        return latents
    start_latents = init.for_batch(init.latents, batch)
    mask = init.latent_mask
    if mask is not None:
        mask = init.for_batch(mask, batch)
        start_latents = apply_masked_content(start_latents, mask, p.inpainting_fill, noise)
    image_cond = init.for_batch(init.image_cond, batch) if init.image_cond is not None else None
    latents, _ = img2img_pass(run, p, init=start_latents, noise=noise, generators=generators, steps=p.steps,
                              cond_at=cond.at_step, width=p.width, height=p.height, mask=mask,
                              image_cond=image_cond)
    return latents


def decode_batch(run: Run, init: InitState | None, latents: torch.Tensor) -> list:
    """Step 5: VAE-decode one batch to PIL images; inpainting results are laid over the original."""
    images = dn.to_pil(run.sd.pipe, dn.decode(run.sd.pipe, latents))
    if init is None:
        return images
    batch = len(images)
    overlays = init.overlays if len(init.overlays) == batch else init.overlays[:1] * batch
    return [ov.apply(im) if ov is not None else im for im, ov in zip(images, overlays)]


def save_grid(run: Run, p: GenerationParams, result: Processed, tab: str) -> None:
    """Step 6 (end of job): the grid of a multi-image job, when grids are saved."""
    if run.saver is not None and len(result.images) > 1 and not p.do_not_save_grid and p.save_images:
        from modules.diffusion.outputs import image_grid
        result.grid = image_grid(result.images, rows=None)
        run.saver.save(result.grid, f"{tab}-grids", result.seeds[0], result.infotexts[0])


def _collect_cond_info(run: Run, p: GenerationParams, cond) -> None:
    """TI hashes and conditioning warnings, when the conditioning reports them."""
    ti = getattr(cond, "ti_hashes", None) or getattr(cond, "embedding_hashes", None)
    if ti:
        value = join_hashes(ti.items() if isinstance(ti, dict) else ti)
        if value:
            p.extra_generation_params["TI hashes"] = value
    for warning in getattr(cond, "warnings", None) or []:
        if warning not in run.warnings:
            run.warnings.append(warning)


def _finish_image(run: Run, p: GenerationParams, result: Processed, image, seed: int, subseed: int, *,
                  prompt_text: str, negative_text: str, schedule: str, tab: str) -> None:
    if run.scripts is not None:
        for replacement in run.scripts.call("postprocess_image", tab, p, p.alwayson_scripts or {}, image):
            if replacement is not None:
                image = replacement
    infotext = create_infotext(prompt_text, negative_text, infotext_params(run, p, seed, subseed, schedule))
    image.info["parameters"] = infotext
    result.images.append(image)
    result.infotexts.append(infotext)
    result.seeds.append(seed)
    result.subseeds.append(subseed)
    result.prompts.append(prompt_text)
    result.negative_prompts.append(negative_text)
    if run.saver is not None and p.save_images:
        result.paths.append(str(run.saver.save(image, f"{tab}-images", seed, infotext)))
