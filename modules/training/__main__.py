"""Atelier's training commands (``python -m modules.training COMMAND --help`` for each).

One command line for the Train tab, the tests and people. Each command is a module with
``add_arguments(parser)`` and ``run(args) -> int``; only commands that exist are listed."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command name -> module implementing it
COMMANDS: dict[str, str] = {
    "prepare-data": "modules.training.llm.prepare_data",
    "pretrain": "modules.training.llm.pretrain_command",
    "sft": "modules.training.llm.sft_command",
    "eval": "modules.training.llm.eval_command",
    "make-sft-data": "modules.training.llm.sft_synthetic",
    "fetch-corpus": "modules.training.llm.demo_corpus",
    "demo-models": "modules.training.llm.demo_recipe",
    "lora": "modules.training.images.lora_command",
    "finetune": "modules.training.images.finetune_command",
    "dreambooth": "modules.training.images.dreambooth_command",
    "train-vae": "modules.training.images.vae_command",
    "demo-image-model": "modules.training.images.demo_image_recipe",
    "eval-images": "modules.training.images.eval_images_command",
    "word-effects": "modules.training.images.word_effects_command",
    "make-shapes-data": "modules.shapes.data_command",
    "train-shapes-classifier": "modules.shapes.classifier_command",
    "eval-shapes-classifier": "modules.shapes.classifier_eval_command",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        command = sub.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0])
        module.add_arguments(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from modules.training.distributed import quiet_other_ranks
    quiet_other_ranks()               # under torchrun only rank 0 logs progress
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
