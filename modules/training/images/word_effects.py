"""Which caption words an image model uses: its denoising loss with the true caption and with one word changed.

Why this measurement: ``eval-images`` says *that* a model draws an attribute wrong, not *why*. A model can
miss an attribute because it never learned to follow the word (training did not teach it) or because it
follows it but draws poorly (too few steps, a VAE that blurs small shapes). The training loss tells those
apart directly: take held-out one-object scenes, noise their latents at a timestep, and compare the loss
of the UNet's prediction under the true caption with the loss under the same caption with one attribute
word changed (``large red circle, top left`` -> ``large red circle, bottom``), everything else (latents,
noise, timestep) the same. The increase is what that word is worth to the model at that noise level:

* about 0 — the model ignores the word (its prediction does not change, or not for the better);
* greater than 0 — the word helps it predict the picture, so it has learned what the word means;
* the empty caption's increase is what the whole prompt is worth (what classifier-free guidance amplifies).

High timesteps are where a word has to do the most: the noisy latent hides the picture there, so the
prompt is the only source of where and what the object is, and that is where sampling decides the layout.

The loss is the one the model was trained with: epsilon or v target, by the scheduler's
``prediction_type``, latents as the trainer encodes them (the VAE posterior's mean, shifted and scaled),
captions tokenized as the trainer does. SD 1.x / 2.x models (one text encoder) only.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from modules.shapes.vocabulary import BASE_SHAPES, COLOURS, POSITIONS, SIZES, Scene, caption

#: the words that can be changed, in table order ("background" is the background colour word)
ALTERED = ("shape", "colour", "size", "position", "background")
DEFAULT_TIMESTEPS = (200, 500, 800, 950, 999)

#: (noisy latents, timesteps, captions) -> the UNet's prediction, for the loss against the target
Predict = Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]


class WordEffectsError(ValueError):
    """Bad settings or a model this measurement cannot read; the message says what to change."""


@dataclass
class WordEffectRow:
    """One timestep: the loss with the true caption, and each change's loss increase over it."""
    timestep: int
    loss: float
    increase: dict[str, float]


def altered_scene(scene: Scene, attribute: str, rng: random.Random, shapes: Sequence[str] = BASE_SHAPES) -> Scene:
    """*scene* (one object) with *attribute* set to another allowed value, drawn from *rng*: a colour never
    equal to the background, a background never equal to the object's colour."""
    if len(scene.objects) != 1:
        raise WordEffectsError(f"word effects are measured on one-object scenes, not {caption(scene)!r}")
    obj = scene.objects[0]
    if attribute == "background":
        return dataclasses.replace(scene, background=rng.choice(
            [c for c in COLOURS if c not in (scene.background, obj.colour)]))
    pools = {"shape": [s for s in shapes if s != obj.shape],
             "colour": [c for c in COLOURS if c not in (obj.colour, scene.background)],
             "size": [s for s in SIZES if s != obj.size],
             "position": [p for p in POSITIONS if p != obj.position]}
    if attribute not in pools:
        raise WordEffectsError(f"attribute {attribute!r} is not one of {', '.join(ALTERED)}")
    if not pools[attribute]:
        raise WordEffectsError(f"there is no other {attribute} to put in place of {getattr(obj, attribute)!r}")
    return dataclasses.replace(scene, objects=(dataclasses.replace(obj, **{attribute: rng.choice(pools[attribute])}),))


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[str]:
    """Problems with *timesteps* for a scheduler of *num_train_timesteps* (empty when they are fine)."""
    if not timesteps:
        return ["give at least one timestep"]
    bad = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        return [f"timesteps {bad} are outside the model's 0..{num_train_timesteps - 1}"]
    return []


def measure(predict: Predict, scheduler, latents: torch.Tensor, scenes: list[Scene], *,
            timesteps: Sequence[int] = DEFAULT_TIMESTEPS, prediction_type: str = "epsilon", seed: int = 0,
            batch_size: int = 64, shapes: Sequence[str] = BASE_SHAPES) -> list[WordEffectRow]:
    """The rows of the measurement for *scenes* (one object each) and their clean *latents* (N, C, h, w).

    *scheduler* is a diffusers training scheduler (``add_noise``, ``get_velocity``); one noise draw of
    *seed* per (timestep, image) is shared by every caption variant, and so is the altered value of each
    attribute (drawn once per image from *seed*), so the rows differ only in the caption."""
    problems = check_timesteps(list(timesteps), scheduler.config.num_train_timesteps)
    if problems:
        raise WordEffectsError("; ".join(problems))
    if len(scenes) != len(latents) or not scenes:
        raise WordEffectsError(f"{len(scenes)} scenes but {len(latents)} latents; give one latent per scene")
    rng = random.Random(f"atelier-word-effects:{seed}")
    captions = {"true": [caption(s) for s in scenes], "empty": [""] * len(scenes)}
    for attribute in ALTERED:
        captions[attribute] = [caption(altered_scene(s, attribute, rng, shapes)) for s in scenes]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((len(latents),), int(t), dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, steps)
        if prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        elif prediction_type == "epsilon":
            target = noise
        else:
            raise WordEffectsError(f"prediction_type {prediction_type!r} is not epsilon or v_prediction")
        losses = {}
        for name, texts in captions.items():
            total = 0.0
            for start in range(0, len(latents), batch_size):
                part = slice(start, start + batch_size)
                with torch.no_grad():
                    prediction = predict(noisy[part], steps[part], texts[part])
                total += (prediction.float().cpu() - target[part]).pow(2).mean(dim=(1, 2, 3)).sum().item()
            losses[name] = total / len(latents)
        rows.append(WordEffectRow(int(t), losses["true"],
                                  {name: losses[name] - losses["true"] for name in (*ALTERED, "empty")}))
    return rows


def pipeline_predictor(pipe, device: torch.device) -> Predict:
    """The UNet of an SD 1.x / 2.x pipeline conditioned on captions tokenized and encoded as the trainer
    does (padding to the tokenizer's length, the text encoder's last hidden state)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise WordEffectsError("word-effects measures SD 1.x / 2.x models (one text encoder), not SDXL")
    tokenizer, encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet

    def predict(noisy: torch.Tensor, steps: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        states = encoder(ids)[0]
        return unet(noisy.to(device, unet.dtype), steps.to(device),
                    encoder_hidden_states=states.to(unet.dtype)).sample
    return predict


def encode_scenes(vae, scenes: list[Scene], size: int, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """The scenes drawn by the generator at *size* px (no jitter), encoded as the trainer encodes pictures."""
    from modules.diffusion.images import to_tensor
    from modules.shapes.render import render
    out = []
    for start in range(0, len(scenes), batch_size):
        pixels = to_tensor([render(s, size) for s in scenes[start:start + batch_size]])
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out.append(((latents - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def format_table(rows: list[WordEffectRow]) -> str:
    """Markdown: a row per timestep, the true caption's loss and each change's increase."""
    head = "| timestep | loss, true caption | " + " | ".join(f"+ other {a}" for a in ALTERED) + " | + empty caption |"
    lines = [head, "|" + "---|" * (3 + len(ALTERED))]
    for r in rows:
        lines.append(f"| {r.timestep} | {r.loss:.4f} | "
                     + " | ".join(f"{r.increase[a]:+.4f}" for a in (*ALTERED, "empty")) + " |")
    return "\n".join(lines)
