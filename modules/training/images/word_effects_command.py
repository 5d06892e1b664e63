"""word-effects: which caption words an image model uses (its loss with the true caption vs one word changed).

    python -m modules.training word-effects --model atelier-shapes [--n 128] [--timesteps 200,500,800,950,999]
        [--seed 0] [--prompt-seed 12345] [--size 64] [--out FILE.json]

On held-out one-object shapes scenes, prints per timestep the training loss with the true caption and how
much it rises when the shape, colour, size, position or background word is swapped for another (about 0:
the model ignores that word) or the caption is left empty. The measurement and how to read it:
:mod:`modules.training.images.word_effects`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from modules.training.images.word_effects import DEFAULT_TIMESTEPS, WordEffectsError, format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint name (as txt2img lists it) or path")
    parser.add_argument("--n", type=int, default=128, help="number of held-out one-object scenes (default 128)")
    parser.add_argument("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)),
                        help="comma-separated training timesteps to measure at (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of the swapped words")
    parser.add_argument("--prompt-seed", type=int, default=12345, help="seed of eval-images' held-out scene stream")
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels (the model's training size)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (never over an existing file)")
    parser.add_argument("--data-dir", help="Atelier's data dir (models/Stable-diffusion); default: the repository")


def parse_timesteps(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise WordEffectsError(f"--timesteps {text!r}: write whole numbers separated by commas, e.g. "
                               "200,500,999") from None


def run(args: argparse.Namespace) -> int:
    try:
        if args.out is not None and args.out.exists():
            raise WordEffectsError(f"--out {args.out} exists already and is never overwritten; choose another file")
        if args.n < 1:
            raise WordEffectsError(f"--n must be at least 1, not {args.n}")
        from modules.shapes.render import RenderError, check_size
        try:
            check_size(args.size)
        except RenderError as exc:
            raise WordEffectsError(f"--size: {exc}") from None
        timesteps = parse_timesteps(args.timesteps)
        rows, about = measure_model(args.model, args.data_dir, n=args.n, timesteps=timesteps, seed=args.seed,
                                    prompt_seed=args.prompt_seed, size=args.size)
    except WordEffectsError as exc:
        print(f"word-effects: error: {exc}", file=sys.stderr)
        return 2
    print(f"{about['model']}: {args.n} held-out one-object scenes (prompt seed {args.prompt_seed}), "
          f"{about['prediction_type']} loss, noise seed {args.seed}; an increase near 0 means the word is ignored")
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "x", encoding="utf-8") as f:
            json.dump({**about, "n": args.n, "seed": args.seed, "prompt_seed": args.prompt_seed,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0


def measure_model(model: str, data_dir: str | None, *, n: int, timesteps: list[int], seed: int, prompt_seed: int,
                  size: int):
    """Load *model* as txt2img does (eval-images' loader) and measure it; returns (rows, what was measured)."""
    from diffusers import DDPMScheduler

    from modules.training.images.eval_images import EvalImagesError, EvalSettings, held_out_scenes, load_model
    from modules.training.images.word_effects import encode_scenes, measure, pipeline_predictor
    try:
        sd, _ = load_model(EvalSettings(model=model, data_dir=data_dir))
    except EvalImagesError as exc:
        raise WordEffectsError(str(exc)) from exc
    except ValueError as exc:
        raise WordEffectsError(f"--model {model}: {exc}") from exc
    info, device = sd.info, sd.device
    pipe = sd.pipe
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = scheduler.config.get("prediction_type") or "epsilon"
    scenes = held_out_scenes(n, prompt_seed, objects="1")
    predict = pipeline_predictor(pipe, device)
    latents = encode_scenes(pipe.vae, scenes, size, device)
    rows = measure(predict, scheduler, latents, scenes, timesteps=timesteps, prediction_type=prediction_type,
                   seed=seed)
    return rows, {"model": info.model_name, "model_file": str(info.filename), "prediction_type": prediction_type}
