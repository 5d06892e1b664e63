"""train-vae and a from-scratch model on a trained 4x VAE with wide latents: the VAE's loss goes down and
its scaling factor normalises the latents; its folder is never overwritten; finetune with ``vae=`` makes a
16x16-latent model that Atelier's own txt2img engine loads and draws 64 px pictures with; the new model's
tokenizer reads every captioned-shapes word as one token."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.training.images.vae_training import (VAETrainConfig, VAETrainingError, object_weights, save_vae,
                                                  shapes_pixels, train_vae)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "training" / "atelier-shapes.yaml"
TINY_VAE = VAETrainConfig(block_out_channels=[8, 8, 16], steps=60, batch_size=8, lr=3e-3, min_lr=1e-3,
                          warmup_steps=5, norm_num_groups=4, latent_channels=8)
TINY_UNET = ["architecture.unet_block_out_channels=[16, 32]", "architecture.cross_attention_dim=32",
             "architecture.text_hidden_size=32", "architecture.text_layers=1", "architecture.norm_num_groups=4",
             "batch_size=2", "max_steps=3", "save_every_steps=0", "sample_every=0", "warmup_steps=0"]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    vae, records = train_vae(TINY_VAE, log_every=5)
    folder = save_vae(vae, tmp_path_factory.mktemp("vae") / "vae", {"log": records})
    return folder, records


def test_the_reconstruction_loss_goes_down_and_the_latents_are_normalised(vae_folder):
    folder, records = vae_folder
    losses = [r["reconstruction"] for r in records]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.latent_channels == 8 and len(vae.config.block_out_channels) == 3
    with torch.no_grad():
        latents = vae.encode(shapes_pixels(123, 0, 64, 64)).latent_dist.mean * vae.config.scaling_factor
    assert latents.shape == (64, 8, 16, 16)                 # 4x: 64 px -> 16x16
    assert 0.7 < float(latents.std()) < 1.4


def test_objects_weigh_more_than_background():
    x = shapes_pixels(0, 0, 2, 64)
    weights = object_weights(x, 10.0)
    assert set(torch.unique(weights).tolist()) == {1.0, 10.0}
    assert float((weights == 10).float().mean()) < 0.3          # most of a shapes picture is background


def test_bad_settings_are_named_and_a_folder_is_never_overwritten(vae_folder, tmp_path):
    with pytest.raises(VAETrainingError) as info:
        train_vae(VAETrainConfig(block_out_channels=[8], steps=0, image_size=60))
    text = str(info.value)
    assert "block_out_channels must be 2 to 4" in text and "steps must be at least 1" in text
    folder, _ = vae_folder
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(VAETrainingError, match="never overwritten"):
        save_vae(None, folder, {})
    assert sorted(p.name for p in folder.iterdir()) == before
    code = subprocess.run([sys.executable, "-m", "modules.training", "train-vae", "--out", str(folder),
                           "--steps", "1"], cwd=REPO, capture_output=True, text=True)
    assert code.returncode == 2 and "never overwritten" in code.stderr


def test_a_model_on_the_trained_vae_draws_through_the_txt2img_engine(vae_folder, tmp_path):
    from modules.diffusion import checkpoints as ck
    from modules.diffusion.loading import load_sd_model
    from modules.shapes.dataset import write_kohya_folder
    from modules.training.images.train_command import run_image_training
    folder, _ = vae_folder
    write_kohya_folder(tmp_path / "data", seed=0, n=8)
    result = run_image_training(str(CONFIG), [f"vae={folder}", f"dataset={tmp_path / 'data'}", "run_name=s",
                                              "output_name=s", *TINY_UNET], data_dir=tmp_path, mode="finetune")
    assert result.finished
    final = tmp_path / "training/s/final"
    info = next(i for i in ck.list_checkpoints(final.parent, compute_hashes=False) if Path(i.filename) == final)
    sd = load_sd_model(info)
    assert sd.pipe.unet.config.in_channels == 8 and sd.pipe.unet.config.sample_size == 16
    tokenizer = sd.pipe.tokenizer
    from modules.shapes.vocabulary import vocabulary_words
    for word in vocabulary_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    image = _txt2img(sd, info, "large red circle, top left, blue background")
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def _txt2img(sd, info, prompt):
    """One 64 px picture through Atelier's own engine (modules.diffusion.generation), as txt2img makes it."""
    from modules.diffusion.generation import Run, Tools, process_images
    from modules.diffusion.processing import GenerationParams
    params = GenerationParams(prompt=prompt, steps=3, width=64, height=64, sampler_name="Euler a", seed=1,
                              cfg_scale=5)
    return process_images(Run(sd=sd, tools=Tools.default()), params).images[0]
