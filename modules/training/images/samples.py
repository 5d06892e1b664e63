"""Sample images during training: the listed prompts generated with the model as it is at that step.

Why the live components: the pipeline is assembled from the very UNet / text encoders being trained (peft
layers included), so a sample shows exactly what the current weights do, with no save and reload. The
sampler is an A1111 one (``sample_sampler``, "Euler a" by default, through :mod:`modules.diffusion.samplers`),
each prompt has its own seeded generator (the global RNG, which training draws from, is untouched), and the
PNG carries A1111's infotext in its ``parameters`` text chunk, as txt2img writes it, so PNG Info reads it.
"""
from __future__ import annotations

from pathlib import Path

import torch


def sample_images(trainer) -> list[Path]:
    """Generate the config's sample prompts (:meth:`~.config.ImageTrainConfig.sample_prompt_list`) into ``<run>/samples/step-NNNNNN-KK.png`` (main process only)."""
    from PIL.PngImagePlugin import PngInfo

    from modules.diffusion.infotext import create_infotext
    from modules.diffusion.samplers import make_scheduler, resolve_sampler
    c, base = trainer.config, trainer.base
    sampler, schedule = resolve_sampler(c.sample_sampler)
    pipe_cls = type(base.pipe)
    scheduler = make_scheduler(base.pipe.scheduler.config, sampler, schedule, seed=c.sample_seed)
    pipe = pipe_cls(**{**base.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    folder = trainer.run.root / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    modes = {name: module.training for name, module in base.trained.items()}
    written = []
    try:
        for module in base.trained.values():
            module.eval()
        width = height = c.resolution
        for number, prompt in enumerate(c.sample_prompt_list()):
            seed = c.sample_seed + number
            generator = torch.Generator(device=trainer.device).manual_seed(seed)
            with torch.no_grad():
                image = pipe(prompt, negative_prompt=c.sample_negative_prompt or None,
                             num_inference_steps=c.sample_steps, guidance_scale=c.sample_cfg,
                             width=width, height=height, generator=generator).images[0]
            params = {"Steps": c.sample_steps, "Sampler": sampler, "Schedule type": schedule,
                      "CFG scale": c.sample_cfg, "Seed": seed, "Size": f"{width}x{height}",
                      "Model": base.info.model_name if base.info is not None else "random-init",
                      "Training run": trainer.run.name, "Training step": trainer.step}
            text = create_infotext(prompt, c.sample_negative_prompt, params)
            info = PngInfo()
            info.add_text("parameters", text)
            path = folder / f"step-{trainer.step:06d}-{number:02d}.png"
            image.save(path, pnginfo=info)
            written.append(path)
    finally:
        for name, module in base.trained.items():
            module.train(modes[name])
    return written
