"""Training and measuring the shapes classifier on the generator itself.

Why on-the-fly rendering: the generator draws an image in a tenth of a millisecond, so every step gets
fresh, exactly labelled images and nothing is stored. Batch ``k`` of training seed ``s`` is always the
same images (examples ``k*B .. k*B+B-1`` of that seed, see :func:`render_batch`), so a run is reproducible
from its settings; :func:`classifier_accuracy` uses another seed, i.e. images never trained on.

The training images cover the whole world (every shape, both styles) at the sizes of
:attr:`TrainSettings.sizes`, lightly perturbed (per-channel gain, pixel noise) so that the classifier also
reads the slightly-off colours a diffusion model paints; it is measured on clean generator images. Half of
them are crowded grids of three to nine objects rather than captionable scenes: a scene fills one or two of
the nine cells, a crowded grid teaches on every cell, and at 400 steps that took the share of held-out images
read fully right from 68% to 93% (same compute). The scenes keep the two-object case in the mix.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from modules.shapes.classifier import IGNORE, ClassifierConfig, Reading, ShapesClassifier, ShapesNet, \
    images_to_tensor, scene_targets, split_cell_logits
from modules.shapes.dataset import example_rng, render_example
from modules.shapes.render import check_size, render_layout
from modules.shapes.vocabulary import COLOURS, POSITIONS, SHAPES, SIZES, STYLES, ShapeObject


class TrainSettingsError(ValueError):
    """Bad classifier-training settings; the message names each one."""


@dataclass(frozen=True)
class TrainSettings:
    """How the classifier is trained (saved in its ``config.json``)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0                        # training images are examples of this generator seed
    torch_seed: int = 0                  # initial weights and augmentation noise
    sizes: tuple[int, ...] = (64, 64, 64, 128)   # render sizes, cycled per example (64 px is the demo model's)
    gain_jitter: float = 0.05            # per-channel colour gain in [1 - j, 1 + j]
    noise_std: float = 0.02              # at most this much Gaussian pixel noise (uniform per image)
    crowded: float = 0.5                 # share of training images that are 3-9 object grids (see render_batch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        problems = [f"{name} must be a whole number >= {low}, not {getattr(self, name)!r}"
                    for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0))
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < low]
        problems += [f"{name} must be >= 0, not {getattr(self, name)!r}"
                     for name in ("weight_decay", "gain_jitter", "noise_std") if not getattr(self, name) >= 0]
        if not 0 <= self.crowded <= 1:
            problems.append(f"crowded must be a share from 0 to 1, not {self.crowded!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, not {self.lr!r}")
        for size in self.sizes or ("(none)",):
            try:
                check_size(size)
            except ValueError as exc:
                problems.append(f"sizes: {exc}")
        if problems:
            raise TrainSettingsError("; ".join(problems))


def render_batch(seed: int, start: int, count: int, sizes: tuple[int, ...],
                 crowded: float = 0.0) -> tuple[list, list[Reading]]:
    """Examples ``start .. start+count-1`` of ``seed`` over the whole world: (images, their true readings).

    A share ``crowded`` of them (chosen per example) are :func:`crowded_layout` grids instead of scenes.
    """
    images, truths = [], []
    for index in range(start, start + count):
        size = sizes[index % len(sizes)]
        rng = example_rng(seed, index)
        if crowded and rng.random() < crowded:
            truth = crowded_layout(rng)
            images.append(render_layout(truth.objects, truth.background, size, jitter_seed=rng.getrandbits(64)))
        else:
            image, scene = render_example(seed, index, size, shapes=SHAPES, styles=STYLES)
            images.append(image)
            truth = Reading(scene.background, scene.objects)
        truths.append(truth)
    return images, truths


def crowded_layout(rng: random.Random) -> Reading:
    """Three to nine objects of the whole world in random cells, none of the background's colour."""
    background = rng.choice(COLOURS)
    colours = [c for c in COLOURS if c != background]
    positions = rng.sample(POSITIONS, rng.randint(3, len(POSITIONS)))
    return Reading(background, tuple(ShapeObject(shape=rng.choice(SHAPES), colour=rng.choice(colours),
                                                 size=rng.choice(SIZES), position=position,
                                                 style=rng.choice(STYLES)) for position in positions))


def augment(x: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Per-image, per-channel gain and Gaussian noise, clamped to [0, 1]."""
    b = x.shape[0]
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * settings.gain_jitter
    std = torch.rand(b, 1, 1, 1, generator=generator) * settings.noise_std
    return (x * gain + torch.randn(x.shape, generator=generator) * std).clamp_(0, 1)


def classifier_loss(net: ShapesNet, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropies of the background and of every cell head (empty cells: shape only)."""
    background, cells = net(x)
    loss = F.cross_entropy(background, targets["background"])
    for head, logits in split_cell_logits(cells).items():
        target = targets[head].reshape(-1)
        if (target != IGNORE).any():
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=IGNORE)
    return loss


def train_classifier(settings: TrainSettings, config: ClassifierConfig = ClassifierConfig(), *,
                     log: Callable[[dict], None] | None = None, log_every: int = 50) -> ShapesClassifier:
    """Train a classifier from scratch; ``log`` gets ``{step, loss, lr, images_per_s}`` every ``log_every``."""
    torch.manual_seed(settings.torch_seed)
    generator = torch.Generator().manual_seed(settings.torch_seed)
    net = ShapesNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    net.train()
    started = last = time.perf_counter()
    cpu_started = time.process_time()
    running = 0.0
    for step in range(settings.steps):
        images, truths = render_batch(settings.seed, step * settings.batch_size, settings.batch_size,
                                      settings.sizes, settings.crowded)
        x = augment(images_to_tensor(images, config.input_size), settings, generator)
        loss = classifier_loss(net, x, scene_targets(truths))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the classifier's loss is {loss.item()} at step {step + 1}; "
                                     f"lower --lr (now {settings.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
            now = time.perf_counter()
            done = (step % log_every) + 1
            log({"step": step + 1, "loss": running / done, "lr": schedule.get_last_lr()[0],
                 "images_per_s": done * settings.batch_size / (now - last)})
            running, last = 0.0, now
    record = {"training": asdict(settings), "train_seconds": round(time.perf_counter() - started, 1),
              # CPU time of all threads: unlike wall-clock time, not lengthened by other work on the machine
              "train_cpu_seconds": round(time.process_time() - cpu_started, 1),
              "parameters": sum(p.numel() for p in net.parameters()),
              # other work on the machine makes the time pessimistic; the 15-minute load average says how much
              "load_average_15min": round(os.getloadavg()[2], 2), "cpu_count": os.cpu_count(),
              "niceness": os.nice(0)}
    return ShapesClassifier(net.eval(), record)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def classifier_accuracy(classifier: ShapesClassifier, *, seed: int = 1, n: int = 2000, size: int = 64,
                        batch_size: int = 256) -> dict[str, float | int]:
    """Shares right on ``n`` fresh generator images of ``seed`` (clean, jittered, whole world).

    ``images``: every attribute right (background, all nine cells); ``background``; ``cells``: a cell's
    content (empty or which shape) right, over all cells; ``shape``/``colour``/``size``/``style``: over the
    true objects; ``shape_<shape>`` and ``style_<style>`` break those down.
    """
    check_size(size)
    counts: dict[str, list[int]] = {}

    def add(key: str, right: bool) -> None:
        tally = counts.setdefault(key, [0, 0])
        tally[0] += int(right)
        tally[1] += 1

    for start in range(0, n, batch_size):
        images, truths = render_batch(seed, start, min(batch_size, n - start), (size,))
        for reading, truth in zip(classifier.read(images, batch_size=batch_size), truths):
            _score(reading, truth, add)
    result: dict[str, float | int] = {"n": n, "seed": seed, "image_size": size}
    result.update({key: right / total for key, (right, total) in sorted(counts.items())})
    return result


def _score(reading: Reading, scene: Reading, add: Callable[[str, bool], None]) -> None:
    add("images", reading.matches(scene))
    add("background", reading.background == scene.background)
    seen = {o.position: o for o in reading.objects}
    truth = {o.position: o for o in scene.objects}
    for position in POSITIONS:                              # every cell counts once, empty ones too
        got, want = seen.get(position), truth.get(position)
        add("cells", (got.shape if got else None) == (want.shape if want else None))
        if want is not None:
            for attribute in ("shape", "colour", "size", "style"):
                right = got is not None and getattr(got, attribute) == getattr(want, attribute)
                add(attribute, right)
            add(f"shape_{want.shape}", got is not None and got.shape == want.shape)
            add(f"style_{want.style}", got is not None and got.style == want.style)
