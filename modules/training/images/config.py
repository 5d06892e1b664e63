"""The image trainer's config (``python -m modules.training lora --config FILE.yaml``), checked all at once.

Read through :func:`modules.training.config.load_config` (unknown keys named with the closest known one,
wrong types, every problem in one :class:`~modules.training.config.ConfigError`), after a memory preset
(:mod:`.presets`) has filled the defaults. Keys follow kohya's names where it has one (``unet_lr``,
``min_snr_gamma``, ``noise_offset``, ``network_dim`` is ``rank`` here as in peft).

What cannot be known from the file alone (is ``base_model`` an SD 1.5 or an SDXL checkpoint?) is checked by
:func:`base_problems` once the base is found, before anything trains.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.training.config import ConfigError, load_config
from modules.training.images.presets import PRESETS

MODES = ("lora", "finetune")
INITS = ("checkpoint", "random")
CACHE_LATENTS = ("memory", "disk", "none")
#: optimizer -> (module it needs, pip package to install)
OPTIMIZERS = {"adamw": (None, None), "adamw8bit": ("bitsandbytes", "bitsandbytes"),
              "prodigy": ("prodigyopt", "prodigyopt")}
LR_SCHEDULERS = ("constant", "cosine", "cosine_with_restarts")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
MIXED_PRECISION = ("no", "bf16", "fp16")
MODEL_TYPES = ("auto", "sd1", "sdxl")
OUTPUT_FORMATS = ("kohya", "diffusers")


@dataclass
class ImageTrainConfig:
    """One image-training run. Defaults are kohya's for an SD 1.5 LoRA where it has one."""
    #: lora (a LoRA file for the base) or finetune (every UNet weight; a new checkpoint)
    mode: str = "lora"
    #: a memory preset (cpu, 6gb, 8gb, 12gb, 24gb) filling defaults; your own keys win
    preset: str = ""
    #: a checkpoint of models/Stable-diffusion (name as the txt2img list shows it) or a path to one
    #: (diffusers folder or A1111 single file)
    base_model: str = ""
    #: finetune only: start from base_model (checkpoint) or from random weights of ``architecture``
    init: str = "checkpoint"
    #: init=random: the sizes of the SD-1.5-architecture model (keys of finetune.ARCHITECTURE)
    architecture: dict = field(default_factory=dict)
    #: init=random: a trained VAE (a diffusers AutoencoderKL folder, e.g. from ``train-vae``) instead of a random
    #: one; the architecture's vae_* keys are then unused
    vae: str = ""
    #: what the settings are for: auto (the base decides), sd1 or sdxl (checked against the base)
    model_type: str = "auto"
    #: the dataset folder (kohya ``N_concept`` folders or a plain folder of images with captions)
    dataset: str = ""
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    cache_latents: str = "memory"
    # --- LoRA
    rank: int = 16
    alpha: float = 8.0
    lora_dropout: float = 0.0
    #: also train the UNet's resnet / down- and up-sampler convolutions (kohya's conv_dim); 0: off
    conv_rank: int = 0
    conv_alpha: float = 1.0
    train_text_encoder: bool = False
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    # --- optimisation
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    #: restarts of cosine_with_restarts
    lr_cycles: int = 1
    #: min-SNR-γ loss weighting (5 is the paper's and kohya's usual value); 0: off
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    prediction_type: str = "auto"
    #: autocast of UNet and text encoder; the VAE always runs in fp32
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    #: images per step on each process (kohya's train_batch_size)
    batch_size: int = 1
    #: how long: optimizer steps, or epochs (each image x its repeats once); one of them
    max_steps: int | None = None
    epochs: int | None = None
    seed: int = 42
    # --- samples while training (into <run>/samples/, with A1111 infotext)
    #: every this many steps (0: never); also after the last step
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_sampler: str = "Euler a"
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_seed: int = 1
    # --- saving
    save_every_steps: int = 0
    keep_last: int = 3
    log_every: int = 1
    #: the LoRA's file name in models/Lora (without .safetensors); default: the run name
    output_name: str = ""
    output_formats: list[str] = field(default_factory=lambda: ["kohya"])
    run_name: str = ""

    # ------------------------------------------------------------------------------------ checks
    def problems(self, world_size: int = 1) -> list[str]:
        out = []
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.preset and self.preset not in PRESETS:
            out.append(f"preset {self.preset!r} is unknown; known: {', '.join(PRESETS)}")
        out += _choice("init", self.init, INITS)
        if self.init == "random":
            from modules.training.images.finetune import architecture_problems
            if self.mode != "finetune":
                out.append("init=random makes a new model, so it needs mode=finetune (a LoRA needs a base_model)")
            if self.base_model:
                out.append("init=random starts from random weights; remove base_model (or set init=checkpoint)")
            if self.model_type == "sdxl":
                out.append("init=random builds an SD 1.5-architecture model; model_type=sdxl does not fit it")
            out += architecture_problems(self.architecture)
            if self.vae and not (Path(self.vae).expanduser() / "config.json").is_file():
                out.append(f"vae {self.vae!r} is not a diffusers AutoencoderKL folder (no config.json in it); "
                           "train one with `python -m modules.training train-vae` or leave vae empty")
        else:
            if self.vae:
                out.append("vae is for init=random only; a checkpoint brings its own VAE")
            if self.architecture:
                out.append("architecture is for init=random only; a checkpoint brings its own")
            if not self.base_model:
                out.append("base_model is required: a checkpoint name from models/Stable-diffusion or a path to "
                           "one" + (" (or init=random for a new model)" if self.mode == "finetune" else ""))
        if not self.dataset:
            out.append("dataset is required: a folder of images with captions (kohya N_concept folders)")
        elif not Path(self.dataset).expanduser().is_dir():
            out.append(f"dataset {self.dataset!r} is not a folder")
        out += _choice("model_type", self.model_type, MODEL_TYPES)
        out += _choice("cache_latents", self.cache_latents, CACHE_LATENTS)
        out += _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        out += _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        out += _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        out += self._resolution_problems()
        if self.rank <= 0:
            out.append(f"rank must be > 0, got {self.rank} (kohya users take 4 to 128; 16 is usual)")
        if self.conv_rank < 0:
            out.append(f"conv_rank must be 0 (off) or more, got {self.conv_rank}")
        if not self.alpha > 0:
            out.append(f"alpha must be > 0, got {self.alpha} (often rank/2 or rank)")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("unet_lr", "text_encoder_lr"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be > 0, got {getattr(self, name)} (kohya's usual: 1e-4 UNet, 5e-5 TE)")
        out += self._optimizer_problems()
        if self.weight_decay < 0:
            out.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.max_grad_norm > 0:
            out.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("warmup_steps", "save_every_steps", "keep_tokens"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("gradient_accumulation", "batch_size", "keep_last", "log_every", "lr_cycles"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_snr_gamma", "noise_offset"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be 0 (off) or more, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout_rate <= 1:
            out.append(f"caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")
        if self.seed < 0:
            out.append(f"seed must be 0 or more, got {self.seed}")
        if (self.max_steps is None) == (self.epochs is None):
            out.append("set max_steps or epochs (one of them): how long the run trains")
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name} must be at least 1, got {value}")
        out += self._sample_problems()
        bad = [f for f in self.output_formats if f not in OUTPUT_FORMATS]
        if bad or not self.output_formats:
            out.append(f"output_formats must list some of {', '.join(OUTPUT_FORMATS)}, got {self.output_formats}")
        for name in ("output_name", "run_name"):
            value = getattr(self, name)
            if value and ("/" in value or "\\" in value or value.startswith(".")):
                out.append(f"{name} {value!r} must be a plain name (no '/' and no leading '.')")
        return out

    def _resolution_problems(self) -> list[str]:
        out = []
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 64):
                out.append(f"{name} must be a multiple of 64 (SD's UNet halves the 1/8 latent three times), "
                           f"got {value}; try {max(64, round(value / 64) * 64)}")
        return out

    def _sample_problems(self) -> list[str]:
        from modules.diffusion.samplers import resolve_sampler
        out = []
        if self.sample_every < 0:
            out.append(f"sample_every must be 0 (off) or more, got {self.sample_every}")
        if self.sample_every and not self.sample_prompts:
            out.append("sample_every is set but sample_prompts is empty; list the prompts to sample")
        if self.sample_steps < 1:
            out.append(f"sample_steps must be at least 1, got {self.sample_steps}")
        if self.sample_seed < 0:
            out.append(f"sample_seed must be 0 or more, got {self.sample_seed}")
        try:
            resolve_sampler(self.sample_sampler)
        except ValueError as exc:
            out.append(f"sample_sampler: {exc}")
        return out

    def _optimizer_problems(self) -> list[str]:
        if self.optimizer not in OPTIMIZERS:
            return [f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"]
        module, package = OPTIMIZERS[self.optimizer]
        if module is None:
            return []
        try:
            importlib.import_module(module)
        except Exception as exc:          # not installed, or installed but broken (no CUDA build, …)
            return [f"optimizer {self.optimizer} needs the {package} package, which does not import here "
                    f"({type(exc).__name__}: {exc}); install it with `pip install {package}` or use adamw"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, options: tuple[str, ...]) -> list[str]:
    return [] if value in options else [f"{name} must be one of {', '.join(options)}, got {value!r}"]


def base_problems(config: ImageTrainConfig, kind: str, base_name: str) -> list[str]:
    """Settings that do not fit the base model's *kind* ("sd1", "sd2" or "sdxl"), named with both."""
    out = []
    family = "sdxl" if kind == "sdxl" else "sd1"
    if config.model_type != "auto" and config.model_type != family:
        out.append(f"model_type={config.model_type} but base_model {base_name} is an {kind} checkpoint; set "
                   f"model_type={family} (or auto), or pick an {config.model_type} base model")
    return out


def load_image_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                      world_size: int = 1, base: dict | None = None) -> ImageTrainConfig:
    """:func:`load_config` for :class:`ImageTrainConfig` with the named ``preset`` as the defaults
    (the file's and the overrides' keys win); *base* (a resumed run's config) comes first of all."""
    import yaml
    preset = (base or {}).get("preset", "")
    if path is not None and Path(path).is_file():
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            loaded = None                          # load_config reports it
        if isinstance(loaded, dict) and "preset" in loaded:
            preset = loaded["preset"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "preset":
            preset = value.strip()
    defaults = dict(PRESETS.get(preset, {})) if isinstance(preset, str) else {}
    return load_config(path, overrides, cls=ImageTrainConfig, world_size=world_size,
                       base={**defaults, **(base or {})})


__all__ = ["ImageTrainConfig", "ConfigError", "load_image_config", "base_problems", "PRESETS"]
