"""A LoRA run on the tiny SD 1.5 fixture: the loss goes down, and the kohya file it writes into models/Lora
is what Atelier's ``<lora:name:1>`` loads, with the lower loss."""
import json
import sys
from pathlib import Path

import pytest
import torch

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import load_sd_model
from modules.diffusion.lora import apply_loras
from modules.diffusion.prompt_parser import extract_extra_networks
from modules.fixtures import diffusion
from modules.training.config import ConfigError
from modules.training.images.kohya_format import read_kohya_lora
from modules.training.images.train_command import run_image_training

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "training" / "lora-sd15-tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    diffusion.ensure(root)
    write_shapes(root / "shapes")
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=run", "max_steps=12",
                                              "unet_lr=5e-3", "save_every_steps=6"], data_dir=root, mode="lora")
    return root, result


def denoising_loss(pipe, root) -> float:
    """MSE of the UNet's noise prediction on the dataset's images at fixed noise and timesteps."""
    from diffusers import DDPMScheduler
    from PIL import Image
    import numpy as np
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    total = []
    with torch.no_grad():
        for png in sorted((root / "shapes" / "1_shapes").glob("*.png")):
            pixels = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32))
            pixels = pixels.permute(2, 0, 1)[None] / 127.5 - 1
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([png.with_suffix(".txt").read_text()], padding="max_length",
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            text = pipe.text_encoder(ids)[0]
            for _ in range(8):
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(0, 1000, (1,), generator=gen)
                pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, text).sample
                total.append(torch.mean((pred - noise) ** 2).item())
    return sum(total) / len(total)


def test_the_run_finishes_and_logs_metrics(trained):
    root, result = trained
    assert result.finished and result.step == 12
    records = [json.loads(l) for l in (root / "training/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "lr", "it_s", "s_per_step", "samples_per_s", "peak_memory_mb"):
        assert all(isinstance(r[key], float) and r[key] > 0 for r in records), key
    assert sorted(p.name for p in (root / "training/run/checkpoints").iterdir()) == ["step-000006", "step-000012"]


def test_the_kohya_file_loads_through_the_lora_tag_and_lowers_the_loss(trained):
    root, result = trained
    lora = root / "models" / "Lora" / "tiny-sd15-shapes.safetensors"
    assert result.outputs == [lora]
    tensors, meta = read_kohya_lora(lora)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert (meta["ss_network_dim"], meta["ss_output_name"], meta["ss_steps"]) == ("4", "tiny-sd15-shapes", "12")
    assert meta["ss_base_model_version"] == "sd_v1"
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    before = denoising_loss(sd.pipe, root)
    calls = extract_extra_networks("a red square <lora:tiny-sd15-shapes:1>")[1]["lora"]
    with apply_loras(sd, calls, root / "models" / "Lora") as applied:
        assert applied.warnings == [] and applied.adapters
        after = denoising_loss(sd.pipe, root)
    assert after < before * 0.95, (before, after)


def test_an_existing_lora_is_never_overwritten(trained):
    root, _ = trained
    lora = root / "models" / "Lora" / "tiny-sd15-shapes.safetensors"
    before = lora.read_bytes()
    with pytest.raises(ConfigError, match="exists already and is never overwritten"):
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=again"], data_dir=root, mode="lora")
    assert lora.read_bytes() == before
    assert not (root / "training" / "again").exists()


def test_sdxl_settings_on_the_sd15_base_are_refused(trained):
    root, _ = trained
    with pytest.raises(ConfigError, match="model_type=sdxl but base_model tiny-sd15.safetensors is an sd1"):
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "model_type=sdxl", "output_name=x"],
                           data_dir=root, mode="lora")


def test_a_loss_that_blows_up_stops_with_the_step_named(trained):
    from modules.training.images.trainer import ImageTrainingError
    root, _ = trained
    with pytest.raises(ImageTrainingError, match=r"at step \d+.*lower learning rate") as info:
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=nan", "output_name=nan",
                                         "unet_lr=1e30", "max_steps=6", "save_every_steps=1"],
                           data_dir=root, mode="lora")
    assert "nothing after the last checkpoint was saved" in str(info.value)
    assert not (root / "models" / "Lora" / "nan.safetensors").exists()


def test_samples_are_written_with_infotext(trained):
    from PIL import Image

    from modules.diffusion.infotext import parse_generation_parameters
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=samples", "output_name=s",
                                              "max_steps=2", "sample_every=1", "sample_steps=2",
                                              "sample_prompts=[a red square, a blue circle]"],
                                data_dir=root, mode="lora")
    assert result.finished
    folder = root / "training" / "samples" / "samples"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step-000001-00.png", "step-000001-01.png", "step-000002-00.png", "step-000002-01.png"]
    with Image.open(folder / "step-000002-01.png") as image:
        assert image.size == (64, 64)
        params = parse_generation_parameters(image.info["parameters"])
    assert params["Prompt"] == "a blue circle"
    assert (params["Sampler"], params["Steps"], params["Seed"], params["Size-1"]) == ("Euler a", "2", "2", "64")
    assert params["Training step"] == "2" and params["Model"] == "tiny-sd15"
    with Image.open(folder / "step-000001-01.png") as first, Image.open(folder / "step-000002-01.png") as second:
        assert first.tobytes() != second.tobytes()          # the model changed between the steps


def test_an_unknown_sample_sampler_is_named(trained):
    root, _ = trained
    with pytest.raises(ConfigError, match="sample_sampler: unknown sampler 'Euler z'"):
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "sample_sampler=Euler z"],
                           data_dir=root, mode="lora")


def test_a_bf16_run_after_an_fp32_one_in_the_same_process(trained):
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=bf16", "output_name=bf16",
                                              "max_steps=2", "mixed_precision=bf16", "gradient_accumulation=2"],
                                data_dir=root, mode="lora")
    assert result.finished
    losses = [json.loads(l)["loss"] for l in (root / "training/bf16/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    tensors, _ = read_kohya_lora(root / "models" / "Lora" / "bf16.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())      # trained in fp32 master weights


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(trained, monkeypatch):
    import errno

    import safetensors.torch

    from modules.training.images.trainer import ImageTrainingError
    root, _ = trained
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(ImageTrainingError, match="The disk is full.*step-000001 is intact.*--resume"):
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=full", "output_name=full",
                                         "max_steps=3", "save_every_steps=1"], data_dir=root, mode="lora")
    checkpoints = root / "training" / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]
    assert not (root / "models" / "Lora" / "full.safetensors").exists()


def test_a_stop_request_checkpoints_and_resume_finishes(trained):
    root, _ = trained
    steps = []

    def should_stop():
        return len(steps) >= 2
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=stop", "output_name=stop",
                                              "max_steps=4", "save_every_steps=0"], data_dir=root, mode="lora",
                                should_stop=should_stop, on_log=lambda r: steps.append(r["step"]))
    assert (result.finished, result.step) == (False, 2)
    assert sorted(p.name for p in (root / "training/stop/checkpoints").iterdir()) == ["step-000002"]
    assert not (root / "models" / "Lora" / "stop.safetensors").exists()
    done = run_image_training(None, [], data_dir=root, mode="lora", resume=str(root / "training" / "stop"))
    assert (done.finished, done.step) == (True, 4)
    assert (root / "models" / "Lora" / "stop.safetensors").is_file()


@pytest.mark.parametrize("cache", ["disk", "none"])
def test_epochs_and_latent_cache_modes(trained, cache, tmp_path):
    import shutil
    root, _ = trained
    dataset = tmp_path / "shapes"
    shutil.copytree(root / "shapes", dataset)
    result = run_image_training(str(CONFIG), [f"dataset={dataset}", f"run_name=epochs-{cache}",
                                              f"output_name=epochs-{cache}", "max_steps=null", "epochs=1",
                                              f"cache_latents={cache}"], data_dir=root, mode="lora")
    assert (result.finished, result.step) == (True, 3)          # 6 images, batch 2
    cached = list((dataset / ".atelier-latents").glob("*.safetensors")) if cache == "disk" else []
    assert len(cached) == (6 if cache == "disk" else 0)
    assert not (dataset / ".atelier-latents").exists() or cache == "disk"


def test_text_encoder_conv_layers_and_gradient_checkpointing_all_train(trained):
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=te", "output_name=te",
                                              "max_steps=2", "gradient_checkpointing=true", "train_text_encoder=true",
                                              "conv_rank=2"], data_dir=root, mode="lora")
    tensors, meta = read_kohya_lora(result.outputs[0])
    ups = {k: v for k, v in tensors.items() if k.endswith("lora_up.weight")}
    assert all(v.abs().max() > 0 for v in ups.values())          # every layer got gradients
    assert any(k.startswith("lora_te_") for k in ups) and any("_resnets_" in k for k in ups)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_text_encoder_lr"] == "5e-05"


def test_a_v_prediction_base_trains_on_v_targets(trained):
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=v", "output_name=v-pred",
                                              "base_model=tiny-sd2", "max_steps=2", "min_snr_gamma=5"],
                                data_dir=root, mode="lora")
    _, meta = read_kohya_lora(result.outputs[0])
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_v2"] == "True"
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd2"))
    calls = extract_extra_networks("<lora:v-pred:1>")[1]["lora"]
    with apply_loras(sd, calls, root / "models" / "Lora") as applied:
        assert applied.warnings == [] and applied.adapters


def test_a_diffusers_format_copy_is_written_when_asked(trained):
    from diffusers import StableDiffusionPipeline  # noqa: F401  (the loader below is diffusers' own)
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=both", "output_name=both",
                                              "max_steps=1", "output_formats=[kohya, diffusers]"],
                                data_dir=root, mode="lora")
    kohya, diffusers_file = result.outputs
    assert kohya == root / "models/Lora/both.safetensors"
    assert diffusers_file == root / "training/both/final/pytorch_lora_weights.safetensors"
    infos = ck.list_checkpoints(root / "models" / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    sd.pipe.load_lora_weights(str(diffusers_file.parent), adapter_name="copy")
    assert "copy" in sd.pipe.get_list_adapters()["unet"]


def test_finetuning_a_checkpoint_writes_a_loadable_single_file(trained):
    root, _ = trained
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=ft-ckpt", "mode=finetune",
                                              "output_name=tiny-sd15-tuned", "max_steps=1"],
                                data_dir=root, mode="finetune")
    final, single = result.outputs
    assert single == root / "models/Stable-diffusion/tiny-sd15-tuned.safetensors"
    infos = ck.list_checkpoints(single.parent, compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15-tuned"))
    image = sd.pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="this config is for mode=finetune; run it with the finetune command"):
        run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "mode=finetune"], data_dir=root, mode="lora")


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_it_again(trained):
    from modules.training.images.config import load_image_config
    from modules.training.run_dir import create_run_dir
    root, _ = trained
    config = load_image_config(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=early", "output_name=early",
                                             "max_steps=2"])
    run = create_run_dir(root, "early", config.to_dict())
    run.metrics_file.write_text(json.dumps({"kind": "train", "step": 1, "loss": 99.0}) + "\n")  # the killed run's
    result = run_image_training(None, [], data_dir=root, mode="lora", resume=str(run.root))
    assert (result.finished, result.step) == (True, 2)
    records = [json.loads(l) for l in run.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] != 99.0
