"""The Train tab's controller without a browser: prepare a dataset from files under the data dir, start a
tiny run as one training job, refuse a second start, stop it (a checkpoint), resume it to the end, read the
plots back from metrics.jsonl, put checkpoints into models/LLM for the Chat tab, and evaluate them."""
from __future__ import annotations

import math
import time

import pytest

from modules.training.llm.train_controller import QUEUE_NOTE, TrainTabError
from training_corpus import write_corpus

TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=4",
              "model.num_key_value_heads=2", "precision=fp32", "device=cpu", "eval_batches=2", "keep_last=2"]
HYPER = dict(seq_len=16, micro_batch=4, global_batch_tokens=128, lr=3e-3, min_lr=3e-4, warmup_steps=2,
             max_steps=6, eval_every=2, log_every=1, seed=11)


@pytest.fixture
def trainer(make_ctx, tmp_path):
    ctx = make_ctx(data_dir=tmp_path / "data")
    write_corpus(tmp_path / "data" / "corpus")
    return ctx, ctx.training


def prepare(controller):
    return controller.prepare_dataset("tiny", ["corpus/text/", "corpus/code/"], vocab_size=400, seq_len=16,
                                      val_fraction=0.2)


def test_registered_as_the_train_tab_between_png_info_and_settings(trainer):
    ctx, controller = trainer
    order = [t.id for t in ctx.tabs.ordered()]
    assert order.index("pnginfo") < order.index("train") < order.index("settings")
    assert "chats and image jobs wait in the queue" in QUEUE_NOTE
    # the defaults are PretrainConfig's (TinyLlama's recipe)
    assert controller.defaults()["lr"] == 4e-4 and controller.defaults()["warmup_steps"] == 2000
    assert "tinyllama-1.1b" in controller.size_choices()
    assert controller.size_note("tinyllama-1.1b").startswith("tinyllama-1.1b: 1100.0M parameters")


def test_start_stop_resume_load_in_chat_and_evaluate(trainer):
    ctx, controller = trainer
    assert "corpus/text/" in controller.source_choices()
    assert "corpus/code/mod00.py" in controller.source_choices()
    (ctx.paths.data_dir / "outputs").mkdir(exist_ok=True)
    (ctx.paths.data_dir / "outputs" / "notes.txt").write_text("not training text")
    assert not any(c.startswith("outputs") for c in controller.source_choices())
    assert "tokens" in prepare(controller)
    assert controller.dataset_choices() == ["tiny"]

    run = controller.start(dataset="tiny", size="tiny-gqa", run_name="r1", hyper=HYPER, extra=TINY_MODEL)
    with pytest.raises(TrainTabError, match="using the device"):
        controller.prepare_dataset("other", ["corpus/text/"], vocab_size=400, seq_len=16)
    with pytest.raises(TrainTabError, match="A training is running: LLM run .r1."):
        controller.start(dataset="tiny", size="tiny-gqa", run_name="r2", hyper=HYPER, extra=TINY_MODEL)
    assert [j.kind for j in ctx.jobs.find(kind="training")] == ["training"]
    assert "Stopping r1" in controller.stop()       # set before step 1 ends: the run stops after it
    stopped = controller.wait(timeout=120)
    assert not stopped.finished and stopped.step == 1 and stopped.last_checkpoint.is_dir()
    view = controller.view(run)
    assert not view.live and "stopped" in view.status
    assert [p["step"] for p in view.loss if p["split"] == "train"] == [1]
    assert [r["name"] for r in controller.checkpoints(run)] == ["step-000001"]

    assert controller.resume(run) == run
    resumed = controller.wait(timeout=120)
    assert resumed.finished and resumed.step == 6
    view = controller.view(run)                       # as a page reload reads it: from metrics.jsonl alone
    assert [p["step"] for p in view.loss if p["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in view.loss if p["split"] == "validation"] == [2, 4, 6]
    assert len(view.lr) == 6 and view.lr[0]["lr"] < view.lr[1]["lr"]          # warmup
    assert all(p["tokens_per_s"] > 0 for p in view.throughput)
    assert "float32 on cpu" in view.detail and "resumed from step-000001" in view.detail
    assert view.fraction == 1.0 and "finished" in view.status and "step 6/6" in view.progress_line
    assert controller.current_run() == run

    rows = controller.checkpoints(run)
    assert [r["name"] for r in rows] == ["final", "step-000006", "step-000001"]
    name = controller.load_in_chat(run, "final")
    assert name == "r1" and "r1" in ctx.llm.model_names()
    assert controller.load_in_chat(run, "final") == "r1-2"          # the first copy is not overwritten
    step_name = controller.load_in_chat(run, "step-000001")
    assert step_name == "r1-step-1" and step_name in ctx.llm.model_names()
    reply = ctx.llm.complete("hello", ctx.llm.default_params(max_new_tokens=3, temperature=0), model=step_name)
    assert reply is not None

    result = controller.evaluate(run, "final")
    # below 400, the uniform guess over the dataset's 400-piece vocabulary
    assert math.isfinite(result["ppl"]) and 1 < result["ppl"] < 400 and result["tokens"] > 0
    early = controller.evaluate(run, "step-000001")
    assert early["ppl"] > result["ppl"]                # six steps of training beat one
    by_name = {r["name"]: r["ppl"] for r in controller.checkpoints(run)}
    assert by_name["final"] == pytest.approx(result["ppl"]) and by_name["step-000006"] is None


def test_bad_input_gets_clear_messages(trainer):
    ctx, controller = trainer
    with pytest.raises(TrainTabError, match="Pick a prepared dataset"):
        controller.start(dataset="", size="tiny-gqa")
    with pytest.raises(TrainTabError, match="not in"):
        controller.start(dataset="nope", size="tiny-gqa")
    with pytest.raises(TrainTabError, match="no such run"):
        controller.resume("nope")
    with pytest.raises(TrainTabError, match="Pick at least one"):
        controller.prepare_dataset("x", [])
    prepare(controller)
    with pytest.raises(TrainTabError, match="lr must be > 0"):
        controller.start(dataset="tiny", size="tiny-gqa", hyper={**HYPER, "lr": 0}, extra=TINY_MODEL)
    with pytest.raises(TrainTabError, match="no checkpoint"):
        controller.load_in_chat("nope", "step-000001")
    assert controller.running() is None and "No training run" in controller.stop()
    with pytest.raises(TrainTabError, match="plain folder name"):
        controller.start(dataset="tiny", size="tiny-gqa", run_name="../escape", hyper=HYPER, extra=TINY_MODEL)
    with pytest.raises(TrainTabError, match="plain folder names"):
        controller.evaluate("..", "final")
    assert controller.view("../..").run is None and controller.checkpoints("../..") == []


def test_other_jobs_wait_behind_the_run_and_an_interrupt_saves_a_checkpoint(trainer):
    ctx, controller = trainer
    prepare(controller)
    run = controller.start(dataset="tiny", size="tiny-gqa", run_name="long", hyper={**HYPER, "max_steps": 100000},
                           extra=TINY_MODEL)
    (job,) = ctx.jobs.find(kind="training")
    deadline = time.monotonic() + 60
    while not controller.view(run).loss and time.monotonic() < deadline:    # first step logged
        time.sleep(0.05)
    assert controller.view(run).live and job.state == "running"
    other = ctx.jobs.submit(lambda j: "chat reply", name="a chat", kind="llm")
    time.sleep(0.3)
    assert other.state == "queued"                     # chats and image jobs wait behind the run
    job.interrupt()                                    # e.g. the app shutting down
    result = controller.wait(timeout=60)
    assert not result.finished and result.last_checkpoint.is_dir()
    assert other.result(timeout=30) == "chat reply"
    assert "stopped" in controller.view(run).status and controller.running() is None


def test_the_run_holds_its_model_through_the_model_manager_and_makes_room_first(trainer):
    """While it trains, the model is a 'training' entry of the shared manager, sized as its whole training
    state; admission evicted the idle model that did not fit beside it; after the run it is gone."""
    import torch
    from modules.model_manager import MB
    from modules.training.model_lease import lease_key, training_bytes
    ctx, controller = trainer
    prepare(controller)
    seen = {}
    ctx.models.acquire("idle-chat-model", lambda: torch.zeros(1024, 1024), kind="llm").release()
    # a device with room for the training state only once the idle 4 MB model is gone
    ctx.models._free_memory = lambda: ctx.models.reserve_bytes + (
        MB // 4 if ctx.models.is_loaded("idle-chat-model") else 64 * MB)
    hyper = {**HYPER, "max_steps": 3}
    run = controller.start(dataset="tiny", size="tiny-gqa", run_name="leased", hyper=hyper, extra=TINY_MODEL)
    deadline = time.time() + 60
    while time.time() < deadline and not seen:
        entries = ctx.models.loaded(kind="training")
        if entries:
            seen = entries[0]
        time.sleep(0.01)
    result = controller.wait(timeout=120)
    assert result.finished
    assert seen["key"] == lease_key(run) and seen["leases"] == 1 and seen["run"] == run
    from safetensors.torch import load_file
    params = sum(t.numel() for t in load_file(str(result.final_dir / "model.safetensors")).values())
    assert seen["size_mb"] == round(training_bytes(params) / MB, 1)
    assert not ctx.models.is_loaded("idle-chat-model")          # evicted to make room before the build
    assert ctx.models.loaded(kind="training") == []             # released and unloaded with the run
