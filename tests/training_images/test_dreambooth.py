"""DreamBooth on the tiny SD 1.5 fixture: class images drawn first through the txt2img engine and reused, the
prior-preservation loss and its metrics, a LoRA that ``<lora:name:1>`` loads, a UNet checkpoint that txt2img
loads, bad input named, exact resume, and two processes matching one."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules.diffusion import checkpoints as ck
from modules.diffusion.generation import Run, Tools, process_images
from modules.diffusion.infotext import parse_generation_parameters
from modules.diffusion.loading import load_sd_model
from modules.diffusion.processing import GenerationParams
from modules.fixtures import diffusion
from modules.training.config import ConfigError
from modules.training.images.config import load_image_config
from modules.training.images.kohya_format import read_kohya_lora
from modules.training.images.train_command import run_image_training

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "training" / "dreambooth-sd15-tiny.yaml"
QUICK = ["sample_every=0", "save_every_steps=0", "num_class_images=4", "class_steps=2"]


def write_instances(folder: Path, count: int = 3, size: tuple[int, int] = (64, 64)) -> Path:
    """*count* red discs of slightly different shapes on white, without caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(count):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((8 + 2 * i, 8, width - 8, height - 8 - 2 * i), fill=(210, 30, 30))
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    diffusion.ensure(root)
    write_instances(root / "instances")
    return root


def train(root, *overrides, **kwargs):
    return run_image_training(str(CONFIG), [f"instance_dir={root / 'instances'}", *QUICK, *overrides],
                              data_dir=root, mode="dreambooth", **kwargs)


def records(root, run):
    return [json.loads(line) for line in (root / "training" / run / "metrics.jsonl").read_text().splitlines()]


def class_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def first_run(root):
    result = train(root, "run_name=first", "max_steps=3", f"class_dir={root / 'class'}", "output_name=first")
    return result, class_files(root / "class")


def test_class_images_are_drawn_through_the_txt2img_engine(root, first_run):
    result, files = first_run
    assert result.finished
    names = [f"class-{i:05d}{suffix}" for i in range(4) for suffix in (".png", ".txt")]
    assert sorted(files) == sorted(names)
    assert {(root / "class" / f"class-{i:05d}.txt").read_text(encoding="utf-8") for i in range(4)} == {"a photo of dog"}
    with Image.open(root / "class" / "class-00002.png") as image:
        params = parse_generation_parameters(image.info["parameters"])
        drawn = np.asarray(image.convert("RGB"))
    assert params["Prompt"] == "a photo of dog"
    assert (params["Seed"], params["Steps"], params["Sampler"], params["Size-1"]) == ("2", "2", "Euler a", "64")
    assert params["Model"] == "tiny-sd15"
    # the very image txt2img draws with those settings: class images 0-3 are one txt2img batch of 4 from seed 0
    # (per-image seeds 0..3, as A1111 numbers them), so the same batch is drawn again. A single image with seed 2
    # has the same noise but need not match to the last bit: CPU matmul kernels may round differently per batch size.
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    again = process_images(Run(sd=sd, tools=Tools.default()),
                           GenerationParams(prompt="a photo of dog", steps=2, sampler_name="Euler a", cfg_scale=7.0,
                                            width=64, height=64, seed=0, batch_size=4, save_images=False)).images[2]
    assert np.array_equal(np.asarray(again.convert("RGB")), drawn)


def test_class_images_are_reused_and_never_overwritten(root, first_run):
    _, before = first_run
    second = train(root, "run_name=second", "max_steps=1", f"class_dir={root / 'class'}", "output_name=second")
    assert second.finished
    assert class_files(root / "class") == before               # same files, bytes and mtimes
    # two more wanted: only those are made; a name a user's file has is skipped
    (root / "class" / "class-00004.txt").write_text("my own note", encoding="utf-8")
    third = train(root, "run_name=third", "max_steps=1", f"class_dir={root / 'class'}", "output_name=third",
                  "num_class_images=6")
    assert third.finished
    after = class_files(root / "class")
    assert {k: v for k, v in after.items() if k in before} == before
    assert (root / "class" / "class-00004.txt").read_text(encoding="utf-8") == "my own note"
    assert sorted(set(after) - set(before)) == ["class-00004.txt", "class-00005.png", "class-00005.txt",
                                                "class-00006.png", "class-00006.txt"]
    with Image.open(root / "class" / "class-00006.png") as image:
        assert parse_generation_parameters(image.info["parameters"])["Seed"] == "6"


def test_the_default_class_folder_is_in_the_run(root):
    result = train(root, "run_name=default-folder", "max_steps=1", "output_name=default-folder",
                   "num_class_images=2")
    assert result.finished
    folder = root / "training" / "default-folder" / "class_images"
    assert sorted(p.name for p in folder.glob("*.png")) == ["class-00000.png", "class-00001.png"]


def test_prior_loss_weight_zero_and_more_train_differently_and_log_both_losses(root, first_run):
    off = train(root, "run_name=no-prior", "max_steps=3", "prior_loss_weight=0", "output_name=no-prior")
    assert off.finished
    assert not (root / "training" / "no-prior" / "class_images").exists()    # no class images at all
    with_prior, without = records(root, "first"), records(root, "no-prior")
    for r in with_prior:
        assert r["prior_loss"] > 0 and r["instance_loss"] > 0
        assert r["loss"] == pytest.approx(r["instance_loss"] + 1.0 * r["prior_loss"], rel=1e-6)
    for r in without:
        assert "prior_loss" not in r and r["loss"] == r["instance_loss"]
    # step 1 sees the same instance batch and noise from the same weights; after that the prior term moved them
    assert with_prior[0]["instance_loss"] == pytest.approx(without[0]["instance_loss"], rel=1e-5)
    assert [r["loss"] for r in with_prior] != [r["loss"] for r in without]
    a, _ = read_kohya_lora(root / "models/Lora/first.safetensors")
    b, _ = read_kohya_lora(root / "models/Lora/no-prior.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_lora_loads_through_the_lora_tag_with_dreambooth_metadata(root, first_run):
    from modules.diffusion.lora import apply_loras
    from modules.diffusion.prompt_parser import extract_extra_networks
    result, _ = first_run
    lora = root / "models" / "Lora" / "first.safetensors"
    assert result.outputs == [lora]
    tensors, meta = read_kohya_lora(lora)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert json.loads(meta["ss_dataset_dirs"]) == {"instances": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 1, "img_count": 4}}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("3", "4", "1.0")
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert [(s["class_tokens"], s["is_reg"]) for s in subsets] == [("a photo of sks dog", False),
                                                                   ("a photo of dog", True)]
    assert json.loads(meta["ss_tag_frequency"]) == {"instances": {"a photo of sks dog": 3},
                                                    "class": {"a photo of dog": 4}}
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    p = GenerationParams(prompt="a photo of sks dog <lora:first:1>", steps=2, width=64, height=64, seed=5,
                         save_images=False)
    with_lora = process_images(Run(sd=sd, tools=Tools.default(), lora_dir=root / "models" / "Lora"), p)
    assert with_lora.warnings == [] and "Lora hashes" in with_lora.infotexts[0]
    plain = process_images(Run(sd=sd, tools=Tools.default()), GenerationParams(
        prompt="a photo of sks dog", steps=2, width=64, height=64, seed=5, save_images=False))
    assert not np.array_equal(np.asarray(with_lora.images[0]), np.asarray(plain.images[0]))
    calls = extract_extra_networks("x <lora:first:1>")[1]["lora"]
    with apply_loras(sd, calls, root / "models" / "Lora") as applied:
        assert applied.warnings == [] and applied.adapters


def test_unet_mode_writes_a_checkpoint_that_txt2img_loads(root, first_run):
    result = train(root, "run_name=unet", "max_steps=2", "dreambooth_train=unet", "output_name=sks-unet",
                   f"class_dir={root / 'class'}", "unet_lr=1e-4")
    assert result.finished
    final, single = result.outputs
    assert single == root / "models" / "Stable-diffusion" / "sks-unet.safetensors" and final.is_dir()
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    info = ck.find_checkpoint(infos, "sks-unet")
    assert info is not None and info.error is None and info.kind == "sd1"
    sd = load_sd_model(info)
    from safetensors.torch import load_file
    trained = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    name = "conv_in.weight"
    assert torch.equal(sd.pipe.unet.state_dict()[name], trained[name])
    assert not torch.equal(base.pipe.unet.state_dict()[name], trained[name])
    image = process_images(Run(sd=sd, tools=Tools.default()), GenerationParams(
        prompt="a photo of sks dog", steps=2, width=64, height=64, seed=1, save_images=False)).images[0]
    assert image.size == (64, 64)
    assert json.loads((root / "training" / "unet" / "metrics.jsonl").read_text().splitlines()[-1])["prior_loss"] > 0


def test_bucketed_instance_images_and_square_class_images_train(tmp_path, root):
    """Instance images in another bucket than the class images: a forward and backward pass each."""
    write_instances(tmp_path / "wide", count=2, size=(192, 64))
    result = run_image_training(str(CONFIG), [f"instance_dir={tmp_path / 'wide'}", *QUICK, "run_name=wide",
                                              "output_name=wide", "max_steps=1", "resolution=128",
                                              "enable_bucket=true", "num_class_images=2"],
                                data_dir=root, mode="dreambooth")
    assert result.finished
    for r in records(root, "wide"):
        assert r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-6)


def test_bad_input_is_named_all_at_once(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"instance_dir={tmp_path / 'empty'}", "instance_prompt=",
                                        "prior_loss_weight=-1", "num_class_images=-3", "class_steps=0"])
    text = str(info.value)
    assert "has no images" in text and "put the 3 to 20 images of your subject there" in text
    assert "instance_prompt is empty; give a rare identifier token and the class, e.g. 'sks dog'" in text
    assert "prior_loss_weight must be 0 (no prior preservation) or more, got -1" in text
    assert "num_class_images must be 0 or more, got -3" in text
    assert "class_steps must be at least 1, got 0" in text
    assert len(info.value.problems) == 5
    with pytest.raises(ConfigError, match="instance_dir '.*nowhere' is not a folder"):
        load_image_config(str(CONFIG), [f"instance_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="instance_dir is required"):
        load_image_config(str(CONFIG), ["instance_dir="])
    write_instances(tmp_path / "ok", count=1)
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"instance_dir={tmp_path / 'ok'}", "instance_prompt=dog", "class_prompt=dog",
                                        f"dataset={tmp_path / 'ok'}", "dreambooth_train=full"])
    text = str(info.value)
    assert "instance_prompt 'dog' has no word that class_prompt 'dog' lacks; add a rare identifier token" in text
    assert "mode=dreambooth reads its images from instance_dir" in text
    assert "dreambooth_train must be one of lora, unet, got 'full'" in text
    with pytest.raises(ConfigError, match="class_prompt is empty, but prior preservation is on"):
        load_image_config(str(CONFIG), [f"instance_dir={tmp_path / 'ok'}", "class_prompt="])
    assert load_image_config(str(CONFIG), [f"instance_dir={tmp_path / 'ok'}", "class_prompt=",
                                           "prior_loss_weight=0"]).prior_preservation is False
    lora = REPO / "configs" / "training" / "lora-sd15-tiny.yaml"
    with pytest.raises(ConfigError, match="instance_prompt is for mode=dreambooth"):
        load_image_config(str(lora), [f"dataset={tmp_path / 'ok'}", "instance_prompt=sks dog"])


def test_a_config_run_with_the_wrong_command_is_refused(root):
    with pytest.raises(ConfigError, match="this config is for mode=dreambooth; run it with the dreambooth command"):
        run_image_training(str(CONFIG), [f"instance_dir={root / 'instances'}"], data_dir=root, mode="lora")


def test_stop_then_resume_gives_the_uninterrupted_weights(root, first_run):
    settings = ["max_steps=4", f"class_dir={root / 'class'}", "lora_dropout=0.1", "num_class_images=5"]
    whole = train(root, "run_name=whole", "output_name=whole", *settings)
    assert whole.finished
    steps = []
    stopped = train(root, "run_name=stopped", "output_name=stopped", *settings,
                    should_stop=lambda: len(steps) >= 2, on_log=lambda r: steps.append(r["step"]))
    assert (stopped.finished, stopped.step) == (False, 2)
    assert not (root / "models" / "Lora" / "stopped.safetensors").exists()
    done = run_image_training(None, [], data_dir=root, mode="dreambooth", resume=str(root / "training" / "stopped"))
    assert (done.finished, done.step) == (True, 4)
    expected, _ = read_kohya_lora(root / "models/Lora/whole.safetensors")
    got, _ = read_kohya_lora(root / "models/Lora/stopped.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"

    def curve(run):
        return [(r["step"], r["loss"], r["instance_loss"], r["prior_loss"]) for r in records(root, run)]
    assert curve("stopped") == curve("whole")


@pytest.mark.parametrize("instances", ["square", "wide"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, root, instances):
    """torchrun with 2 processes: the class images are drawn in two shares and come out the same, and the
    loss curve equals one process's with the same global batch (2 x 1 against 1 x 2); "wide" instance images
    are in another bucket than the class images (two backward passes per micro-step under DDP)."""
    from server_utils import free_port
    folder, extra = root / "instances", []
    if instances == "wide":
        folder = write_instances(tmp_path / "wide", count=2, size=(192, 64))
        extra = ["resolution=128", "enable_bucket=true"]

    def launch(processes: int, data_dir: Path) -> Path:
        (data_dir / "models" / "Lora").mkdir(parents=True)
        (data_dir / "models" / "Stable-diffusion").symlink_to(root / "models" / "Stable-diffusion")
        launcher = [sys.executable, "-m", "modules.training"] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "--log-dir", str(data_dir / f"logs-{time.monotonic_ns()}"),
            "--redirects", "3", "-m", "modules.training"]
        command = [*launcher, "dreambooth", "--config", str(CONFIG), "--data-dir", str(data_dir),
                   f"instance_dir={folder}", *QUICK, "run_name=run", "max_steps=3", f"batch_size={2 // processes}",
                   "num_class_images=3", "class_batch_size=1", "unet_lr=3e-3", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return data_dir / "training" / "run"

    one, two = launch(1, tmp_path / "one"), launch(2, tmp_path / "two")
    assert class_files_bytes(one / "class_images") == class_files_bytes(two / "class_images")

    def curve(run):
        return [(r["step"], r["loss"], r["prior_loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())]
    single, double = curve(one), curve(two)
    assert [s[0] for s in single] == [s[0] for s in double] == [1, 2, 3]
    for a, b in zip(single, double):
        assert abs(a[1] - b[1]) < 1e-5 and abs(a[2] - b[2]) < 1e-5, (single, double)


def class_files_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_class_folder_that_cannot_take_or_give_class_images_is_named(tmp_path, root):
    from modules.training.images.buckets import BucketSpec
    from modules.training.images.class_images import ClassImagesError, missing_class_images
    from modules.training.images.dataset import DatasetError
    kohya = write_instances(tmp_path / "reg" / "1_dog", count=2).parent
    with pytest.raises(ClassImagesError, match="has N_concept folders with 2 images, fewer than num_class_images=5"):
        missing_class_images(kohya, 5, BucketSpec(resolution=64))
    assert missing_class_images(kohya, 2, BucketSpec(resolution=64)) == []        # enough: used as they are
    with pytest.raises(DatasetError, match=r"the class images \(class_dir .*nothing, num_class_images=0\)"):
        train(root, "run_name=no-class", "output_name=no-class", "max_steps=1", "num_class_images=0",
              f"class_dir={tmp_path / 'nothing'}")
