"""Registers image generation: the "sd" settings, the diffusion service, the txt2img / img2img /
PNG Info tabs and the ``/sdapi/v1`` image routes. Cheap on purpose: nothing here imports
diffusers or loads a model; that happens on the first generation."""
from __future__ import annotations

from modules.settings import SettingSpec, SettingsSection
from modules.tabs import TabSpec, lazy_build


def settings_section(service=None) -> SettingsSection:
    """The "sd" settings. With *service*, the checkpoint and VAE settings only accept names of existing, usable
    files (the same check for the Settings tab, ``settings.yaml`` and both option names in the API)."""
    return SettingsSection("sd", "Stable Diffusion", [
        SettingSpec("sd.sd_model_checkpoint", "", "Stable Diffusion checkpoint (title, name or hash; empty: the first)",
                    str, check=None if service is None else (lambda v: _checkpoint_title(service, v))),
        SettingSpec("sd.sd_vae", "Automatic", "SD VAE (Automatic: the checkpoint's own; or a file in models/VAE)", str,
                    check=None if service is None else (lambda v: _vae_name(service, v))),
        SettingSpec("sd.clip_skip", 1, "Clip skip: stop at the N-th last layer of CLIP", int, minimum=1, maximum=12,
                    step=1),
    ])


def _checkpoint_title(service, value: str) -> str:
    """The title of the usable checkpoint *value* names ("" stays "": the first usable one)."""
    return service.find(value).title if value else ""


def _vae_name(service, value: str) -> str:
    from modules.diffusion.checkpoints import find_vae
    if value in ("", "None", "Automatic"):
        return value or "Automatic"
    vae = find_vae([v for v in service.vaes() if not v.error], value)
    if vae is None:
        names = ", ".join(v.name for v in service.vaes() if not v.error) or "none"
        raise ValueError(f"VAE {value!r} not found in {service.ctx.paths.model_dir('VAE')}; available: "
                         f"Automatic, None, {names}")
    return vae.name


def _current_hash(service) -> str | None:
    """sha256 of the selected checkpoint (A1111's read-only ``sd_checkpoint_hash``); None without one."""
    from modules.diffusion.checkpoints import with_hash
    try:
        info = service.find(service.ctx.settings.get("sd.sd_model_checkpoint") or None)
    except ValueError:
        return None
    return with_hash(info, service.ctx.paths.cache_dir).sha256


def register_options(ctx, service) -> None:
    """A1111's option names for what Atelier has. Each changes behaviour, or is read-only with the value that
    is true here (a client writing back what it read is fine; asking for another value is a 400)."""
    from modules.api.registry import VirtualOption
    settings = ctx.settings

    def setting_option(key: str, apply=None) -> VirtualOption:
        return VirtualOption(get=lambda: settings.get(key), validate=settings.spec(key).validate,
                             set=apply or (lambda v: settings.set(key, v)), setting=key)

    ctx.api.add_option("sd_model_checkpoint", setting_option("sd.sd_model_checkpoint", service.select_checkpoint))
    ctx.api.options["sd_model_checkpoint"].get = service.current_title
    ctx.api.add_option("sd_vae", setting_option("sd.sd_vae", service.select_vae))
    ctx.api.add_option("CLIP_stop_at_last_layers", setting_option("sd.clip_skip"))
    ctx.api.add_option("send_seed", setting_option("ui.send_seed"))
    ctx.api.add_option("send_size", setting_option("ui.send_size"))
    ctx.api.add_option("sd_checkpoint_hash", VirtualOption(get=lambda: _current_hash(service),
                                                           help="it is the selected checkpoint's sha256"))
    ctx.api.add_option("samples_save", VirtualOption(get=lambda: True, help="the web UI saves every image; "
                                                     "API requests choose with save_images"))
    ctx.api.add_option("samples_format", VirtualOption(get=lambda: "png", help="Atelier saves PNG files"))
    ctx.api.add_option("enable_pnginfo", VirtualOption(get=lambda: True, help="Atelier always writes the "
                                                       "parameters into the PNG"))
    ctx.api.add_option("eta_noise_seed_delta", VirtualOption(get=lambda: 0, help="Atelier does not offset "
                                                             "the ancestral noise seed (ENSD)"))
    ctx.api.add_option("eta_ancestral", VirtualOption(get=lambda: 1.0, help="ancestral samplers use eta 1, "
                                                      "as diffusers implements them"))


def register(ctx) -> None:
    from modules.diffusion.service import DiffusionService

    service = DiffusionService(ctx)
    ctx.settings.add_section(settings_section(service))
    ctx.diffusion = service
    ctx.tabs.add(TabSpec("txt2img", "txt2img", lazy_build("modules.ui.tabs.txt2img"), order=20))
    ctx.tabs.add(TabSpec("img2img", "img2img", lazy_build("modules.ui.tabs.img2img"), order=30))
    ctx.tabs.add(TabSpec("extras", "Extras", lazy_build("modules.ui.tabs.extras"), order=35))
    ctx.tabs.add(TabSpec("pnginfo", "PNG Info", lazy_build("modules.ui.tabs.pnginfo"), order=40))
    register_options(ctx, service)
    from modules.diffusion.sdapi import build_router
    ctx.api.include(build_router(ctx))  # mounted by the server only with --api
    from modules.diffusion.sdapi_extras import build_router as build_extras_router
    ctx.api.include(build_extras_router(ctx))  # styles, upscalers, Extras, script-info, empty listings
