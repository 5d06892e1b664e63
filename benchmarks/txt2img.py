"""Atelier's txt2img against a plain diffusers pipeline call, in one run, on the same model.

Both sides use the same pipeline object, the same Euler scheduler config, size, steps, CFG scale,
prompt and seed (``torch.Generator("cpu").manual_seed(seed)``), and both decode to PIL images.
Atelier's side is ``modules.diffusion.generation.process_images`` (prompt parsing and schedule,
our denoising loop, infotext; no file saving, previews off). The two sides alternate (ABBA order), after a
one-step warm-up call each, and the best and median of the timed calls are reported.

Models:
* ``sd15-random``: the real SD 1.5 UNet/VAE/CLIP configs from ``configs/diffusion/sd1`` with random
  weights (no download), default 256x256.
* ``tiny``: the fixture model from ``modules.fixtures.diffusion`` (64x64).

Peak memory is the RSS high-water mark above the pre-call RSS, sampled every 2 ms by a thread. CPU time
(``time.process_time``) is reported beside wall time: on a shared machine it is the steadier measure.

    python benchmarks/txt2img.py                 # both models
    python benchmarks/txt2img.py --model tiny --steps 20 --runs 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

PROMPT = "a photo of a cat on a hill, masterpiece"
NEGATIVE = "blurry, ugly"


class PeakRSS:
    """RSS high-water mark above the starting RSS while the block runs."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def random_sd15(workdir: Path):
    """StableDiffusionPipeline with SD 1.5's architecture and random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from modules.fixtures.diffusion import write_tokenizer
    cfg = REPO / "configs" / "diffusion" / "sd1"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    write_tokenizer(workdir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32).to("cpu")


def tiny_fixture(workdir: Path):
    from modules.diffusion.checkpoints import list_checkpoints
    from modules.diffusion.loading import load_sd_model
    from modules.fixtures import diffusion
    diffusion.write(workdir)
    infos = [i for i in list_checkpoints(workdir / "models" / "Stable-diffusion", compute_hashes=False)
             if i.name == "tiny-sd15-diffusers"]
    return load_sd_model(infos[0]).pipe


def bench(name: str, pipe, width: int, height: int, steps: int, runs: int, seed: int) -> dict:
    from diffusers import EulerDiscreteScheduler

    from modules.diffusion.generation import Run, Tools, process_images
    from modules.diffusion.processing import GenerationParams

    euler_config = dict(EulerDiscreteScheduler.from_config(pipe.scheduler.config).config)
    empty = Path(tempfile.mkdtemp(prefix="atelier-bench-emb-"))  # no textual inversions to look up
    sd = SimpleNamespace(pipe=pipe, kind="sd1", is_inpaint=False, loaded_embeddings={}, embeddings_dir=empty)
    tools = Tools.default()
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler_name="Euler",
                              scheduler="Automatic", cfg_scale=7.0, width=width, height=height, seed=seed,
                              save_images=False)

    def atelier(n=steps):
        run = Run(sd=sd, tools=tools, preview_every=0, embeddings_dir=empty)
        return process_images(run, params.copy(steps=n)).images[0]

    def diffusers_call(n=steps):
        pipe.scheduler = EulerDiscreteScheduler.from_config(euler_config)
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=7.0,
                    width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    sides = {"atelier": atelier, "diffusers": diffusers_call}
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    peaks: dict[str, float] = {k: 0.0 for k in sides}
    outputs = {}
    for side, fn in sides.items():  # warm-up with one step (lazy imports, allocator) - not timed
        fn(1)
    for run_no in range(runs):
        order = list(sides.items()) if run_no % 2 == 0 else list(sides.items())[::-1]  # ABBA: no order bias
        for side, fn in order:
            with PeakRSS() as mem:
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[side] = fn()
                times[side].append(time.perf_counter() - start)
                cpu[side].append(time.process_time() - start_cpu)
            peaks[side] = max(peaks[side], mem.delta_mb)
            print(f"  {name}: run {run_no + 1}/{runs} {side}: {times[side][-1]:.2f} s wall, "
                  f"{cpu[side][-1]:.2f} s CPU", flush=True)
    import numpy as np
    diff = np.abs(np.asarray(outputs["atelier"], dtype=np.int16) - np.asarray(outputs["diffusers"], dtype=np.int16))
    return {"name": name, "size": f"{width}x{height}", "steps": steps, "times": times, "cpu": cpu, "peaks": peaks,
            "max_pixel_diff": int(diff.max())}


def report(result: dict) -> None:
    t = result["times"]
    best = {k: min(v) for k, v in t.items()}
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"\n{result['name']}  {result['size']}, {result['steps']} steps, Euler, CFG 7, "
          f"{len(t['atelier'])} timed runs each (max pixel difference between outputs: {result['max_pixel_diff']})")
    cpu = {k: min(v) for k, v in result["cpu"].items()}
    print(f"{'':12}{'s/image (best)':>16}{'s/image (median)':>18}{'s/step (median)':>17}{'CPU s/image (best)':>20}"
          f"{'peak RSS +MB':>14}")
    for side in ("diffusers", "atelier"):
        print(f"{side:12}{best[side]:>16.3f}{med[side]:>18.3f}{med[side] / result['steps']:>17.4f}{cpu[side]:>20.3f}"
              f"{result['peaks'][side]:>14.1f}")
    overhead_best = (best["atelier"] / best["diffusers"] - 1) * 100
    overhead_med = (med["atelier"] / med["diffusers"] - 1) * 100
    overhead_cpu = (cpu["atelier"] / cpu["diffusers"] - 1) * 100
    print(f"Atelier overhead: {overhead_best:+.1f}% wall (best), {overhead_med:+.1f}% wall (median), "
          f"{overhead_cpu:+.1f}% CPU time (best); target <= 3%")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("all", "sd15-random", "tiny"), default="all")
    ap.add_argument("--steps", type=int, default=None, help="default: 10 for sd15-random, 20 for tiny")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per side (default: 3 sd15-random, 7 tiny)")
    ap.add_argument("--size", type=int, default=256, help="sd15-random image size (default 256)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        tmp = Path(tmp)
        if args.model in ("all", "tiny"):
            pipe = tiny_fixture(tmp / "tiny")
            report(bench("tiny fixture (SD1.5 architecture, toy widths)", pipe, 64, 64, args.steps or 20,
                         args.runs or 7, args.seed))
            del pipe
        if args.model in ("all", "sd15-random"):
            pipe = random_sd15(tmp)
            report(bench("SD 1.5 architecture, random weights", pipe, args.size, args.size, args.steps or 10,
                         args.runs or 3, args.seed))


if __name__ == "__main__":
    main()
