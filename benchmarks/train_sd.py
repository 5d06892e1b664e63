"""Atelier's LoRA training step against a plain diffusers + peft loop, on the same SD-1.5-shaped model.

    python benchmarks/train_sd.py                         # scaled-down SD 1.5 UNet, 256x256, fp32, CPU
    python benchmarks/train_sd.py --rounds 4 --steps 8    # steadier figures
    python benchmarks/train_sd.py --full                  # the real SD 1.5 UNet shape (860M parameters)
    python benchmarks/train_sd.py --precision bf16        # autocast on both sides
    python benchmarks/train_sd.py --profile               # + torch.profiler tables of Atelier's steps
    python benchmarks/train_sd.py --gpu                   # on CUDA: SD 1.5 at 512 and SDXL at 1024

What is measured (a script that prints a table, never a timed test):

* **Atelier**: ``run_image_training(..., mode="lora")`` of :mod:`modules.training.images.train_command`, the
  body of ``python -m modules.training lora``: the checkpoint found and loaded by Atelier's loader, the
  kohya-folder dataset, latents cached in memory, the bucket sampler, per-sample noise generators, the
  accelerate loop of :class:`~modules.training.images.trainer.ImageTrainer` with its metrics log, then the
  final checkpoint and kohya file. A step's time is the wall time between two of the trainer's per-step
  ``on_log`` calls, so everything the loop does per step counts.
* **diffusers + peft**: the core of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``,
  written inline (:func:`plain_loop`): the same diffusers folder loaded with ``from_pretrained``, frozen,
  ``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian", target_modules=...))``,
  ``torch.optim.AdamW``, a constant LR scheduler, ``DDPMScheduler.add_noise``, MSE on the noise,
  ``clip_grad_norm_``, ``zero_grad``. Latents are encoded once before the loop (Atelier caches them too).
  Two target sets: **kohya's** (every Linear / 1x1 conv of the UNet's transformer blocks, what Atelier
  trains: the same LoRA, so the goal's comparison) and **diffusers'** ``to_q/to_k/to_v/to_out.0`` (the
  script's default, fewer layers; shown for reference).
* Same model, rank, alpha, batch, precision, resolution, AdamW settings (Atelier's defaults: weight decay
  1e-2, betas 0.9/0.999) and gradient clipping (1.0) on both sides.
* **Fairness**: each side runs in its own fresh process (so ``ru_maxrss``, the peak resident memory, is
  its own), the sides alternate in ABBA order over the rounds, the first ``--warmup`` steps of each run
  are not timed, and the median step of each run is taken; the table shows the median over rounds and the
  ratio Atelier / plain within each round (its median). Peak memory is the process's ``ru_maxrss``
  (model load included, the same for both) and, on CUDA, ``torch.cuda.max_memory_allocated``.

Models (random weights, no download; block layout, layers, heads, the 768-wide cross attention, text
encoder, VAE and scheduler are SD 1.5's from ``configs/diffusion/sd1``):

* default ``sd15-small``: the SD 1.5 UNet with block widths 1/5 of 320/640/1280/1280 (64/128/256/256,
  still multiples of the 32 norm groups), about 35M parameters instead of 860M: a step of the real shape
  takes tens of seconds on a 2-core CPU and would need most of its memory;
* ``--full``: the real SD 1.5 UNet;
* ``--gpu`` (CUDA only): SD 1.5 at 512x512 and SDXL (``configs/diffusion/sdxl``) at 1024x1024, it/s and
  peak VRAM, bf16, batch 1.

Goals (issue 9): Atelier's s/step <= 1.0x and peak memory <= 1.0x the plain loop with the same LoRA.
Figures measured here (and what was changed in the trainer because of them) are in docs/training-images.md,
"Performance". No CUDA machine was available when this was written: ``--gpu`` has not been run yet.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_NAME = "bench-sd15"
#: the default scaled-down UNet: SD 1.5's layout with 1/5 of its block widths
SMALL_WIDTHS = (64, 128, 256, 256)
SIDES = ("atelier", "plain-kohya", "plain-diffusers")
DIFFUSERS_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the real SD 1.5 UNet (860M parameters)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each side runs once per round)")
    ap.add_argument("--images", type=int, default=4, help="images in the dataset")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of Atelier's timed steps")
    ap.add_argument("--gpu", action="store_true", help="CUDA: SD 1.5 at 512 and SDXL at 1024 (it/s, peak VRAM)")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [s for s in args.sides.split(",") if s not in SIDES]
    if bad:
        ap.error(f"--sides: unknown {', '.join(bad)}; choose from {', '.join(SIDES)}")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (a step's time is measured from the end of the one before)")
    if args.resolution % 64:
        ap.error(f"--resolution {args.resolution}: must be a multiple of 64")
    return args


# ---------------------------------------------------------------------------------------------- set-up
def build_pipeline(workdir: Path, *, full: bool, family: str = "sd1"):
    """A StableDiffusion(XL)Pipeline with the family's shipped configs and random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from modules.fixtures.diffusion import write_tokenizer
    cfg = REPO / "configs" / "diffusion" / family
    torch.manual_seed(0)
    unet_config = dict(UNet2DConditionModel.load_config(cfg / "unet"))
    if not full:
        unet_config["block_out_channels"] = list(SMALL_WIDTHS)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    write_tokenizer(workdir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(cfg / "scheduler"))
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    from diffusers import StableDiffusionPipeline
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def prepare(workdir: Path, args, family: str = "sd1") -> None:
    """The model as a diffusers folder in ``<workdir>/models/Stable-diffusion`` and a shapes dataset."""
    from modules.shapes.dataset import write_kohya_folder
    folder = workdir / "models" / "Stable-diffusion" / MODEL_NAME
    if not folder.exists():
        pipe = build_pipeline(workdir, full=args.full, family=family)
        pipe.save_pretrained(folder)
        params = sum(p.numel() for p in pipe.unet.parameters())
        (workdir / "unet-params.txt").write_text(str(params))
    if not (workdir / "dataset").exists():
        write_kohya_folder(workdir / "dataset", seed=0, n=args.images, size=min(args.resolution, 512))


# ---------------------------------------------------------------------------------------------- the sides
def atelier_run(workdir: Path, args) -> dict:
    """Atelier's ``lora`` command body on the model; step times from the trainer's per-step log."""
    from modules.training.images.train_command import run_image_training
    run_name = f"bench-{os.getpid()}"
    stamps: list[tuple[float, float]] = []
    settings = {"mode": "lora", "base_model": MODEL_NAME, "dataset": str(workdir / "dataset"),
                "resolution": args.resolution, "enable_bucket": False, "rank": args.rank, "alpha": args.rank,
                "batch_size": args.batch, "max_steps": args.warmup + args.steps, "unet_lr": 1e-4,
                "lr_scheduler": "constant", "mixed_precision": "bf16" if args.precision == "bf16" else "no",
                "cache_latents": "memory", "save_every_steps": 0, "log_every": 1, "seed": 0,
                "run_name": run_name, "output_name": run_name}
    config = workdir / f"{run_name}.json"            # JSON is YAML, and "no" stays a string
    config.write_text(json.dumps(settings), encoding="utf-8")
    profiler = None
    if args.profile:
        import torch.profiler
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          schedule=torch.profiler.schedule(wait=args.warmup - 1 if args.warmup else 0,
                                                                           warmup=1, active=args.steps))

    def on_log(record: dict) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        if profiler is not None:
            profiler.step()

    if profiler is not None:
        profiler.start()
    run_image_training(str(config), [], data_dir=workdir, mode="lora", on_log=on_log)
    if profiler is not None:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    skip = max(0, args.warmup - 1)            # step k's time = log k - log k-1, so step 1 has none
    return {"step_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][skip:],
            "cpu_s": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][skip:]}


def plain_loop(workdir: Path, args, targets: str) -> dict:
    """The core of diffusers' train_text_to_image_lora.py, inline (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from modules.training.images.config import ImageTrainConfig
    defaults = ImageTrainConfig()
    folder = workdir / "models" / "Stable-diffusion" / MODEL_NAME
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    if targets == "kohya":
        from modules.training.images.lora_targets import unet_targets
        target_modules = list(unet_targets(unet).linear)
    else:
        target_modules = DIFFUSERS_TARGETS
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=target_modules))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=tuple(defaults.betas), weight_decay=defaults.weight_decay)
    lr_scheduler = get_scheduler("constant", optimizer)
    concept = next((workdir / "dataset").iterdir())
    files = sorted(concept.glob("*.png"))
    with torch.no_grad():                           # latents and token ids once, before the loop
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize(
            (args.resolution, args.resolution)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for f in files])
        latents_all = torch.cat([vae.encode(pixels[i:i + 1].to(device)).latent_dist.sample()
                                 for i in range(len(files))]) * vae.config.scaling_factor
    ids_all = tokenizer([f.with_suffix(".txt").read_text(encoding="utf-8") for f in files], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    unet.train()
    steps, cpu = [], []
    for step in range(args.warmup + args.steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        index = torch.arange(step * args.batch, (step + 1) * args.batch) % len(files)
        latents, ids = latents_all[index], ids_all[index].to(device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, defaults.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"step_s": steps[args.warmup:], "cpu_s": cpu[args.warmup:]}


def child(args) -> None:
    """One side in this (fresh) process; prints one JSON line."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.child == "atelier":
        out = atelier_run(workdir, args)
    else:
        out = plain_loop(workdir, args, targets=args.child.split("-")[1])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(out), flush=True)


def run_side(side: str, workdir: Path, args) -> dict:
    argv = [sys.executable, __file__, "--child", side, "--workdir", str(workdir), "--resolution",
            str(args.resolution), "--rank", str(args.rank), "--batch", str(args.batch), "--precision", args.precision,
            "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--full"] if args.full else []) \
        + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--profile"] if args.profile and side == "atelier" else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if args.profile and side == "atelier":
        print(proc.stderr[proc.stderr.find("-----"):], file=sys.stderr)
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- the table
def report(results: dict[str, list[dict]], sides: list[str], args, params: int) -> None:
    wall = {s: [statistics.median(r["step_s"]) for r in results[s]] for s in sides}
    cpu = {s: [statistics.median(r["cpu_s"]) for r in results[s]] for s in sides}
    peak = {s: max(r["peak_rss_mb"] for r in results[s]) for s in sides}
    base = "plain-kohya" if "plain-kohya" in sides else None

    def ratio(side: str, values: dict) -> float:        # the median of the within-round ratios
        return statistics.median(a / b for a, b in zip(values[side], values[base]))

    shape = "SD 1.5 UNet (real shape)" if args.full else \
        f"SD-1.5-shaped UNet, block widths {'/'.join(map(str, SMALL_WIDTHS))}"
    print(f"\n{shape}, {params / 1e6:.1f}M UNet parameters; {args.resolution}x{args.resolution} "
          f"(latents {args.resolution // 8}x{args.resolution // 8}), batch {args.batch}, rank {args.rank}, "
          f"{args.precision}, {args.threads or 'default'} threads; {args.rounds} rounds x {args.steps} timed steps "
          f"after {args.warmup} warm-up")
    print("| implementation | LoRA layers | s/step | CPU s/step | peak RSS MB | s/step vs plain | CPU vs plain |"
          " memory vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    layers = {"atelier": "kohya's", "plain-kohya": "kohya's", "plain-diffusers": "to_q/k/v/out.0"}
    for s in sides:
        vs = [f"{ratio(s, wall):.2f}x", f"{ratio(s, cpu):.2f}x", f"{peak[s] / peak[base]:.2f}x"] if base else ["-"] * 3
        print(f"| {s} | {layers[s]} | {statistics.median(wall[s]):.3f} | {statistics.median(cpu[s]):.3f} | "
              f"{peak[s]:.0f} | {' | '.join(vs)} |")
    if base and "atelier" in sides:
        t, c, m = ratio("atelier", wall), ratio("atelier", cpu), peak["atelier"] / peak[base]
        print(f"goals (Atelier / plain loop, same LoRA): s/step <= 1.00x: {t:.2f}x wall, {c:.2f}x CPU "
              f"({'met' if max(t, c) <= 1.0 else 'NOT met'}); peak memory <= 1.00x: {m:.2f}x "
              f"({'met' if m <= 1.0 else 'NOT met'})")


def gpu_figures(args) -> None:
    """CUDA: SD 1.5 at 512 and SDXL at 1024, bf16, batch 1 - Atelier's s/step, it/s and peak VRAM."""
    import torch
    if not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA; this machine has none")
    for family, resolution in (("sd1", 512), ("sdxl", 1024)):
        with tempfile.TemporaryDirectory(prefix=f"atelier-bench-{family}-") as tmp:
            sub = argparse.Namespace(**{**vars(args), "full": True, "resolution": resolution, "precision": "bf16"})
            prepare(Path(tmp), sub, family=family)
            out = run_side("atelier", Path(tmp), sub)
            s = statistics.median(out["step_s"])
            print(f"| {family} | {resolution} | {1 / s:.2f} it/s | {out.get('peak_vram_mb', 0):.0f} MB VRAM |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    if args.gpu:
        gpu_figures(args)
        return
    import torch
    sides = args.sides.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="atelier-bench-train-sd-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args)
        params = int((workdir / "unet-params.txt").read_text())
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for round_no in range(args.rounds):
            order = sides if round_no % 2 == 0 else sides[::-1]          # ABBA: no order bias
            for side in order:
                out = run_side(side, workdir, args)
                results[side].append(out)
                print(f"  round {round_no + 1}/{args.rounds} {side}: s/step {', '.join(f'{t:.3f}' for t in out['step_s'])}"
                      f" (CPU {', '.join(f'{t:.3f}' for t in out['cpu_s'])}), peak RSS {out['peak_rss_mb']:.0f} MB",
                      flush=True)
        report(results, sides, args, params)


if __name__ == "__main__":
    main()
