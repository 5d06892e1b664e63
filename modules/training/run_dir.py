"""The folder of one training run: ``<data-dir>/training/<run-name>/``.

Layout (shared by the LLM and the image trainer)::

    config.yaml          the resolved config the run uses (written once, at the start)
    metrics.jsonl        one JSON object per logging / validation step (see metrics.py)
    checkpoints/         step-NNNNNN/ folders, written atomically (see checkpoints.py)
    final/               the finished model (for the LLM: an HF folder the Chat tab loads)

A new run never reuses a folder that already holds a run: that would mix two runs' metrics and
overwrite checkpoints the user may want, so the error says to resume or pick another name.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class RunDirError(ValueError):
    """A run folder that cannot be created or resumed; the message says what to do."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def name(self) -> str:
        return self.root.name

    def read_config(self) -> dict[str, Any]:
        import yaml
        if not self.config_file.is_file():
            raise RunDirError(f"{self.root} is not a training run: it has no config.yaml")
        data = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config_file} is damaged: expected a mapping of key: value")
        return data

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml
        tmp = self.config_file.with_name(self.config_file.name + ".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        tmp.replace(self.config_file)


def training_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "training"


def default_run_name(prefix: str = "pretrain") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(data_dir: str | Path, run_name: str, config: dict[str, Any]) -> RunDir:
    """Make ``<data_dir>/training/<run_name>/`` for a new run and write its resolved config."""
    run = RunDir(training_root(data_dir) / run_name)
    if run.root.exists() and any(run.root.iterdir()):
        raise RunDirError(f"A run named {run_name!r} already exists in {run.root}. Resume it with --resume "
                          f"{run.root}, or start a new one with another run_name=...; nothing was changed.")
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    run.write_config(config)
    return run


def open_run_dir(path: str | Path) -> RunDir:
    """An existing run, for ``--resume``."""
    run = RunDir(Path(path).expanduser().resolve())
    if not run.root.is_dir():
        raise RunDirError(f"--resume {path}: no such run folder (runs live in <data-dir>/training/<run-name>/)")
    if not run.config_file.is_file():
        raise RunDirError(f"--resume {path}: {run.root} is not a training run (no config.yaml)")
    run.checkpoints.mkdir(exist_ok=True)
    return run


def is_image_run(folder: str | Path) -> bool:
    """True for an image-training run (its config has the image trainer's ``mode`` and ``dataset``): the LLM
    and image sections of the Train tab share ``<data-dir>/training/`` and each lists only its own runs."""
    import yaml
    try:
        config = RunDir(Path(folder)).read_config()
    except (RunDirError, OSError, ValueError, yaml.YAMLError):
        return False
    return "mode" in config and "dataset" in config
