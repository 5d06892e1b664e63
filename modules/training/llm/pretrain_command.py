"""Pretrain a Llama model from scratch (or continue one): ``python -m modules.training pretrain``.

    python -m modules.training pretrain --config configs/training/pretrain-tiny.yaml [key=value ...]
    python -m modules.training pretrain --resume <data-dir>/training/<run-name> [key=value ...]

With ``--resume`` the run's own ``config.yaml`` is the base (``--config`` and overrides may change anything
but the architecture and tokenizer: e.g. ``max_steps=`` to train longer); the latest complete checkpoint
restores weights, optimizer, scheduler, RNG and data position.

The same command under torchrun trains data-parallel (DDP; FSDP on CUDA with ``parallel=fsdp``)::

    torchrun --nproc-per-node 2 -m modules.training pretrain --config FILE.yaml [key=value ...]

``global_batch_tokens`` stays the batch of one optimizer step over all processes (it must divide by
micro_batch x processes x seq_len); each rank reads its own slice of it; only rank 0 writes the run folder
and logs. SIGINT or SIGTERM (Ctrl-C; torchrun forwards its own) stops at the end of the current step with
a checkpoint, so ``--resume`` continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Callable

from modules.training.checkpoints import CheckpointWriteError
from modules.training.config import ConfigError, PretrainConfig, load_config, world_size_from_env
from modules.training.distributed import PeerFailed, process_group
from modules.training.run_dir import RunDir, RunDirError, create_run_dir, default_run_name, open_run_dir

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
    if not Path(config.data).is_absolute():
        from modules.training.llm.pretrain import TrainingError
        raise TrainingError(f"data={config.data}: no such folder in the working directory ({Path.cwd()}), in "
                            "<data-dir>/training/data/ or in <data-dir>; give the packed dataset's path (absolute, "
                            "or relative to one of those)")
    dataset = data_module.PackedDataset(config.data)
    mixture = data_module.Mixture(dataset, seed=config.seed, rank=rank, world_size=world_size)
    return mixture


def resolve_data_path(data: str, data_dir: str | Path) -> str:
    """Where a relative ``data=`` is: the working directory, else the Train tab's dataset folder
    ``<data-dir>/training/data/``, else ``<data-dir>`` itself - the first that exists, made absolute, so the
    run's saved config (and ``--resume`` from any directory) names the same folder. Absolute paths, and
    relative ones found nowhere, are returned as given (the dataset reader then names the missing folder)."""
    if not data or Path(data).is_absolute():
        return data
    for candidate in (Path(data), Path(data_dir) / "training" / "data" / data, Path(data_dir) / data):
        if candidate.exists():
            return str(candidate.resolve())
    return data


def resolve_tokenizer_dir(config: PretrainConfig, data) -> Path | None:
    dataset = getattr(data, "dataset", None)            # a Mixture over a PackedDataset
    for candidate in (config.tokenizer, getattr(data, "tokenizer_dir", None), getattr(dataset, "tokenizer_dir", None),
                      Path(config.data) / "tokenizer" if config.data else None, config.init_from):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def run_pretrain(config_path: str | None, overrides: list[str], *, data_dir: str | Path, resume: str | None = None,
                 open_data: Callable = open_training_data, on_log=None, should_stop=None, model_lease=None):
    """Config -> run folder -> :class:`~modules.training.llm.pretrain.Pretrainer` -> result (the CLI's body,
    also called by the Train tab and the tests with their own ``open_data``).

    ``open_data(config)`` makes the training data; under torchrun it is called as ``open_data(config,
    rank=..., world_size=...)`` and must return this rank's part (a data object that cannot take them
    would have every rank train on the same batches, so that fails loudly instead)."""
    from modules.training.llm.pretrain import Pretrainer, resolve_device
    world_size = world_size_from_env()
    if resume:
        run = open_run_dir(resume)
        config = load_config(config_path, overrides, world_size=world_size, base=run.read_config())
    else:
        config = load_config(config_path, overrides, world_size=world_size)
        run = None
    config.data = resolve_data_path(config.data, data_dir)
    with process_group(resolve_device(config.device).type) as dist:
        if not config.run_name:                   # one name for every rank (the clocks may tick apart)
            config.run_name = dist.broadcast_object(default_run_name())
        data = open_data(config, rank=dist.rank, world_size=dist.world_size) if dist.active else open_data(config)
        tokenizer_dir = resolve_tokenizer_dir(config, data)
        if run is None:
            root = dist.on_main(lambda: create_run_dir(data_dir, config.run_name, config.to_dict()).root,
                                share_result=True)
            run = RunDir(Path(root))
        trainer = Pretrainer(config, data, run, resume=bool(resume), tokenizer_dir=tokenizer_dir,
                             tokenizer_hash=getattr(data, "tokenizer_hash", None), on_log=on_log,
                             should_stop=should_stop, dist=dist, model_lease=model_lease)
        if resume:                       # only once the checkpoint is known to fit the (changed) config
            dist.on_main(lambda: run.write_config(config.to_dict()))
        return trainer.train()


class StopOnSignal:
    """SIGINT / SIGTERM ask the run to stop after the current step (with a checkpoint); a second one
    gets the default behaviour (the process ends at once). Installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("%s: stopping after this step with a checkpoint (again to quit at once)",
                    signal.Signals(signum).name)
        self.requested.set()
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested.is_set()


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

    from modules.training.llm.documents import DataError
    try:
        with StopOnSignal() as stop:
            result = run_pretrain(args.config, args.overrides, data_dir=data_dir, resume=args.resume, on_log=show,
                                  should_stop=stop)
    except PeerFailed as exc:              # rank 0 reports the error itself
        log.debug("%s", exc)
        return 2
    except (ConfigError, RunDirError, TrainingError, CheckpointWriteError, DataError) as exc:
        log.error("%s", exc)
        return 2
    if result.finished:
        log.info("finished at step %d (%d tokens); model in %s", result.step, result.tokens, result.final_dir)
    else:
        log.info("stopped at step %d; resume with --resume %s", result.step, result.run_dir)
    return 0
