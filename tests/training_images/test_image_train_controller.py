"""The Train tab's image section without a browser: a tiny LoRA run on the SD 1.5 fixture started as one
training job (its base leased from the model manager), watched (loss points, it/s and ETA, samples that
appear while it trains), stopped with a checkpoint and resumed to the end; "Use in txt2img" gives the
``<lora:name:1>`` text and the LoRA is in the app's LoRA list with no refresh call; bad input gets one
clear message naming every problem, and the app keeps serving."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from modules.fixtures import diffusion
from modules.training.images.config import MODES
from modules.training.images.train_controller import ImageTrainTabError

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

PROMPTS = "a red square\na blue circle"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("image-train-tab")
    diffusion.ensure(data)
    write_shapes(data / "datasets" / "shapes", count=6)
    return data


@pytest.fixture
def app(make_ctx, data_dir):
    ctx = make_ctx(data_dir=data_dir)
    return ctx, ctx.training_images


def params(controller, **changes):
    values = controller.defaults("cpu")
    values.update(rank=4, alpha=4.0, unet_lr=1e-3, resolution=64, batch_size=2, max_steps=100000, sample_every=2,
                  sample_prompts=PROMPTS, sample_steps=2, save_every_steps=0)
    values.update(changes)
    return values


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_lists_defaults_and_the_dataset_preview(app):
    ctx, controller = app
    names = [value for _, value in controller.base_choices()]
    assert {"tiny-sd15", "tiny-sd15-diffusers", "tiny-sdxl", "tiny-sd2"} <= set(names)
    assert "tiny-sd15-inpainting" not in names                    # its UNet takes a mask
    assert ("tiny-sdxl (sdxl)", "tiny-sdxl") in controller.base_choices()
    assert controller.type_choices() == list(MODES)
    assert controller.preset_choices()[0] == "" and "8gb" in controller.preset_choices()
    assert controller.defaults("8gb")["rank"] == 16 and controller.defaults("12gb")["resolution"] == 768
    assert controller.defaults()["max_steps"] == 1000
    assert controller.dataset_choices() == ["shapes"]
    preview = controller.preview("shapes", resolution=64, batch_size=8)
    assert preview.error is None and preview.image_count == 6
    assert [(b["width"], b["height"], b["count"]) for b in preview.buckets] == [(64, 64, 6)]
    assert preview.samples[0]["caption"] == "a red square"
    text = controller.describe_preview(preview)
    assert "**6 images**" in text and "64x64: 6 images" in text and "fewer than the batch of 8" in text
    # a typed path works as well as a listed name
    typed = controller.preview(str(ctx.paths.data_dir / "datasets" / "shapes"), resolution=64)
    assert typed.image_count == 6


def test_train_watch_stop_resume_and_use_in_txt2img(app):
    ctx, controller = app
    assert "ui-lora" not in controller.lora_names()           # the service's cached list, scanned now
    run = controller.start(base="tiny-sd15", dataset="shapes", mode="lora", preset="cpu", params=params(controller,
                           output_name="ui-lora"), run_name="ui-run", extra=["enable_bucket=false"])
    assert run == "ui-run" and [j.kind for j in ctx.jobs.find(kind="training")] == ["training"]
    with pytest.raises(ImageTrainTabError, match="A training is running: image run 'ui-run'"):
        controller.start(base="tiny-sd15", dataset="shapes", params=params(controller), run_name="other")
    with pytest.raises(ValueError, match="image run 'ui-run'"):        # the LLM section shares the rule
        ctx.training.prepare_dataset("x", ["corpus/"])
    # samples appear while it trains, with the loss points and the speed
    view = wait_for(lambda: (v := controller.view(run)).live and len(v.samples) >= 4 and len(v.loss) >= 5 and v,
                    "samples and loss points while training")
    assert "ui-run: training" in view.status and "it/s" in view.progress_line and "ETA" in view.progress_line
    assert view.total_steps == 100000 and view.it_s > 0 and view.eta_s > 0
    assert view.samples[0][1].startswith(f"step {max(int(Path(p).name[5:11]) for p, _ in view.samples)}: ")
    assert {c.split(": ", 1)[1] for _, c in view.samples} == {"a red square", "a blue circle"}
    assert ctx.models.is_loaded("training/ui-run")             # the base is held by the model manager
    assert "lora of tiny-sd15" in view.detail and "rank 4" in view.detail

    assert "Stopping ui-run" in controller.stop()
    stopped = controller.wait(timeout=300)
    assert not stopped.finished and stopped.step >= 5
    assert not ctx.models.is_loaded("training/ui-run")         # it left the manager with the run
    view = controller.view(run)
    assert not view.live and "stopped" in view.status and view.eta_s is None
    assert [p["step"] for p in view.loss] == list(range(1, stopped.step + 1))
    with pytest.raises(ImageTrainTabError, match="has not written its result yet"):
        controller.use_in_txt2img(run)
    assert run in controller.run_choices() and run not in ctx.training.run_choices()

    assert controller.resume(run, extra=[f"max_steps={stopped.step + 2}"]) == run
    done = controller.wait(timeout=300)
    assert done.finished and done.step == stopped.step + 2
    view = controller.view(run)
    assert "finished" in view.status and view.fraction == 1.0
    assert [p["step"] for p in view.loss] == list(range(1, done.step + 1))   # exact resume: no gap, no repeat
    assert view.samples[0][1] == f"step {done.step}: a red square"           # sampled after the last step too

    assert "ui-lora" in controller.lora_names()               # listed with no restart and no refresh call
    use = controller.use_in_txt2img(run)
    assert use.prompt == "<lora:ui-lora:1>" and use.checkpoint.startswith("tiny-sd15.safetensors")
    assert use.checkpoint in [c.title for c in ctx.diffusion.usable_checkpoints()]


def test_bad_input_gets_clear_messages_and_the_app_keeps_serving(app):
    ctx, controller = app
    (ctx.paths.data_dir / "datasets" / "empty").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ImageTrainTabError) as caught:      # every problem at once
        controller.start(base="tiny-sd15", dataset="", params=params(controller, rank=0, resolution=100))
    message = str(caught.value)
    assert "dataset is required" in message and "rank must be > 0" in message
    assert "resolution must be a multiple of 64" in message and "try 128" in message
    with pytest.raises(ImageTrainTabError, match="is not a folder"):
        controller.start(base="tiny-sd15", dataset="nope", params=params(controller))
    with pytest.raises(ImageTrainTabError, match="datasets/empty"):
        controller.start(base="tiny-sd15", dataset="empty", params=params(controller))
    with pytest.raises(ImageTrainTabError, match="'nope' is not in"):
        controller.start(base="nope", dataset="shapes", params=params(controller))
    with pytest.raises(ImageTrainTabError, match="tiny-sdxl.* is an sdxl checkpoint"):
        controller.start(base="tiny-sdxl", dataset="shapes", params=params(controller), extra=["model_type=sd1"])
    with pytest.raises(ImageTrainTabError, match="exists already and is never overwritten"):
        controller.start(base="tiny-sd15", dataset="shapes", params=params(controller, output_name="tiny-sd15-kohya"))
    with pytest.raises(ImageTrainTabError, match="unknown key 'rnak'"):
        controller.start(base="tiny-sd15", dataset="shapes", params=params(controller), extra=["rnak=4"])
    with pytest.raises(ImageTrainTabError, match="Pick a dataset folder"):
        controller.preview("")
    with pytest.raises(ImageTrainTabError, match="multiple of 64"):
        controller.preview("shapes", resolution=100)
    with pytest.raises(ImageTrainTabError, match="no such run folder"):
        controller.resume("nope")
    with pytest.raises(ImageTrainTabError, match="not a run name"):
        controller.resume("../x")
    with pytest.raises(ImageTrainTabError, match="no image run"):
        controller.use_in_txt2img("nope")
    assert controller.view("../..").run is None and "No image training" in controller.stop()
    # nothing was queued or made, and the app still serves jobs
    assert controller.running() is None and ctx.jobs.find(kind="training") == []
    assert not any(p.name.startswith("lora-") for p in (ctx.paths.data_dir / "training").glob("*"))
    assert ctx.jobs.submit(lambda job: 42, name="still serving").result(30) == 42
