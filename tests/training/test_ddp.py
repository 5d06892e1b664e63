"""``torchrun --nproc-per-node 2 -m modules.training pretrain`` on gloo/CPU: the same loss curve as one process
with the same global batch, only rank 0 writes, and a stopped 2-process run resumes exactly.

Each run is a real subprocess (the torchrun launcher and two workers, or one plain process) training a
2-layer, 32-wide GQA model on a packed dataset built here; the global batch of 128 tokens is 4 micro-batches
of 2 x 16 tokens in one process and 2 per rank with two, so the no_sync accumulation path is exercised.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.training.checkpoints import latest_checkpoint, list_checkpoints, read_marker
from modules.training.config import ConfigError, load_config
from modules.training.llm.data import DataSource, build_dataset
from modules.training.metrics import read_metrics
from server_utils import free_port
from tiny_training import write_tokenizer
from training_corpus import write_corpus

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
OVERRIDES = ["model_preset=tiny-gqa", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_attention_heads=4", "model.num_key_value_heads=2", "seq_len=16", "micro_batch=2",
             "global_batch_tokens=128", "lr=3e-3", "min_lr=3e-4", "warmup_steps=2", "precision=fp32", "device=cpu",
             "eval_every=10", "eval_batches=2", "log_every=1", "seed=11", "run_name=run"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    corpus = write_corpus(root / "corpus")
    sources = [DataSource("text", [str(corpus["text"])]), DataSource("code", [str(corpus["code"] / "*.py")])]
    return build_dataset(sources, write_tokenizer(root / "tokenizer"), 16, root / "ds", val_fraction=0.2, seed=0)


def _command(processes: int, data_dir: Path, log_dir: Path) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "modules.training", "pretrain"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "--log-dir", str(log_dir), "--redirects", "3", "-m", "modules.training", "pretrain"]


def _start(processes: int, data_dir: Path, dataset: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    config = data_dir / "config.yaml"
    data_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(f"data: {dataset}\nmax_steps: {STEPS}\n", encoding="utf-8")
    first = ["--resume", str(data_dir / "training" / "run")] if "--resume" in args else ["--config", str(config)]
    command = _command(processes, data_dir, data_dir / f"logs-{time.monotonic_ns()}") + \
        [*first, "--data-dir", str(data_dir), *OVERRIDES, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train(processes: int, data_dir: Path, dataset: Path, *args: str, extra: tuple[str, ...] = ()) -> Path:
    proc = _start(processes, data_dir, dataset, *args, extra=extra)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-4000:]
    return data_dir / "training" / "run"


def _stopped_run(data_dir: Path, dataset: Path, extra: tuple[str, ...] = ()) -> str:
    """Start a 2-process run, SIGTERM it once step 3 is logged (torchrun passes it to both ranks); its output."""
    proc = _start(2, data_dir, dataset, extra=extra)
    metrics = data_dir / "training" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r["kind"] == "train" and r["step"] >= 3 for r in read_metrics(metrics)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    return proc.communicate(timeout=60)[0]


def _curve(run: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] in ("train", "val")]


@pytest.fixture(scope="module")
def two_process_run(dataset, tmp_path_factory) -> Path:
    return _train(2, tmp_path_factory.mktemp("ddp-two"), dataset)


def test_two_processes_match_one_with_the_same_global_batch(dataset, two_process_run, tmp_path):
    single = _train(1, tmp_path / "one", dataset)
    one, two = _curve(single), _curve(two_process_run)
    assert [(k, s) for k, s, _ in one] == [(k, s) for k, s, _ in two]
    assert len([1 for k, _, _ in two if k == "train"]) == STEPS
    for (kind, step, a), (_, _, b) in zip(one, two):
        assert abs(a - b) <= 1e-5, f"{kind} loss at step {step}: one process {a}, two processes {b}"
    assert two[-1][2] < two[0][2]                                    # it learned something
    start = next(r for r in read_metrics(two_process_run / "metrics.jsonl") if r["kind"] == "start")
    assert (start["processes"], start["parallel"], start["grad_accum"]) == (2, "ddp", 2)
    final_one, final_two = load_file(single / "final" / "model.safetensors"), \
        load_file(two_process_run / "final" / "model.safetensors")
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-5, rtol=0)
    assert (two_process_run / "final" / "tokenizer.model").is_file()


def test_only_rank_zero_writes_files_and_logs(two_process_run):
    run = two_process_run
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))                      # one writer: no line twice
    assert sorted(p.name for p in run.iterdir() if p.name != "tensorboard") == \
        ["checkpoints", "config.yaml", "final", "metrics.jsonl"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1     # rank 0's alone
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{STEPS:06d}"]   # no .tmp-<pid> left
    checkpoint = run / "checkpoints" / f"step-{STEPS:06d}"
    assert {"rng.pt", "rng-rank-1.pt", "model.safetensors", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    logs = {p.parent.name: p.read_text() for p in run.parents[1].glob("logs-*/*/attempt_0/*/stderr.log")}
    assert set(logs) == {"0", "1"}
    assert f"step {STEPS}/{STEPS}" in logs["0"] and "finished at step" in logs["0"]
    assert " INFO " not in logs["1"], logs["1"][-2000:]


def test_stopped_two_process_run_resumes_to_the_same_weights(dataset, two_process_run, tmp_path):
    output = _stopped_run(tmp_path, dataset)
    run = tmp_path / "training" / "run"
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint is not None and not (run / "final").exists(), output[-4000:]
    stopped_at = read_marker(checkpoint)["step"]
    assert 3 <= stopped_at < STEPS
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [checkpoint.name]

    resumed = _train(2, tmp_path, dataset, "--resume")
    assert _curve(resumed) == _curve(two_process_run)              # every step once, the same numbers
    expected = load_file(two_process_run / "final" / "model.safetensors")
    got = load_file(resumed / "final" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after the 2-process resume"


def test_fsdp_on_gloo_matches_one_process_and_resumes_exactly(dataset, two_process_run, tmp_path):
    """FSDP2 (each block sharded over the two CPU processes) gives the curve of one process (within 1e-5),
    writes a whole checkpoint on rank 0 keyed by parameter name, and a stopped FSDP run resumes to the
    weights of the uninterrupted one."""
    fsdp = ("parallel=fsdp",)
    full = _train(2, tmp_path / "full", dataset, extra=fsdp)
    one, two = _curve(two_process_run), _curve(full)              # the DDP run equals one process (above)
    assert [(k, s) for k, s, _ in one] == [(k, s) for k, s, _ in two]
    for (kind, step, a), (_, _, b) in zip(one, two):
        assert abs(a - b) <= 1e-5, f"{kind} loss at step {step}: DDP {a}, FSDP {b}"
    start = next(r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "start")
    assert (start["processes"], start["parallel"]) == (2, "fsdp")
    ddp_final, fsdp_final = load_file(two_process_run / "final" / "model.safetensors"), \
        load_file(full / "final" / "model.safetensors")
    assert set(ddp_final) == set(fsdp_final)
    for name in ddp_final:
        torch.testing.assert_close(fsdp_final[name], ddp_final[name], atol=1e-5, rtol=0)
    checkpoint = latest_checkpoint(full / "checkpoints")
    assert read_marker(checkpoint)["step"] == STEPS

    output = _stopped_run(tmp_path / "stopped", dataset, extra=fsdp)
    stopped = tmp_path / "stopped" / "training" / "run"
    assert latest_checkpoint(stopped / "checkpoints") is not None and not (stopped / "final").exists(), output[-4000:]
    resumed = _train(2, tmp_path / "stopped", dataset, "--resume", extra=fsdp)
    assert _curve(resumed) == _curve(full)
    expected, got = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after the FSDP resume"


def test_an_indivisible_global_batch_is_a_config_error_and_fsdp_is_accepted_on_the_cpu():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data=/d", "max_steps=1", "device=cpu", "parallel=fsdp", "seq_len=16", "micro_batch=3",
                           "global_batch_tokens=96"], world_size=4)
    message = str(info.value)
    assert "parallel" not in message
    assert "3 x 4 x 16 = 192" in message and "--nproc-per-node" in message
    assert load_config(None, ["data=/d", "max_steps=1", "device=cpu", "parallel=fsdp", "seq_len=16",
                              "micro_batch=3", "global_batch_tokens=96"], world_size=2).grad_accum_steps(2) == 1
    with pytest.raises(ConfigError, match="parallel must be ddp or fsdp"):
        load_config(None, ["data=/d", "max_steps=1", "parallel=zero3"], world_size=2)


def test_a_signal_asks_the_run_to_stop_and_a_second_one_is_not_swallowed():
    from modules.training.llm.pretrain_command import StopOnSignal
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # a second Ctrl-C ends the process
    assert signal.getsignal(signal.SIGTERM) == before
