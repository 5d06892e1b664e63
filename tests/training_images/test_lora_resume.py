"""Exact resume: a LoRA run SIGKILLed after step k and resumed writes the same LoRA, bit for bit, and the same
loss curve as an uninterrupted run (CPU, fp32; LoRA dropout on, so the RNG state must come back too)."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modules.fixtures import diffusion
from modules.training.images.kohya_format import read_kohya_lora

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

CHILD = Path(__file__).with_name("lora_child.py")
SETTINGS = ["max_steps=5", "save_every_steps=2", "lora_dropout=0.1", "shuffle_caption=true", "keep_last=2"]


def _child(data_dir, dataset, kill_at, *extra):
    return subprocess.run([sys.executable, str(CHILD), str(data_dir), str(dataset), str(kill_at), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    models = tmp_path_factory.mktemp("resume-models")
    diffusion.ensure(models)
    write_shapes(models / "shapes")
    return models


def _data_dir(tmp_path, fixtures, name):
    data = tmp_path / name
    (data / "models").mkdir(parents=True)
    for sub in ("Stable-diffusion", "Lora"):
        (data / "models" / sub).symlink_to(fixtures / "models" / sub) if sub != "Lora" else \
            (data / "models" / sub).mkdir()
    return data


def test_sigkill_then_resume_is_bit_identical(tmp_path, fixtures):
    dataset = fixtures / "shapes"
    whole = _data_dir(tmp_path, fixtures, "whole")
    done = _child(whole, dataset, -1, *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _data_dir(tmp_path, fixtures, "killed")
    dead = _child(killed, dataset, 3, *SETTINGS)        # checkpoint at 2; step 3 is redone
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    assert not any((killed / "models" / "Lora").iterdir())
    resumed = _child(killed, dataset, -1, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"step": 5, "finished": True}
    expected, _ = read_kohya_lora(whole / "models/Lora/tiny-sd15-shapes.safetensors")
    got, _ = read_kohya_lora(killed / "models/Lora/tiny-sd15-shapes.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), f"{name} differs after resume"

    def losses(root):
        lines = [json.loads(l) for l in (root / "training/run/metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines]
    assert losses(killed) == losses(whole)
    assert len(losses(whole)) == 5


def test_a_checkpoint_that_needs_pickle_is_refused_with_the_reason(tmp_path, fixtures):
    import pickle
    import random

    import numpy as np
    import torch

    from modules.training.images.train_command import run_image_training
    from modules.training.images.trainer import ImageTrainingError
    data = _data_dir(tmp_path, fixtures, "old")
    config = Path(CHILD).parents[2] / "configs" / "training" / "lora-sd15-tiny.yaml"
    stopped = run_image_training(str(config), [f"dataset={fixtures / 'shapes'}", "run_name=run", "max_steps=4"],
                                 data_dir=data, mode="lora", should_stop=lambda: True)   # Stop saves a checkpoint
    assert not stopped.finished
    checkpoint = next((data / "training/run/checkpoints").iterdir())
    # the RNG file as the image trainer wrote it before: numpy's state tuple, which only pickle reads back
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               checkpoint / "rng.pt")
    before = (checkpoint / "rng.pt").read_bytes()
    with pytest.raises(ImageTrainingError, match="only pickle can load .* start the run again without --resume") as info:
        run_image_training(None, [], data_dir=data, mode="lora", resume=str(data / "training/run"))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert (checkpoint / "rng.pt").read_bytes() == before
