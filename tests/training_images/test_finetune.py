"""Fine-tuning from random weights: the loss goes down; a diffusers folder in final/ and a single file in
models/Stable-diffusion are written, and Atelier's loader loads both and generates with them."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import load_sd_model
from modules.training.config import ConfigError
from modules.training.images.config import load_image_config
from modules.training.images.train_command import run_image_training

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import write_shapes  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "training" / "finetune-sd15-random-tiny.yaml"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-run")
    write_shapes(root / "shapes")
    result = run_image_training(str(CONFIG), [f"dataset={root / 'shapes'}", "run_name=ft", "max_steps=16",
                                              "save_every_steps=8", "unet_lr=3e-3"], data_dir=root, mode="finetune")
    return root, result


def test_the_loss_goes_down(finetuned):
    root, result = finetuned
    assert result.finished and result.step == 16
    losses = [json.loads(l)["loss"] for l in (root / "training/ft/metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.parametrize("which", ["folder", "single-file"])
def test_atelier_loads_the_result_and_generates(finetuned, which):
    root, result = finetuned
    final, single = result.outputs
    assert final == root / "training/ft/final" and single == root / "models/Stable-diffusion/tiny-shapes-from-scratch.safetensors"
    listed_in = final.parent if which == "folder" else single.parent
    infos = ck.list_checkpoints(listed_in, compute_hashes=False)
    info = next(i for i in infos if Path(i.filename) == (final if which == "folder" else single))
    assert info.error is None and info.kind == "sd1"
    sd = load_sd_model(info)
    image = sd.pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    # the trained UNet weights, not random ones, came back
    from safetensors.torch import load_file
    trained = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    assert torch.equal(sd.pipe.unet.state_dict()[name], trained[name])


def test_random_init_settings_are_checked(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "mode=lora", "architecture.unet_blocks=2",
                                        "architecture.text_hidden_size=48"])
    text = str(info.value)
    assert "init=random makes a new model, so it needs mode=finetune" in text
    assert "architecture.unet_blocks is not a known key" in text
    assert "text_hidden_size (48) must equal cross_attention_dim (64)" in text


def test_a_chosen_noise_schedule_is_checked_and_carried_in_the_scheduler_config(tmp_path):
    from diffusers import DDPMScheduler

    from modules.training.images.finetune import architecture_problems, build_random_sd15
    problems = "\n".join(architecture_problems({"beta_schedule": "cosine", "beta_start": 0.02, "beta_end": 0.01}))
    assert "beta_schedule must be one of scaled_linear, linear, got 'cosine'" in problems
    assert "0 < beta_start < beta_end < 1, got 0.02 and 0.01" in problems
    tiny = {"unet_block_out_channels": [16, 32], "cross_attention_dim": 32, "text_hidden_size": 32,
            "text_layers": 1, "norm_num_groups": 4, "vae_block_out_channels": [8, 8], "sample_size": 32,
            "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    assert architecture_problems(tiny) == []
    pipe = build_random_sd15(tiny, seed=0)
    pipe.save_pretrained(tmp_path / "m")
    # what training (DDPMScheduler.from_config) and every sampler read back: DDPM's schedule, no signal left
    ddpm = DDPMScheduler.from_pretrained(tmp_path / "m", subfolder="scheduler")
    assert ddpm.config.beta_schedule == "linear" and ddpm.alphas_cumprod[-1] < 1e-4


def test_loss_weighting_is_checked(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "loss_weighting=p2"])
    assert "loss_weighting must be one of constant, x0, got 'p2'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "loss_weighting=x0", "min_snr_gamma=5"])
    assert "set one of them" in str(info.value)
    assert load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "loss_weighting=x0"]).loss_weighting == "x0"


def test_the_timestep_range_is_checked(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "min_timestep=-1"])
    assert "min_timestep must be 0 or more, got -1" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "min_timestep=500", "max_timestep=400"])
    assert "max_timestep must be more than min_timestep (500), got 400" in str(info.value)
    config = load_image_config(str(CONFIG), [f"dataset={tmp_path / 'd'}", "min_timestep=700"])
    assert (config.min_timestep, config.max_timestep) == (700, None)
    from modules.training.images.config import timestep_problems
    assert timestep_problems(config, 1000) == []
    assert "must lie within the base model's 500 training timesteps" in timestep_problems(config, 500)[0]
    config.max_timestep = 1001
    assert "max_timestep 1001" in timestep_problems(config, 1000)[0]
