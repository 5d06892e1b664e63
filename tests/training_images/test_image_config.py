"""ImageTrainConfig: every problem at once, presets as defaults that the user's keys override."""
import pytest
import yaml

from modules.training.config import ConfigError
from modules.training.images.config import ImageTrainConfig, base_problems, load_image_config
from modules.training.images.presets import PRESETS


def _write(tmp_path, **keys):
    (tmp_path / "data").mkdir(exist_ok=True)
    body = {"base_model": "tiny-sd15", "dataset": str(tmp_path / "data"), "max_steps": 3, **keys}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_valid_config_loads(tmp_path):
    config = load_image_config(_write(tmp_path, rank=8, unet_lr="4e-4"))
    assert isinstance(config, ImageTrainConfig)
    assert (config.rank, config.unet_lr, config.max_steps) == (8, 4e-4, 3)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_image_config(_write(tmp_path, rnak=4, rank=0, resolution=500, optimizer="sgd",
                                 cache_latents="gpu", epochs=2))
    text = str(info.value)
    assert "unknown key 'rnak' (did you mean 'rank'?)" in text
    assert "rank must be > 0, got 0" in text
    assert "resolution must be a multiple of 64" in text and "try 512" in text
    assert "optimizer must be one of adamw, adamw8bit, prodigy, got 'sgd'" in text
    assert "cache_latents must be one of memory, disk, none" in text
    assert "set max_steps or epochs" in text
    assert len(info.value.problems) == 6


@pytest.mark.parametrize("optimizer,package", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_an_optimizer_whose_package_is_missing_names_the_pip_package(tmp_path, optimizer, package):
    try:
        __import__(package)
    except ImportError:
        with pytest.raises(ConfigError, match=f"pip install {package}"):
            load_image_config(_write(tmp_path, optimizer=optimizer))
    else:
        assert load_image_config(_write(tmp_path, optimizer=optimizer)).optimizer == optimizer


def test_a_preset_fills_defaults_and_the_users_keys_win(tmp_path):
    config = load_image_config(_write(tmp_path, preset="8gb", rank=4), ["batch_size=3"])
    assert config.rank == 4 and config.batch_size == 3                       # the user's
    assert config.mixed_precision == PRESETS["8gb"]["mixed_precision"]       # the preset's
    assert config.gradient_checkpointing is True and config.cache_latents == "disk"
    plain = load_image_config(_write(tmp_path))
    assert plain.rank == ImageTrainConfig().rank


def test_an_unknown_preset_is_named(tmp_path):
    with pytest.raises(ConfigError, match="preset '4gb' is unknown; known: cpu, 6gb, 8gb, 12gb, 24gb"):
        load_image_config(_write(tmp_path, preset="4gb"))


def test_sdxl_settings_on_an_sd15_base_name_both(tmp_path):
    config = load_image_config(_write(tmp_path, model_type="sdxl"))
    (problem,) = base_problems(config, "sd1", "tiny-sd15")
    assert "model_type=sdxl" in problem and "tiny-sd15 is an sd1 checkpoint" in problem
    config = load_image_config(_write(tmp_path, model_type="sd1"))
    assert "tiny-sdxl is an sdxl checkpoint" in base_problems(config, "sdxl", "tiny-sdxl")[0]
    assert base_problems(load_image_config(_write(tmp_path)), "sdxl", "tiny-sdxl") == []


def test_missing_dataset_folder_and_base_are_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_image_config(None, ["max_steps=1", f"dataset={tmp_path / 'nope'}"])
    assert "base_model is required" in str(info.value)
    assert "is not a folder" in str(info.value)
