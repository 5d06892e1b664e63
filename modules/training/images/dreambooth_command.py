"""Teach the base model a subject from a few images (DreamBooth, with prior preservation):
``python -m modules.training dreambooth``.

    python -m modules.training dreambooth --config configs/training/dreambooth-sd15-tiny.yaml [key=value ...]
    python -m modules.training dreambooth --resume <data-dir>/training/<run-name>
    accelerate launch -m modules.training dreambooth --config FILE.yaml   (data-parallel)

The missing class images are drawn first by the base model (txt2img, into ``class_dir``, default
``<run>/class_images``). ``dreambooth_train: lora`` writes ``<data-dir>/models/Lora/<output_name>.safetensors``
(kohya format, ``<lora:output_name:1>``); ``unet`` writes a checkpoint into ``models/Stable-diffusion`` as
``finetune`` does. Ctrl-C stops after the current step with a checkpoint.
"""
from __future__ import annotations

import argparse

from modules.training.images.train_command import add_arguments, run_command

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_command(args, "dreambooth")
