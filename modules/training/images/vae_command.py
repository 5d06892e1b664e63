"""train-vae: train a small VAE from random weights on captioned-shapes pictures (the first stage of a model made from nothing).

    python -m modules.training train-vae --out DIR [--widths 16 32 64] [--size 64] [--steps N]
                                         [--batch-size B] [--lr LR] [--seed S] [--eval-images N]

Writes a diffusers ``AutoencoderKL`` folder (with ``atelier-vae.json``: the settings, the loss curve, the
time and the reconstruction report of :func:`~.vae_training.reconstruction_report`) that a from-scratch
``finetune`` run takes as ``vae: DIR``. An existing ``--out`` is never overwritten.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from modules.training.images.vae_training import (VAETrainConfig, VAETrainingError, config_dict,
                                                  reconstruction_report, save_vae, train_vae)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = VAETrainConfig()
    parser.add_argument("--out", type=Path, required=True, help="the VAE folder to write (must not exist)")
    parser.add_argument("--widths", type=int, nargs="+", default=d.block_out_channels,
                        help="level widths; n levels shrink images 2^(n-1) times")
    parser.add_argument("--latent-channels", type=int, default=d.latent_channels, help="latent channels")
    parser.add_argument("--lr-min", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    parser.add_argument("--size", type=int, default=d.image_size, help="picture size in pixels")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed, help="weights and sampling seed")
    parser.add_argument("--eval-images", type=int, default=500,
                        help="held-out pictures the reconstruction report reads back (0: no report)")


def run(args: argparse.Namespace) -> int:
    config = VAETrainConfig(block_out_channels=list(args.widths), image_size=args.size, steps=args.steps,
                            latent_channels=args.latent_channels, batch_size=args.batch_size, lr=args.lr,
                            min_lr=args.lr_min,
                            seed=args.seed)
    if args.out.exists():
        log.error("%s exists already and is never overwritten; choose another --out", args.out)
        return 2
    started = time.perf_counter()
    try:
        vae, records = train_vae(config, on_log=lambda r: log.info(
            "step %d/%d loss %.4f (reconstruction %.4f) %.0f s", r["step"], config.steps, r["loss"],
            r["reconstruction"], r["elapsed_s"]))
    except VAETrainingError as exc:
        log.error("%s", exc)
        return 2
    seconds = time.perf_counter() - started
    record = {"config": config_dict(config), "train_seconds": round(seconds, 1), "torch_threads":
              torch.get_num_threads(), "parameters": sum(p.numel() for p in vae.parameters()),
              "scaling_factor": vae.config.scaling_factor, "log": records}
    if args.eval_images > 0:
        record["reconstruction"] = reconstruction_report(vae, config, n=args.eval_images)
        log.info("reconstructions read exactly by the shapes classifier: %.1f%% (originals %.1f%%), "
                 "mean abs error %.2f / 255", 100 * record["reconstruction"]["classifier_exact_reconstructions"],
                 100 * record["reconstruction"]["classifier_exact_originals"],
                 record["reconstruction"]["mean_abs_error_0_255"])
    save_vae(vae, args.out, record)
    log.info("wrote %s (%d parameters, %.0f s)", args.out, record["parameters"], seconds)
    return 0
