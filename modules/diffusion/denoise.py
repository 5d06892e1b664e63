"""The denoising loop, on a diffusers pipeline's own components.

Why not ``pipe(...)``: A1111 semantics need things the stock ``__call__`` does not
offer together: img2img that runs exactly ``int(min(strength, .999) * steps) + 1``
steps, inpainting blends and masked-content modes on 4-channel models, prompt
schedules that swap embeddings mid-run, skip/interrupt between steps, and live
previews. The loop below is the stock SD/SDXL loop step for step (same noise
draw, same CFG arithmetic, same ``scheduler.step`` calls, same VAE decode), so a
plain txt2img run gives the same image as ``StableDiffusionPipeline.__call__``;
the tests check that.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


class NanOutput(RuntimeError):
    """Sampling or decoding produced NaNs (typically fp16 overflow)."""


class SkipRequested(Exception):
    """Raised by a step callback to end the current batch early (A1111's Skip); the latents so far are kept."""


@dataclass
class Conditioning:
    """The tensors the UNet needs for one stretch of steps, already concatenated for CFG."""
    embeds: torch.Tensor  # (2B or B, tokens, dim): [negative, positive] when CFG is on
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds, time_ids


@dataclass
class DenoiseInputs:
    latents: torch.Tensor  # starting latents, already noised / scaled for the first timestep
    timesteps: torch.Tensor
    cfg_scale: float
    cond_at: Callable[[int], dict]  # step index -> encode_schedule kwargs (prompt_embeds, ...)
    generators: list[torch.Generator]
    width: int
    height: int
    #: 9-channel inpainting: (B, 5, h, w) = [mask, masked-image latents], appended to the UNet input
    image_cond: torch.Tensor | None = None
    #: 4-channel inpainting: called as blend(latents, i) after step i, returns blended latents
    blend: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    #: called as on_step(i, latents) after each step; may raise SkipRequested / JobInterrupted
    on_step: Callable[[int, torch.Tensor], None] | None = None
    eta: float = 0.0


def use_cfg(unet, cfg_scale: float) -> bool:
    """diffusers' rule: guidance when scale > 1 and the UNet has no guidance embedding (LCM-distilled)."""
    return cfg_scale > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None


def build_conditioning(kwargs: dict, do_cfg: bool, batch: int, width: int, height: int) -> Conditioning:
    """Turn ``encode_schedule(...).at_step(i)`` kwargs into the UNet's inputs, as the SD/SDXL pipelines do."""
    pos = kwargs["prompt_embeds"]
    neg = kwargs.get("negative_prompt_embeds")
    embeds = torch.cat([neg, pos]) if do_cfg else pos
    pooled = kwargs.get("pooled_prompt_embeds")
    if pooled is None:
        return Conditioning(embeds)
    neg_pooled = kwargs.get("negative_pooled_prompt_embeds")
    # SDXL micro-conditioning: original size, crop top-left, target size (what the SDXL pipelines pass for
    # an uncropped image at the requested size); built here because the inpaint pipeline's helper differs
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pos.dtype)
    text_embeds = pooled
    if do_cfg:
        text_embeds = torch.cat([neg_pooled, pooled], dim=0)
        time_ids = torch.cat([time_ids, time_ids], dim=0)
    time_ids = time_ids.to(pos.device).repeat(batch, 1)
    return Conditioning(embeds, {"text_embeds": text_embeds.to(pos.device), "time_ids": time_ids})


def step_kwargs(scheduler, generators, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    out = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generators
    return out


def denoise(pipe, scheduler, inp: DenoiseInputs) -> torch.Tensor:
    """Run the loop over ``inp.timesteps`` and return the final latents.

    ``SkipRequested`` from ``on_step`` ends the loop early and returns the latents reached so far.
    """
    unet = pipe.unet
    latents = inp.latents
    batch = latents.shape[0]
    do_cfg = use_cfg(unet, inp.cfg_scale)
    extra = step_kwargs(scheduler, inp.generators, inp.eta)
    timestep_cond = None
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        scale = torch.tensor(inp.cfg_scale - 1).repeat(batch)
        timestep_cond = pipe.get_guidance_scale_embedding(scale, embedding_dim=unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=latents.device, dtype=latents.dtype)
    current_kwargs, cond = None, None
    image_cond = inp.image_cond
    if image_cond is not None and do_cfg:
        image_cond = torch.cat([image_cond] * 2)
    for i, t in enumerate(inp.timesteps):
        kwargs = inp.cond_at(i)
        if kwargs is not current_kwargs:  # rebuild only where the prompt schedule switches
            current_kwargs = kwargs
            cond = build_conditioning(kwargs, do_cfg, batch, inp.width, inp.height)
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if image_cond is not None:
            model_in = torch.cat([model_in, image_cond.to(model_in.dtype)], dim=1)
        noise_pred = unet(model_in, t, encoder_hidden_states=cond.embeds, timestep_cond=timestep_cond,
                          added_cond_kwargs=cond.added, return_dict=False)[0]
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + inp.cfg_scale * (text - uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if inp.blend is not None:
            latents = inp.blend(latents, i)
        if inp.on_step is not None:
            try:
                inp.on_step(i, latents)
            except SkipRequested:
                break
    return latents


def latent_scale(pipe) -> int:
    """How many pixels one latent pixel stands for: 8 for SD's VAE (three downsamplers), fewer for a VAE with
    fewer levels, such as the 4x VAE of the demo model ``atelier-shapes``; diffusers' pipelines agree."""
    vae = getattr(pipe, "vae", None)
    widths = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(widths) - 1) if widths else 8


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if torch.isnan(tensor).any():
        if where == "vae":
            raise NanOutput("The VAE produced NaNs while decoding the image. This happens when the VAE runs in "
                            "half precision (fp16 overflow). Run the VAE in fp32: start with --precision fp32 "
                            "(or --no-half-vae), or pick an fp16-fixed VAE in Settings > Stable Diffusion > SD VAE.")
        raise NanOutput("The UNet produced NaNs while sampling. This happens in half precision on some cards; "
                        "start with --precision fp32 (or bf16), and use an fp32 VAE.")


def vae_dtype_for_decode(vae) -> tuple[torch.dtype, bool]:
    """(dtype to decode in, whether the VAE must be upcast): fp16 VAEs that declare ``force_upcast``
    (SDXL's) overflow in fp16, so they decode in fp32 as the SDXL pipeline does."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return (torch.float32 if upcast else vae.dtype), upcast


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [-1, 1], ``(B, 3, H, W)``; raises NanOutput on NaNs."""
    vae = pipe.vae
    check_finite(latents, "unet")
    dtype, upcast = vae_dtype_for_decode(vae)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        latents = latents.to(dtype)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    check_finite(images, "vae")
    return images


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``(B, 3, H, W)`` to scaled latents. Uses the latent distribution's mode, not a
    sample, so the same inputs always give the same latents whatever the seed."""
    vae = pipe.vae
    dtype, upcast = vae_dtype_for_decode(vae)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        # the images are already on the compute device (under --lowvram the VAE's own weights are not)
        dist = vae.encode(images.to(dtype=dtype)).latent_dist
        latents = dist.mode()
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return ((latents - mean_t) * vae.config.scaling_factor / std_t).to(images.dtype)
    # in the caller's dtype, as diffusers' prepare_latents does: an fp32 VAE (--no-half-vae) feeds a half UNet
    return (latents * vae.config.scaling_factor).to(images.dtype)


def to_pil(pipe, images: torch.Tensor) -> list:
    return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * images.shape[0])
