"""The model an image run starts from: a checkpoint found and loaded through Atelier's own loader, and
the peft LoRA layers put into it.

Why Atelier's loader (:func:`modules.diffusion.loading.load_sd_model`): a base trains exactly as txt2img
sees it (diffusers folder or A1111 single file with its sidecar configs, offline), so a LoRA trained here
applies to the same weights it was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.training.config import ConfigError


@dataclass
class BaseModel:
    """The loaded base: its pipeline, kind ("sd1", "sd2", "sdxl") and checkpoint info."""
    pipe: object
    kind: str
    info: object
    #: pipeline component name -> module that has trainable LoRA layers
    trained: dict[str, torch.nn.Module] = field(default_factory=dict)
    #: the :class:`~modules.diffusion.loading.SDModel` it was loaded as (txt2img's view of the same pipeline:
    #: DreamBooth draws its class images with it); None for a random-init model
    sd: object = None

    @property
    def sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        names = ("text_encoder", "text_encoder_2") if self.sdxl else ("text_encoder",)
        return [(n, getattr(self.pipe, n)) for n in names]


def find_base(name: str, ckpt_dir: str | Path):
    """The :class:`~modules.diffusion.checkpoints.CheckpointInfo` of *name*: a path (file or diffusers
    folder) or a name from *ckpt_dir* as the txt2img list shows it. A ConfigError lists what exists."""
    from modules.diffusion.checkpoints import find_checkpoint, list_checkpoints
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        found = [i for i in list_checkpoints(path.parent, compute_hashes=False) if Path(i.filename) == path]
        if not found:
            raise ConfigError([f"base_model {name}: not a Stable Diffusion checkpoint (a .safetensors/.ckpt file "
                               "or a diffusers folder with model_index.json)"])
        info = found[0]
    else:
        infos = list_checkpoints(ckpt_dir, compute_hashes=False)
        info = find_checkpoint(infos, name)
        if info is None:
            known = ", ".join(i.model_name for i in infos if not i.error) or "none"
            raise ConfigError([f"base_model {name!r} is not in {ckpt_dir} (found: {known}); give a name from "
                               "there or a path to a checkpoint"])
    if info.error:
        raise ConfigError([f"base_model {name}: {info.error}"])
    return info


def load_base(info) -> BaseModel:
    """Load the base in fp32 on the CPU (the trainer moves it), every weight frozen."""
    from modules.diffusion.loading import load_sd_model
    sd = load_sd_model(info, device="cpu", dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(sd.pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    return BaseModel(pipe=sd.pipe, kind=sd.kind, info=info, sd=sd)


def add_lora(base: BaseModel, config) -> None:
    """peft LoRA on kohya's layers (:mod:`lora_targets`) of the UNet, and of the text encoder(s) when
    ``train_text_encoder``; peft's init (A random from torch's RNG, B zero) starts as the base model."""
    from modules.training.images.kohya_format import inject
    from modules.training.images.lora_targets import lora_config, text_encoder_targets, unet_targets
    unet = base.pipe.unet
    targets = unet_targets(unet, conv=config.conv_rank > 0)
    inject(unet, lora_config(targets, rank=config.rank, alpha=config.alpha, conv_rank=config.conv_rank or None,
                             conv_alpha=config.conv_alpha, dropout=config.lora_dropout))
    base.trained["unet"] = unet
    if config.train_text_encoder:
        for name, encoder in base.text_encoders:
            inject(encoder, lora_config(text_encoder_targets(encoder), rank=config.rank, alpha=config.alpha,
                                        dropout=config.lora_dropout))
            base.trained[name] = encoder


def trainable_state(base: BaseModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor as ``<component>.<parameter path>`` (what a checkpoint saves)."""
    return {f"{component}.{name}": p.detach().cpu().contiguous().clone()
            for component, module in base.trained.items()
            for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(base: BaseModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Put a checkpoint's trainable tensors back; every name and shape must match."""
    mine = {f"{component}.{name}": p for component, module in base.trained.items()
            for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
    wrong = [k for k in mine.keys() & state.keys() if mine[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError([f"{where} does not fit this run's LoRA (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, other shapes {wrong[:3]}); resume with the settings it started with"])
    with torch.no_grad():
        for key, param in mine.items():
            param.copy_(state[key])
