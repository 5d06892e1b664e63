"""Train a LoRA for an SD 1.5 / SD 2 / SDXL checkpoint: ``python -m modules.training lora``.

    python -m modules.training lora --config configs/training/lora-sd15-tiny.yaml [key=value ...]
    python -m modules.training lora --resume <data-dir>/training/<run-name> [key=value ...]
    accelerate launch --num_processes 2 -m modules.training lora --config FILE.yaml   (data-parallel)

The LoRA lands in ``<data-dir>/models/Lora/<output_name>.safetensors`` (kohya format), ready for
``<lora:output_name:1>`` in a prompt. Ctrl-C stops after the current step with a checkpoint.
"""
from __future__ import annotations

import argparse

from modules.training.images.train_command import add_arguments, run_command

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_command(args, "lora")
