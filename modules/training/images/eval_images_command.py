"""eval-images: draw held-out shapes prompts with a model and score them with the shapes classifier.

    python -m modules.training eval-images --model atelier-shapes [--n 200] [--samplers "Euler a,DPM++ 2M"]
        [--steps 20] [--cfg-scale 7] [--seed 1] [--size 64] [--prompt-seed 12345] [--out FILE.json]

Worked-example measurements (see docs/training.md):

    # DreamBooth: is the taught shape found in `sks hexagon` samples, and do plain prompts stay right?
    ... eval-images --model atelier-shapes --lora NAME:1 --shapes hexagon --identifier sks
    ... eval-images --model atelier-shapes --lora NAME:1 --shapes base
    # style LoRA: the share read as outlined at LoRA weight 0 and 1
    ... eval-images --model atelier-shapes --lora NAME:0,1 --style outlined

Prints a table (share of images with every attribute right, each attribute's share, s/image) per sampler
and LoRA weight; ``--out`` writes it, with every prompt and what was read, as JSON. The measurement is
:mod:`modules.training.images.eval_images`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from modules.training.images.eval_images import OBJECT_COUNTS, EvalImagesError, EvalSettings, evaluate, \
    format_table, report_dict, shape_choice, style_choice

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint name (as txt2img lists it) or path")
    parser.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    parser.add_argument("--samplers", default="Euler a,DPM++ 2M", help="comma-separated A1111 sampler names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1, help="image i uses seed + i (the same for every sampler)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--prompt-seed", type=int, default=12345,
                        help="seed of the held-out prompt stream ('atelier-shapes-eval:<seed>', never training's)")
    parser.add_argument("--shapes", nargs="+", default=["base"], metavar="base|held-out|NAME",
                        help="shapes the prompts use: base (default), held-out (hexagon) or shape names")
    parser.add_argument("--style", default="filled", help="filled (default), outlined or any")
    parser.add_argument("--objects", default="mixed", choices=list(OBJECT_COUNTS),
                        help="objects per prompt: 1, 2 or mixed (default; half and half)")
    parser.add_argument("--identifier", help="a DreamBooth identifier put before each shape word (e.g. sks)")
    parser.add_argument("--prompt-template",
                        help="prompt built from fields {caption} {background} {object} {size} {style} {colour} "
                             "{shape} {position} (object fields need --objects 1)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--lora", metavar="NAME:W[,W...]",
                        help="a LoRA from models/Lora applied as <lora:NAME:W>; several weights are measured "
                             "one after another (NAME:0,1)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (never over an existing file)")
    parser.add_argument("--data-dir", help="Atelier's data dir (models/Stable-diffusion, models/Lora); "
                                           "default: the repository folder")
    parser.add_argument("--save-images", metavar="DIR", help="also write every picture with its prompt as a "
                        "caption file (an empty or new folder), e.g. DreamBooth class images of many prompts")
    parser.add_argument("--classifier", help="shapes-classifier folder (default: models/shapes-classifier)")


def parse_lora(text: str | None) -> tuple[str | None, tuple[float, ...]]:
    """``NAME``, ``NAME:W`` or ``NAME:W1,W2`` -> (name, weights)."""
    if text is None:
        return None, (1.0,)
    name, sep, weights = text.rpartition(":")
    if not sep:
        return text, (1.0,)
    try:
        values = tuple(float(w) for w in weights.split(","))
    except ValueError:
        raise EvalImagesError(f"--lora {text!r}: write NAME:W with numeric weights, e.g. mystyle:1 or "
                              "mystyle:0,1") from None
    if not name:
        raise EvalImagesError(f"--lora {text!r}: the LoRA name is missing; write NAME:W")
    return name, values


def settings_from(args: argparse.Namespace) -> EvalSettings:
    lora, weights = parse_lora(args.lora)
    return EvalSettings(
        model=args.model, n=args.n, samplers=tuple(s.strip() for s in args.samplers.split(",") if s.strip()),
        steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, size=args.size, prompt_seed=args.prompt_seed,
        shapes=shape_choice(args.shapes), styles=style_choice(args.style), objects=args.objects,
        identifier=args.identifier, prompt_template=args.prompt_template, negative_prompt=args.negative_prompt,
        lora=lora, lora_weights=weights, data_dir=args.data_dir, classifier=args.classifier,
        save_images=args.save_images)


def run(args: argparse.Namespace) -> int:
    from modules.shapes.classifier import ClassifierError
    try:
        if args.out is not None and args.out.exists():
            raise EvalImagesError(f"--out {args.out} exists already and is never overwritten; choose another file")
        settings = settings_from(args)
        every = max(1, settings.n // 10)

        def progress(label: str, done: int, total: int) -> None:
            if done % every == 0 or done == total:
                log.info("%s: %d/%d images", label, done, total)

        results, about = evaluate(settings, on_image=progress)
    except (EvalImagesError, ClassifierError) as exc:
        print(f"eval-images: error: {exc}", file=sys.stderr)
        return 2
    print(f"{about['model']} ({about['model_kind']}), {settings.n} held-out prompts (prompt seed "
          f"{settings.prompt_seed}), {settings.steps} steps, CFG {settings.cfg_scale:g}, {settings.size} px, "
          f"seeds {settings.seed}..{settings.seed + settings.n - 1}, on {about['device']}")
    print(format_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "x", encoding="utf-8") as f:
            json.dump(report_dict(settings, results, about), f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0
