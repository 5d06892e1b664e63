"""Registers image generation: the "sd" settings, the diffusion service, the txt2img / img2img /
PNG Info tabs and the ``/sdapi/v1`` image routes. Cheap on purpose: nothing here imports
diffusers or loads a model; that happens on the first generation."""
from __future__ import annotations

from modules.settings import SettingSpec, SettingsSection
from modules.tabs import TabSpec, lazy_build


def settings_section() -> SettingsSection:
    return SettingsSection("sd", "Stable Diffusion", [
        SettingSpec("sd.sd_model_checkpoint", "", "Stable Diffusion checkpoint (title, name or hash; empty: the first)",
                    str),
        SettingSpec("sd.sd_vae", "Automatic", "SD VAE (Automatic: the checkpoint's own; or a file in models/VAE)", str),
        SettingSpec("sd.clip_skip", 1, "Clip skip: stop at the N-th last layer of CLIP", int, minimum=1, maximum=12),
    ])



def register(ctx) -> None:
    from modules.api.registry import VirtualOption
    from modules.diffusion.service import DiffusionService

    ctx.settings.add_section(settings_section())
    service = DiffusionService(ctx)
    ctx.diffusion = service
    ctx.tabs.add(TabSpec("txt2img", "txt2img", lazy_build("modules.ui.tabs.txt2img"), order=20))
    ctx.tabs.add(TabSpec("img2img", "img2img", lazy_build("modules.ui.tabs.img2img"), order=30))
    ctx.tabs.add(TabSpec("extras", "Extras", lazy_build("modules.ui.tabs.extras"), order=35))
    ctx.tabs.add(TabSpec("pnginfo", "PNG Info", lazy_build("modules.ui.tabs.pnginfo"), order=40))
    ctx.api.add_option("sd_model_checkpoint", VirtualOption(service.current_title, service.select_checkpoint))
    ctx.api.add_option("sd_vae", VirtualOption(lambda: ctx.settings.get("sd.sd_vae"), service.select_vae))
    ctx.api.add_option("CLIP_stop_at_last_layers", VirtualOption(lambda: ctx.settings.get("sd.clip_skip"),
                                                                 lambda v: ctx.settings.set("sd.clip_skip", v)))
    from modules.diffusion.sdapi import build_router
    ctx.api.include(build_router(ctx))  # mounted by the server only with --api
    from modules.diffusion.sdapi_extras import build_router as build_extras_router
    ctx.api.include(build_extras_router(ctx))  # styles, upscalers, Extras, script-info, empty listings
