"""Logging to the console and to a rotating file in the data dir, plus an in-memory tail for diagnostics."""
from __future__ import annotations

import collections
import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class TailHandler(logging.Handler):
    """Keeps the last *capacity* formatted records (shown by the Troubleshooting tab)."""

    def __init__(self, capacity: int = 200):
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(logs_dir: Path | None, level: int = logging.INFO) -> TailHandler:
    """Configure the root logger once; returns the tail handler. Safe to call again (replaces our handlers)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_atelier", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [console]
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(logs_dir / "atelier.log", maxBytes=5 * 1024 * 1024,
                                                            backupCount=3, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        handlers.append(file_handler)
    tail = TailHandler()
    handlers.append(tail)
    for handler in handlers:
        handler._atelier = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "urllib3", "uvicorn.access", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return tail


def log_tail() -> list[str]:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, TailHandler):
            return list(handler.lines)
    return []
