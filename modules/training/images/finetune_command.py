"""Fine-tune every UNet weight of an SD checkpoint, or train a small one from random weights:
``python -m modules.training finetune``.

    python -m modules.training finetune --config configs/training/finetune-sd15-random-tiny.yaml [key=value ...]
    python -m modules.training finetune --resume <data-dir>/training/<run-name>

The model lands in ``<data-dir>/models/Stable-diffusion/<output_name>.safetensors`` (with its sidecar
configs folder), where the txt2img model list finds it; the run's ``final/`` holds a diffusers folder.
"""
from __future__ import annotations

import argparse

from modules.training.images.train_command import add_arguments, run_command

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_command(args, "finetune")
