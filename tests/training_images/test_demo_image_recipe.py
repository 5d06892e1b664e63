"""demo-image-model end to end at toy sizes: data, VAE, from-scratch finetune, install as fp16 with a model card
whose figures come from eval-images; a second run skips every finished step and installs beside the first
model instead of replacing it."""
import json
from pathlib import Path

import pytest
import torch

from modules.training.images.demo_image_recipe import ImageRecipe

REPO = Path(__file__).resolve().parents[2]
TINY_UNET = ["architecture.unet_block_out_channels=[16, 32]", "architecture.cross_attention_dim=32",
             "architecture.text_hidden_size=32", "architecture.text_layers=1", "architecture.norm_num_groups=4",
             "batch_size=2", "max_steps=2", "save_every_steps=0", "sample_every=0", "warmup_steps=0"]
TINY_VAE = ["--widths", "8", "8", "16", "--batch-size", "2", "--latent-channels", "8", "--eval-images", "10"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo-image")
    recipe = ImageRecipe(data_dir, REPO, images=12, vae_steps=3, eval_n=2, overrides=TINY_UNET, vae_args=TINY_VAE)
    return data_dir, recipe, recipe.run()


def test_the_model_is_installed_as_fp16_with_a_card_from_measurements(recipe_run):
    data_dir, recipe, target = recipe_run
    assert target == data_dir / "models/Stable-diffusion/atelier-shapes"
    assert (target / "model_index.json").is_file()
    from safetensors.torch import load_file
    unet = load_file(target / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in unet.values())
    card = (target / "README.md").read_text()
    assert "python -m modules.training demo-image-model" in card
    assert "python -m modules.training train-vae" in card and "python -m modules.training finetune" in card
    quality = json.loads((data_dir / "training/recipes/demo-image-model.json").read_text())["quality"]
    assert {row["sampler"] for row in quality["results"]} == {"Euler a", "DPM++ 2M"}
    for row in quality["results"]:
        assert f"| {row['sampler']} | {100 * row['all_right']:.1f}% |" in card


def test_a_second_run_skips_finished_steps_and_keeps_the_first_model(recipe_run):
    data_dir, recipe, target = recipe_run
    record = json.loads((data_dir / "training/recipes/demo-image-model.json").read_text())
    before = {k: v["seconds"] for k, v in record["steps"].items() if k != "eval-images"}
    readme = (target / "README.md").read_text()
    again = ImageRecipe(data_dir, REPO, images=12, vae_steps=3, eval_n=2, overrides=TINY_UNET, vae_args=TINY_VAE)
    second = again.run()
    assert second != target and second.name.startswith("atelier-shapes-") and (second / "model_index.json").is_file()
    assert (target / "README.md").read_text() == readme            # the first model is untouched
    after = json.loads((data_dir / "training/recipes/demo-image-model.json").read_text())["steps"]
    assert {k: after[k]["seconds"] for k in before} == before      # data, VAE and finetune did not run again
