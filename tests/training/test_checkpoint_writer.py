"""Atomic checkpoints: kill -9 mid-write and a full disk leave the previous checkpoint whole."""
import errno
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modules.training.checkpoints import (CheckpointWriteError, CheckpointWriter, latest_checkpoint,
                                          list_checkpoints, read_marker)

REPO = Path(__file__).resolve().parents[2]


def _writer_of(payload: str):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_text(payload, encoding="utf-8")
    return write


def test_keeps_last_k_and_every_milestone(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=2)
    for step in range(1, 7):
        writer.save(step, _writer_of(f"w{step}"), tokens=step * 10, milestone=step == 2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000005", "step-000006"]
    assert read_marker(tmp_path / "step-000002") == {"step": 2, "tokens": 20, "milestone": True}
    assert (tmp_path / "step-000006" / "weights.bin").read_text() == "w6"


def test_full_disk_keeps_previous_and_says_what_to_do(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=3)
    writer.save(1, _writer_of("good"))

    def full_disk(folder: Path) -> None:
        (folder / "weights.bin").write_text("half", encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError) as info:
        writer.save(2, full_disk)
    message = str(info.value)
    assert "disk is full" in message and "step-000001" in message and "--resume" in message
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]          # no partial folder left
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_text() == "good"


_KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from modules.training.checkpoints import CheckpointWriter
writer = CheckpointWriter({dir!r}, keep_last=3)
writer.save(1, lambda f: (f / "weights.bin").write_text("good"))
def dies_mid_write(folder):
    (folder / "weights.bin").write_text("partial")
    os.kill(os.getpid(), signal.SIGKILL)
writer.save(2, dies_mid_write)
"""


def test_sigkill_while_writing_leaves_previous_whole(tmp_path):
    code = _KILLED_WRITER.format(repo=str(REPO), dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1                                              # killed in the middle
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-000001" and (latest / "weights.bin").read_text() == "good"
    CheckpointWriter(tmp_path)                                              # the next run cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
