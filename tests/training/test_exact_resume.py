"""Exact resume: a run SIGKILLed after step k and resumed ends bit-identical to an uninterrupted run."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny_training import tiny_overrides, write_tokenizer

CHILD = Path(__file__).resolve().parents[1] / "tiny_training.py"


def _child(data_dir, tokenizer_dir, kill_at, *extra):
    args = [sys.executable, str(CHILD), str(data_dir), str(tokenizer_dir), str(kill_at), *extra,
            *tiny_overrides(max_steps=9, save_every_tokens=256, eval_every=3)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kill_at", [5, 6])       # between checkpoints (step 5 redone) and right after one
def test_sigkill_then_resume_is_bit_identical(tmp_path, kill_at):
    tokenizer_dir = write_tokenizer(tmp_path / "tokenizer")
    whole = _child(tmp_path / "whole", tokenizer_dir, -1)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _child(tmp_path / "killed", tokenizer_dir, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "killed" / "training" / "run"
    assert not (run / "final").exists()
    resumed = _child(tmp_path / "killed", tokenizer_dir, -1, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"step": 9, "finished": True}
    expected = load_file(tmp_path / "whole" / "training" / "run" / "final" / "model.safetensors")
    got = load_file(run / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), f"{name} differs after resume"
    # the metrics curve has each step once, and equals the uninterrupted one
    def losses(root):
        lines = [json.loads(l) for l in (root / "training/run/metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines if r["kind"] == "train"]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
