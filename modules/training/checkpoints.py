"""Atomic checkpoint folders ``checkpoints/step-NNNNNN/``: all or nothing, the last K kept, milestones forever.

Why atomic: a run is often stopped the hard way (kill -9, power, a full disk) and the newest complete
checkpoint is all that is left of hours of work. So a checkpoint is written into
``step-NNNNNN.tmp-<pid>/``, every file and the folder are fsynced, and only then is the folder renamed to
``step-NNNNNN/`` (a rename is atomic on POSIX filesystems) and the parent fsynced. A kill at any moment
leaves either the old set of checkpoints or the old set plus the new one, never a half-written one that
looks complete; leftover ``.tmp-`` folders of dead processes are removed by the next writer.

A full disk (``OSError`` ENOSPC, or EDQUOT) while writing deletes the partial folder and raises
:class:`CheckpointWriteError`, whose message names the intact previous checkpoint and what to do.

Each folder holds ``checkpoint.json`` (step, tokens, milestone flag) written last, so a folder without it
is never treated as a checkpoint. Pruning keeps the newest ``keep_last`` plus every milestone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_DIR = re.compile(r"^step-(\d{6,})\.tmp-(\d+)$")
MARKER = "checkpoint.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact (the message names it)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (with their marker file), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def read_marker(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / MARKER).read_text(encoding="utf-8"))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete ``.tmp-<pid>`` folders whose writer process is gone (killed mid-write)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for child in directory.iterdir():
        match = TMP_DIR.match(child.name)
        if match and not _pid_alive(int(match.group(2))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


class CheckpointWriter:
    """Writes, and prunes, the checkpoints of one run (only rank 0 makes one)."""

    def __init__(self, directory: str | Path, *, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)

    def save(self, step: int, write: Callable[[Path], None], *, tokens: int = 0, milestone: bool = False,
             extra: dict | None = None) -> Path:
        """Call ``write(tmp_folder)`` to fill a new folder, then publish it atomically as step-NNNNNN/."""
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{final.name}.tmp-{os.getpid()}"
        previous = latest_checkpoint(self.directory)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            marker = {"step": step, "tokens": tokens, "milestone": bool(milestone), **(extra or {})}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_path(path)
            _fsync_path(tmp)
            if final.exists():                       # the same step again (a stop right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_path(self.directory)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointWriteError(
                    f"The disk is full: checkpoint {final.name} could not be written to {self.directory} "
                    f"({exc.strerror}); {kept}. Free some space (or lower keep_last), then resume the run "
                    "with --resume.") from exc
            raise CheckpointWriteError(f"Checkpoint {final.name} could not be written to {self.directory} "
                                       f"({exc}); {kept}.") from exc
        self.prune()
        return final

    def prune(self) -> list[Path]:
        """Delete checkpoints beyond the newest ``keep_last``, never a milestone."""
        checkpoints = list_checkpoints(self.directory)
        removable = [c for c in checkpoints[:-self.keep_last] if not read_marker(c).get("milestone")]
        for path in removable:
            shutil.rmtree(path, ignore_errors=True)
        return removable


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
