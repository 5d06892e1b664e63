"""Pretrain a Llama model from scratch (or continue one): ``python -m modules.training pretrain``.

    python -m modules.training pretrain --config configs/training/pretrain-tiny.yaml [key=value ...]
    python -m modules.training pretrain --resume <data-dir>/training/<run-name> [key=value ...]

With ``--resume`` the run's own ``config.yaml`` is the base (``--config`` and overrides may change anything
but the architecture and tokenizer: e.g. ``max_steps=`` to train longer); the latest complete checkpoint
restores weights, optimizer, scheduler, RNG and data position.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from modules.training.checkpoints import CheckpointWriteError
from modules.training.config import ConfigError, PretrainConfig, load_config, world_size_from_env
from modules.training.run_dir import RunDirError, create_run_dir, default_run_name, open_run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/training/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--data-dir", help="Atelier's data dir; runs go to <data-dir>/training/ "
                                           "(default: the repository folder, as for the app)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")


def open_training_data(config: PretrainConfig, *, rank: int = 0, world_size: int = 1):
    """The packed dataset of ``config.data`` as a Mixture (the training-data protocol) plus its tokenizer
    folder. The data module is imported here, lazily, so the loop itself never depends on it."""
    try:
        from modules.training.llm import data as data_module
    except ImportError as exc:
        from modules.training.llm.pretrain import TrainingError
        raise TrainingError("The packed-dataset module (modules.training.llm.data) is not in this checkout, so "
                            f"the pretrain command has no data to read ({exc}).") from None
    dataset = data_module.PackedDataset(config.data)
    mixture = data_module.Mixture(dataset, seed=config.seed, rank=rank, world_size=world_size)
    return mixture


def resolve_tokenizer_dir(config: PretrainConfig, data) -> Path | None:
    for candidate in (config.tokenizer, getattr(data, "tokenizer_dir", None),
                      Path(config.data) / "tokenizer" if config.data else None, config.init_from):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def run_pretrain(config_path: str | None, overrides: list[str], *, data_dir: str | Path, resume: str | None = None,
                 open_data: Callable = open_training_data, on_log=None, should_stop=None):
    """Config -> run folder -> :class:`~modules.training.llm.pretrain.Pretrainer` -> result (the CLI's body,
    also called by the Train tab and the tests with their own ``open_data``)."""
    from modules.training.llm.pretrain import Pretrainer
    world_size = world_size_from_env()
    if resume:
        run = open_run_dir(resume)
        config = load_config(config_path, overrides, world_size=world_size, base=run.read_config())
    else:
        config = load_config(config_path, overrides, world_size=world_size)
        if not config.run_name:
            config.run_name = default_run_name()
        run = None
    data = open_data(config)
    tokenizer_dir = resolve_tokenizer_dir(config, data)
    if run is None:
        run = create_run_dir(data_dir, config.run_name, config.to_dict())
    trainer = Pretrainer(config, data, run, resume=bool(resume), tokenizer_dir=tokenizer_dir,
                         tokenizer_hash=getattr(data, "tokenizer_hash", None), on_log=on_log,
                         should_stop=should_stop, world_size=world_size)
    if resume:                       # only once the checkpoint is known to fit the (changed) config
        run.write_config(config.to_dict())
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    from modules.paths import Paths
    from modules.training.llm.pretrain import TrainingError
    if not args.config and not args.resume:
        log.error("give --config FILE.yaml for a new run, or --resume RUN_DIR to continue one")
        return 2
    data_dir = Paths.from_options(args.data_dir).data_dir

    def show(record: dict) -> None:
        if record["kind"] == "train":
            mfu = f"{record['mfu']:.1%}" if record.get("mfu") is not None else "n/a"
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  MFU %s", record["step"], record["total_steps"],
                     record["loss"], record["lr"], record["tokens_per_s"], mfu)
        elif record["kind"] == "val":
            log.info("step %d  val loss %.4f", record["step"], record["val_loss"])

    try:
        result = run_pretrain(args.config, args.overrides, data_dir=data_dir, resume=args.resume, on_log=show)
    except (ConfigError, RunDirError, TrainingError, CheckpointWriteError) as exc:
        log.error("%s", exc)
        return 2
    if result.finished:
        log.info("finished at step %d (%d tokens); model in %s", result.step, result.tokens, result.final_dir)
    else:
        log.info("stopped at step %d; resume with --resume %s", result.step, result.run_dir)
    return 0
