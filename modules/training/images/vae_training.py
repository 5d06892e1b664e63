"""Training a small VAE from random weights: the first stage of a text-to-image model made from nothing.

Why train one at all: SD's own VAE is 84M parameters and made for 512 px photographs; a from-scratch demo
model (``atelier-shapes``) needs a tiny one that turns its 64 px pictures into latents and back. A random
VAE encodes well enough for the UNet to learn, but its decoder cannot draw, so the VAE is trained first and
then frozen while the UNet trains, as in Stable Diffusion.

The model is diffusers' ``AutoencoderKL`` (so every pipeline, single-file conversion and loader handles
it); the loop is ours because it is four lines: reconstruction loss (L1 + MSE on pixels in [-1, 1]) plus a
tiny KL term that keeps the latents near a unit Gaussian, AdamW, warmup then cosine. The decoder is fed the
posterior's mean, not a sample: at random initialisation the posterior's standard deviation is about 1, so
sampled latents are mostly noise and a small VAE takes thousands of steps to learn past it; the UNet trainer
encodes images to that mean too (``ImageTrainer.encode``), so this is the latent the UNet learns. The pictures come from
the captioned-shapes generator, every shape and style included — also the held-out hexagon and the outlined
style that base image training never shows, so that DreamBooth and LoRA can later teach them through this
VAE. After training, ``scaling_factor`` is set to 1 / the latents' standard deviation, as SD did, so the
UNet's noise schedule sees unit-variance latents.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class VAETrainingError(ValueError):
    """Bad settings or an output that would overwrite something; the message says what to change."""


@dataclass
class VAETrainConfig:
    #: widths of the encoder/decoder levels; n levels shrink images 2^(n-1) times (3: 64 px -> 16x16 latents)
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    #: latent channels: SD 1.5 has 4; 16 (as SD 3) keep small, thin shapes through a 4x VAE in far fewer steps
    latent_channels: int = 16
    norm_num_groups: int = 8
    image_size: int = 64
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    #: loss weight of the pixels that are not background (see :func:`object_weights`)
    object_weight: float = 10.0
    seed: int = 0
    #: the generator seed of the training pictures (held-out checks use another)
    data_seed: int = 100

    def problems(self) -> list[str]:
        out = []
        widths = self.block_out_channels
        if not (isinstance(widths, list) and 2 <= len(widths) <= 4 and all(isinstance(w, int) and w > 0
                                                                          for w in widths)):
            out.append(f"block_out_channels must be 2 to 4 positive widths, got {widths!r}")
        elif any(w % self.norm_num_groups for w in widths):
            out.append(f"block_out_channels {widths} must divide by norm_num_groups ({self.norm_num_groups})")
        scale = 2 ** (len(widths) - 1) if isinstance(widths, list) and widths else 1
        if self.image_size < 16 or self.image_size % (scale * 4):
            out.append(f"image_size must be at least 16 and a multiple of {scale * 4}, got {self.image_size}")
        for name in ("steps", "batch_size", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            out.append(f"lr and min_lr must satisfy 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.kl_weight < 0:
            out.append("warmup_steps and kl_weight must be 0 or more")
        return out


def build_vae(config: VAETrainConfig):
    from diffusers import AutoencoderKL
    levels = len(config.block_out_channels)
    torch.manual_seed(config.seed)
    return AutoencoderKL(block_out_channels=tuple(config.block_out_channels),
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=config.latent_channels,
                         layers_per_block=1, norm_num_groups=config.norm_num_groups, sample_size=config.image_size)


def shapes_pixels(seed: int, start: int, count: int, size: int) -> torch.Tensor:
    """Generator pictures ``start .. start+count`` of *seed* (every shape and style) as pixels in [-1, 1]."""
    from modules.shapes.dataset import render_example
    from modules.shapes.vocabulary import SHAPES, STYLES
    arrays = [np.asarray(render_example(seed, i, size, shapes=SHAPES, styles=STYLES)[0], dtype=np.float32)
              for i in range(start, start + count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights: *object_weight* where a pixel differs from its picture's background (its
    per-channel median colour), 1 elsewhere. A shapes picture is mostly
    background, so a plain mean would let a VAE blur the objects — the part the prompt is about."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    differs = ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1 + (object_weight - 1) * differs


def lr_at(config: VAETrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(config: VAETrainConfig, *, on_log: Callable[[dict], None] | None = None,
              log_every: int = 25):
    """Train and return the VAE (scaling factor set) and its log records."""
    problems = config.problems()
    if problems:
        raise VAETrainingError("; ".join(problems))
    vae = build_vae(config)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    records = []
    started = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        x = shapes_pixels(config.data_seed, step * config.batch_size, config.batch_size, config.image_size)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.mean).sample
        weight = object_weights(x, config.object_weight)
        reconstruction = (weight * ((y - x).abs() + (y - x) ** 2)).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = reconstruction + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise VAETrainingError(f"the VAE's loss became {value} at step {step + 1}; try a lower lr")
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "loss": value, "reconstruction": float(reconstruction.detach()),
                      "kl": float(kl.detach()), "lr": lr_at(config, step), "elapsed_s": time.perf_counter() - started}
            records.append(record)
            if on_log:
                on_log(record)
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config))
    return vae, records


@torch.no_grad()
def latent_scaling_factor(vae, config: VAETrainConfig, n: int = 512) -> float:
    """1 / the standard deviation of the latents (posterior means) of *n* generator pictures of a held-out seed."""
    x = shapes_pixels(config.data_seed + 1, 0, n, config.image_size)
    means = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, n, 64)])
    return float(1.0 / means.std())


@torch.no_grad()
def reconstruction_report(vae, config: VAETrainConfig, *, n: int = 500, seed: int = 7) -> dict:
    """How well the VAE's round trip keeps a picture readable: the shapes classifier's share of
    reconstructions read exactly as their scenes (beside its share on the originals), and the pixel error."""
    from modules.shapes.classifier import load_classifier
    from modules.shapes.dataset import render_example
    from modules.shapes.vocabulary import SHAPES, STYLES
    from PIL import Image
    classifier = load_classifier()
    scenes, originals, rebuilt, errors = [], [], [], []
    for start in range(0, n, 50):
        batch = [render_example(seed, i, config.image_size, shapes=SHAPES, styles=STYLES)
                 for i in range(start, min(n, start + 50))]
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im, _ in batch])).permute(0, 3, 1, 2)
        x = x / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errors.append(float((y - x).abs().mean()) * 127.5)
        arrays = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rebuilt += [Image.fromarray(a) for a in arrays]
        originals += [im for im, _ in batch]
        scenes += [scene for _, scene in batch]
    read_rebuilt = classifier.read(rebuilt)
    read_original = classifier.read(originals)
    return {"n": n, "seed": seed,
            "classifier_exact_reconstructions": sum(r.matches(s) for r, s in zip(read_rebuilt, scenes)) / n,
            "classifier_exact_originals": sum(r.matches(s) for r, s in zip(read_original, scenes)) / n,
            "mean_abs_error_0_255": sum(errors) / len(errors)}


def save_vae(vae, out: Path, record: dict) -> Path:
    """Write the VAE as a diffusers folder (fp32) with ``atelier-vae.json``; never over an existing folder."""
    out = Path(out)
    if out.exists():
        raise VAETrainingError(f"{out} exists already and is never overwritten; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "atelier-vae.json").write_text(json.dumps(record, indent=2))
        Path(tmp).replace(out)
    return out


def config_dict(config: VAETrainConfig) -> dict:
    return asdict(config)
