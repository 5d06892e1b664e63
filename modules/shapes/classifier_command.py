"""train-shapes-classifier: train the captioned-shapes attribute classifier and measure it on held-out images.

    python -m modules.training train-shapes-classifier [--out DIR] [--steps N] [--batch-size B] [--lr LR]
                                                       [--seed S] [--eval-seed S] [--eval-images N]
                                                       [--eval-sizes PX ...] [--threads N] [--force]

Trains on freshly rendered generator images of ``--seed`` (every shape and style, hexagon and outlined
included), then measures :func:`~modules.shapes.classifier_training.classifier_accuracy` on ``--eval-images``
images of ``--eval-seed`` at each of ``--eval-sizes``, read with the saved fp16 weights (what ships). Writes
``model.safetensors``, ``config.json`` (architecture, vocabulary, settings, time, accuracy) and a
``README.md`` model card with those figures into ``--out`` (default: the repository's
``models/shapes-classifier/``). An existing classifier there is kept unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from modules.shapes.classifier import CONFIG_FILE, DEFAULT_DIR, WEIGHTS_FILE, load_classifier, save_classifier
from modules.shapes.classifier_training import TrainSettings, TrainSettingsError, classifier_accuracy, \
    train_classifier
from modules.shapes.render import RenderError, check_size

log = logging.getLogger(__name__)
CARD_FILE = "README.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed of the training images")
    parser.add_argument("--eval-seed", type=int, default=1, help="generator seed of the held-out images "
                        "(must differ from --seed)")
    parser.add_argument("--eval-images", type=int, default=2000, help="held-out images measured after training")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[64, 128], metavar="PX",
                        help="image sizes they are measured at (64 px is the demo image model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--force", action="store_true", help="replace a classifier already in --out")


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.eval_seed == args.seed:
        problems.append(f"--eval-seed ({args.eval_seed}) must differ from --seed, or the held-out images are "
                        "training images")
    if args.eval_images < 1:
        problems.append(f"--eval-images must be >= 1, not {args.eval_images}")
    for size in args.eval_sizes:
        try:
            check_size(size)
        except RenderError as exc:
            problems.append(f"--eval-sizes: {exc}")
    if not args.force and any((args.out / name).exists() for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)):
        problems.append(f"{args.out} already holds a classifier; pass --force to replace it or --out elsewhere")
    try:
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    except TrainSettingsError as exc:
        problems.append(str(exc))
    if problems:
        print("train-shapes-classifier: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = train_classifier(settings, log=lambda r: log.info(
        "step %(step)d loss %(loss).4f lr %(lr).2e %(images_per_s).0f images/s", r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-classifier-", dir=args.out.parent))
    try:
        save_classifier(classifier, staging)
        shipped = load_classifier(staging)          # measure the fp16 weights that ship, not the fp32 ones
        accuracy = [classifier_accuracy(shipped, seed=args.eval_seed, n=args.eval_images, size=size)
                    for size in args.eval_sizes]
        classifier.record.update(accuracy=accuracy, torch_threads=torch.get_num_threads())
        save_classifier(classifier, staging)
        (staging / CARD_FILE).write_text(model_card(load_classifier(staging).record), encoding="utf-8")
        args.out.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
            os.replace(staging / name, args.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(format_accuracy(accuracy))
    print(f"\ntrained in {classifier.record['train_seconds']:.0f} s wall-clock "
          f"({classifier.record['train_cpu_seconds']:.0f} s CPU); written to {args.out}")
    return 0


def format_accuracy(accuracy: list[dict]) -> str:
    """A table: every attribute's share right, in percent, one column per image size."""
    first = accuracy[0]
    keys = [key for key, value in first.items() if isinstance(value, float)]
    head = f"{first['n']} held-out images of seed {first['seed']}"
    lines = [f"{head:<36}" + "".join(f"{str(a['image_size']) + ' px':>10}" for a in accuracy)]
    lines += [f"  {key:<34}" + "".join(f"{a[key] * 100:>9.2f}%" for a in accuracy) for key in keys]
    return "\n".join(lines)


def model_card(record: dict) -> str:
    """The README.md written beside the weights: what it is, the command that made it, its figures."""
    acc, training, arch = record["accuracy"], record["training"], record["architecture"]
    command = (f"python -m modules.training train-shapes-classifier --steps {training['steps']} "
               f"--batch-size {training['batch_size']} --lr {training['lr']} --seed {training['seed']} "
               f"--eval-seed {acc[0]['seed']} --eval-images {acc[0]['n']} "
               f"--eval-sizes {' '.join(str(a['image_size']) for a in acc)}")
    table = "\n".join("    " + line for line in format_accuracy(acc).splitlines())
    facts = [f"Model: a CNN of three stride-2 stages (channels {arch['channels']}) on images resized to "
             f"{arch['input_size']} px, one head shared by the nine cells; {record['parameters']:,} parameters, "
             "fp16 safetensors.",
             f"Data: {training['steps'] * training['batch_size']:,} images rendered on the fly from generator seed "
             f"{training['seed']} (every shape and style; sizes {training['sizes']}; {training['crowded']:.0%} of "
             f"them crowded grids of 3-9 objects; per-channel gain ±{training['gain_jitter']}, noise σ ≤ "
             f"{training['noise_std']}).",
             f"Training: {training['steps']} AdamW steps, batch {training['batch_size']}, peak lr {training['lr']}, "
             f"warmup then cosine: {record['train_seconds'] / 60:.1f} minutes wall-clock and "
             f"{record['train_cpu_seconds'] / 60:.1f} minutes of CPU time with {record['torch_threads']} torch "
             f"threads on a {record['cpu_count']}-core CPU at niceness {record['niceness']} (15-minute load average "
             f"{record['load_average_15min']} when it ended; wall-clock time includes what other work on the "
             "machine took, so it is pessimistic when the load is above the thread count)."]
    bullets = "\n".join(textwrap.fill(fact, 110, initial_indent="- ", subsequent_indent="  ") for fact in facts)
    return f"""# shapes-classifier

The attribute classifier of Atelier's captioned-shapes world (`modules/shapes/`). It reads a picture back
into its background colour and, for each cell of the 3x3 grid, empty or (shape, colour, size, style). It is
the yardstick of the demo image model `atelier-shapes` and of the DreamBooth / LoRA worked examples, so it
also knows the shape (hexagon) and style (outlined) that base image training leaves out. Use it through
`modules.shapes.classifier` (`load_classifier`, `read_scene`, `scene_matches`).

{bullets}

## Reproduce

    {command}

## Measured (fp16 weights, held-out generator images of a seed it never trained on)

{table}

`images`: every attribute right (background and all nine cells); `cells`: a cell's content (empty, or which
shape) right, over all cells; `shape`, `colour`, `size`, `style` and their breakdowns: over the true objects.
Re-measure with `python -m modules.training eval-shapes-classifier --seed {acc[0]['seed']} --n {acc[0]['n']} --size {' '.join(str(a['image_size']) for a in acc)}`.

## Limits

It knows only this world: up to one object per grid cell, inside the cell, in the palette's colours. An
object across two cells or of another colour is read as the nearest thing it knows; a picture of three or
more objects is read as such, and `read_scene` returns None for it (no caption describes it). It was measured
on generator images: on a diffusion model's pictures its readings are only as good as those pictures are
close to the generator's.
"""
