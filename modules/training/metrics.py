"""``metrics.jsonl``: one JSON object per logging step, appended and flushed as it happens.

Why JSON lines: the Train tab re-reads the file after a page reload and plots it, a crashed run keeps every
line written before the crash, and any tool reads it. TensorBoard gets the same scalars when it is
installed (``torch.utils.tensorboard`` needs the ``tensorboard`` package); it is never required.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics file of one run (rank 0 writes it)."""

    def __init__(self, path: str | Path, *, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None and isinstance(clean.get("step"), int):
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record; a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def truncate_after(path: str | Path, step: int) -> int:
    """Drop records with ``step`` > ``step`` (written by a run killed after its last checkpoint), so a
    resumed run's curve has no duplicated steps. Returns how many records were dropped."""
    path = Path(path)
    records = read_metrics(path)
    kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return len(records) - len(kept)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):       # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)                                     # JSON has no nan/inf; keep it readable
    return value


def _tensorboard_writer(log_dir: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:                                       # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))
