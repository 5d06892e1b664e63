"""The pretraining loop on a 2-layer, 32-wide GQA model: schedule, outputs, resume checks, failures."""
import errno
import math

import pytest
import torch

from modules.training import checkpoints as checkpoints_module
from modules.training.checkpoints import CheckpointWriteError, latest_checkpoint, list_checkpoints
from modules.training.config import load_config
from modules.training.llm.pretrain import TrainingError, lr_at
from modules.training.llm.pretrain_command import run_pretrain
from modules.training.metrics import read_metrics
from modules.training.run_dir import RunDirError
from tiny_training import TinyData, tiny_overrides, write_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    return write_tokenizer(tmp_path / "tokenizer")


def _run(tmp_path, tokenizer_dir, resume=None, **overrides):
    return run_pretrain(None, tiny_overrides(**overrides), data_dir=tmp_path / "data", resume=resume,
                        open_data=lambda c: TinyData(c.seq_len, tokenizer_dir=tokenizer_dir))


def test_warmup_then_cosine_to_min_lr():
    config = load_config(None, ["data=/d", "max_steps=100", "warmup_steps=10", "lr=4e-4", "min_lr=4e-5"])
    assert lr_at(0, config, 100) == pytest.approx(4e-5)
    assert lr_at(9, config, 100) == pytest.approx(4e-4)
    assert lr_at(55, config, 100) == pytest.approx((4e-4 + 4e-5) / 2)
    assert lr_at(100, config, 100) == pytest.approx(4e-5)


def test_run_writes_metrics_checkpoints_and_an_hf_folder_transformers_loads(tmp_path, tokenizer_dir):
    from transformers import LlamaForCausalLM

    from modules.llm.checkpoint import load_model
    result = _run(tmp_path, tokenizer_dir, save_every_tokens=256, max_steps=12, milestones=[384])
    assert result.finished and result.step == 12 and result.tokens == 12 * 128
    records = read_metrics(result.run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"]                               # it learns
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["mfu_tinyllama"] > r["mfu"] for r in train)
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8, 12]
    # every 2 steps, keep_last 2, plus the milestone at 384 tokens (step 3) kept for good
    assert [p.name for p in list_checkpoints(result.run_dir / "checkpoints")] == \
        ["step-000003", "step-000010", "step-000012"]
    assert (result.run_dir / "config.yaml").is_file()
    final = result.final_dir
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= \
        {p.name for p in final.iterdir()}
    ours = load_model(final)
    hf = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_existing_run_name_is_never_overwritten(tmp_path, tokenizer_dir):
    _run(tmp_path, tokenizer_dir, max_steps=1)
    with pytest.raises(RunDirError, match="already exists .* --resume"):
        _run(tmp_path, tokenizer_dir, max_steps=1)


def test_resume_with_another_architecture_or_tokenizer_names_both(tmp_path, tokenizer_dir):
    from modules.fixtures.llm import train_tokenizer
    result = _run(tmp_path, tokenizer_dir, max_steps=2)
    saved_config = (result.run_dir / "config.yaml").read_text()
    other = tmp_path / "other-tok"
    other.mkdir()
    train_tokenizer(other / "tokenizer.model", vocab_size=400)        # a real, different tokenizer
    with pytest.raises(TrainingError) as info:
        run_pretrain(None, ["max_steps=4", "model.hidden_size=64", "model.num_hidden_layers=3"],
                     data_dir=tmp_path / "data", resume=str(result.run_dir),
                     open_data=lambda c: TinyData(c.seq_len, tokenizer_dir=other))
    message = str(info.value)
    assert "hidden_size: checkpoint 32, config 64" in message
    assert "num_hidden_layers: checkpoint 2, config 3" in message
    assert "the tokenizer differs" in message and "step-000002" in message
    assert [p.name for p in list_checkpoints(result.run_dir / "checkpoints")] == ["step-000002"]  # untouched
    assert (result.run_dir / "config.yaml").read_text() == saved_config


def test_stop_saves_a_checkpoint_and_resume_finishes(tmp_path, tokenizer_dir):
    stops = iter([False, False, True])
    result = run_pretrain(None, tiny_overrides(), data_dir=tmp_path / "data", should_stop=lambda: next(stops, False),
                          open_data=lambda c: TinyData(c.seq_len, tokenizer_dir=tokenizer_dir))
    assert not result.finished and result.step == 3 and result.last_checkpoint.name == "step-000003"
    assert not (result.run_dir / "final").exists()
    resumed = _run(tmp_path, tokenizer_dir, resume=str(result.run_dir))
    assert resumed.finished and resumed.step == 8
    steps = [r["step"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_nan_loss_stops_naming_the_step_and_what_to_try(tmp_path, tokenizer_dir):
    with pytest.raises(TrainingError) as info:
        _run(tmp_path, tokenizer_dir, lr=1e30, warmup_steps=0, grad_clip=1e30, save_every_tokens=128)
    message = str(info.value)
    assert "became" in message and "at step" in message
    assert "lower lr" in message and "precision=fp32" in message and "check the data" in message
    step = int(message.split("at step ")[1].split()[0])
    assert step >= 2 and latest_checkpoint(tmp_path / "data/training/run/checkpoints").name == \
        f"step-{step - 1:06d}"                                              # the good ones stay


def test_full_disk_while_checkpointing_stops_with_previous_intact(tmp_path, tokenizer_dir, monkeypatch):
    real = checkpoints_module._fsync_path
    calls = {"n": 0}

    def fsync_fills_disk(path):
        if "step-000004.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        real(path)

    monkeypatch.setattr(checkpoints_module, "_fsync_path", fsync_fills_disk)
    with pytest.raises(CheckpointWriteError, match="disk is full.*step-000002 is intact"):
        _run(tmp_path, tokenizer_dir, save_every_tokens=256)
    names = [p.name for p in (tmp_path / "data/training/run/checkpoints").iterdir()]
    assert names == ["step-000002"]
    assert math.isfinite(calls["n"])


def test_activation_checkpointing_and_bf16_train_the_same_model(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file
    plain = _run(tmp_path / "a", tokenizer_dir, max_steps=3)
    recomputed = _run(tmp_path / "b", tokenizer_dir, max_steps=3, activation_checkpointing="true")
    a = load_file(plain.final_dir / "model.safetensors")
    b = load_file(recomputed.final_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    bf16 = _run(tmp_path / "c", tokenizer_dir, max_steps=3, precision="bf16")
    start = [r for r in read_metrics(bf16.run_dir / "metrics.jsonl") if r["kind"] == "start"][0]
    assert start["precision"] == "bfloat16" and "measured bfloat16" in start["peak_source"]
    c = load_file(bf16.final_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in c.values())                # fp32 master weights
    assert any(not torch.equal(a[n], c[n]) for n in a)                       # autocast really ran
    losses = [r["loss"] for r in read_metrics(bf16.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses)


def test_compile_trains_the_same_model_as_eager(tmp_path, tokenizer_dir):
    """compile=true (torch.compile'd blocks and loss, also under activation checkpointing) follows the eager run's
    loss curve and ends with the same weights to float rounding: fusion reorders fp32 sums, nothing else."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    eager = _run(tmp_path / "a", tokenizer_dir, max_steps=3)
    frames = counters["frames"]["ok"]
    compiled = _run(tmp_path / "b", tokenizer_dir, max_steps=3, compile="true", activation_checkpointing="true")
    assert counters["frames"]["ok"] > frames                                # dynamo really compiled regions
    curves = [[r["loss"] for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
              for run in (eager, compiled)]
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    a = load_file(eager.final_dir / "model.safetensors")
    b = load_file(compiled.final_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_compile_without_a_cpp_compiler_is_a_clear_error(tmp_path, tokenizer_dir, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(TrainingError, match="compile=true needs a C\\+\\+ compiler.*compile=false"):
        _run(tmp_path, tokenizer_dir, max_steps=1, compile="true")
    assert not list((tmp_path / "data/training").glob("*/final"))


def test_compile_is_refused_with_fsdp_over_several_processes():
    from modules.training.config import ConfigError
    with pytest.raises(ConfigError, match="compile=true does not combine with parallel=fsdp"):
        load_config(None, ["data=/d", "max_steps=1", "compile=true", "parallel=fsdp", "micro_batch=1",
                           "global_batch_tokens=512"], world_size=2)


def test_targets_give_the_mean_cross_entropy_of_the_logits():
    import torch.nn.functional as F

    from modules.llm.config import LlamaConfig
    from modules.llm.model import Llama
    model = Llama(LlamaConfig.from_name("tiny-gqa")).train()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = model(ids[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model(ids[:, :-1], targets=ids[:, 1:]), expected)
    with pytest.raises(ValueError, match="targets must have shape"):
        model(ids[:, :-1], targets=ids)


def test_activation_checkpointing_stores_fewer_activations():
    from modules.llm.config import LlamaConfig
    from modules.llm.model import Llama
    model = Llama(LlamaConfig.from_name("tiny-gqa")).train()
    ids = torch.randint(0, 512, (2, 32))

    def saved_tensors(recompute: bool) -> int:
        model.activation_checkpointing = recompute
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).sum()
        return count[0]
    assert saved_tensors(True) < saved_tensors(False) / 2


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(tmp_path, tokenizer_dir):
    """With the tensorboard package installed (requirements-test.txt), the run writes an event file beside
    metrics.jsonl holding the same loss, learning rate, tokens/s and MFU at the same steps."""
    pytest.importorskip("tensorboard", reason="tensorboard is in requirements-test.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = _run(tmp_path, tokenizer_dir, max_steps=6)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    train = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    val = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "val"]
    assert {"loss", "lr", "tokens_per_s", "mfu", "mfu_tinyllama", "val_loss"} <= set(events.Tags()["scalars"])
    for tag in ("loss", "lr", "tokens_per_s", "mfu"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [r["step"] for r in train]
        for (_, value), record in zip(logged, train):
            assert value == pytest.approx(record[tag], rel=1e-6), tag
    assert [e.step for e in events.Scalars("val_loss")] == [r["step"] for r in val]


def test_a_relative_data_path_is_found_in_the_data_dir(tmp_path, monkeypatch):
    """data=NAME finds the Train tab's <data-dir>/training/data/NAME (or <data-dir>/NAME) when the working
    directory has no such folder, and is saved absolute; found nowhere, it is an error naming where it looked."""
    from modules.training.llm.pretrain_command import open_training_data, resolve_data_path
    data_dir, elsewhere = tmp_path / "dd", tmp_path / "cwd"
    (data_dir / "training" / "data" / "corpus").mkdir(parents=True)
    (data_dir / "loose").mkdir()
    (elsewhere / "corpus").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("corpus", data_dir) == str((data_dir / "training" / "data" / "corpus").resolve())
    assert resolve_data_path("loose", data_dir) == str((data_dir / "loose").resolve())
    monkeypatch.chdir(elsewhere)                                            # the working directory wins
    assert resolve_data_path("corpus", data_dir) == str((elsewhere / "corpus").resolve())
    assert resolve_data_path("/abs/where", data_dir) == "/abs/where"
    assert resolve_data_path("missing", data_dir) == "missing"
    config = load_config(None, ["data=missing", "max_steps=1"])
    with pytest.raises(TrainingError, match=r"data=missing: no such folder.*<data-dir>/training/data/"):
        open_training_data(config)
