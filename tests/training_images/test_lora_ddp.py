"""``torchrun --nproc-per-node 2 -m modules.training lora`` on gloo/CPU (accelerate reads torchrun's env): the
same loss curve as one process with the same global batch (2 x 1 per step with gradient accumulation 2, against
1 x 2), the same LoRA, and only the main process writes files."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modules.fixtures import diffusion
from modules.training.images.kohya_format import read_kohya_lora
from server_utils import free_port

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "training" / "lora-sd15-tiny.yaml"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-models")
    diffusion.ensure(root)
    write_shapes(root / "shapes")
    return root


def _train(processes: int, fixtures: Path, data_dir: Path) -> Path:
    (data_dir / "models" / "Lora").mkdir(parents=True)
    (data_dir / "models" / "Stable-diffusion").symlink_to(fixtures / "models" / "Stable-diffusion")
    launcher = [sys.executable, "-m", "modules.training"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
        "127.0.0.1", "--master-port", str(free_port()), "--log-dir", str(data_dir / f"logs-{time.monotonic_ns()}"),
        "--redirects", "3", "-m", "modules.training"]
    command = [*launcher, "lora", "--config", str(CONFIG), "--data-dir", str(data_dir),
               f"dataset={fixtures / 'shapes'}", "run_name=run", "max_steps=4", "gradient_accumulation=2",
               f"batch_size={2 // processes}", "save_every_steps=2", "unet_lr=3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return data_dir


def test_two_processes_match_one_with_the_same_global_batch(fixtures, tmp_path):
    one = _train(1, fixtures, tmp_path / "one")
    two = _train(2, fixtures, tmp_path / "two")

    def curve(root):
        return [(r["step"], r["loss"]) for r in map(json.loads, (root / "training/run/metrics.jsonl").open())]
    single, double = curve(one), curve(two)
    assert [s for s, _ in single] == [s for s, _ in double] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single, double):
        assert abs(a - b) < 1e-5, (single, double)
    first, _ = read_kohya_lora(one / "models/Lora/tiny-sd15-shapes.safetensors")
    second, _ = read_kohya_lora(two / "models/Lora/tiny-sd15-shapes.safetensors")
    for name in first:   # gloo's all-reduce sums in another order; Adam's 1/√v turns that rounding into ~1e-5
        assert (first[name] - second[name]).abs().max() < 1e-4, name
    # one writer: one metrics line per step, one set of checkpoints, rank 1's RNG state in them
    checkpoint = two / "training/run/checkpoints/step-000004"
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("rng")) == ["rng-rank-1.pt", "rng.pt"]
