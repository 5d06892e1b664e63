"""Offline loading of single-file and diffusers checkpoints; VAE override; memory on switching."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import (CONFIGS_DIR, MissingTokenizer, UnsafeCheckpoint, apply_vae,
                                       load_sd_model)

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection during these tests fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def infos(fixture_data_dir):
    return ck.list_checkpoints(fixture_data_dir / "models" / "Stable-diffusion", fixture_data_dir / "cache")


def _load(infos, name, **kw):
    return load_sd_model(ck.find_checkpoint(infos, name), device="cpu", dtype=torch.float32, **kw)


def _assert_same_weights(a, b, components):
    for comp in components:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        for key in sb:
            assert torch.equal(sa[key], sb[key]), f"{comp}.{key}"


@pytest.mark.parametrize("name,components", [
    ("tiny-sd15", ("unet", "vae", "text_encoder")),
    ("tiny-sdxl", ("unet", "vae", "text_encoder", "text_encoder_2")),
])
def test_single_file_equals_diffusers_folder(infos, name, components):
    single = _load(infos, name)
    folder = _load(infos, name + "-diffusers")
    assert single.kind == folder.kind == ("sdxl" if "xl" in name else "sd1")
    assert type(single.pipe) is type(folder.pipe)
    _assert_same_weights(single.pipe, folder.pipe, components)
    ids = single.pipe.tokenizer("a photo of a cat").input_ids
    assert ids == folder.pipe.tokenizer("a photo of a cat").input_ids
    assert single.pipe.safety_checker is None if hasattr(single.pipe, "safety_checker") else True
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    a = single.pipe("a cat", generator=gen(), **kw).images
    b = folder.pipe("a cat", generator=gen(), **kw).images
    assert a.shape == (1, 64, 64, 3)
    assert abs(a - b).max() < 1e-5
    assert single.memory_bytes() == folder.memory_bytes() > 0


def test_sd2_single_file_and_its_prediction_type(infos, fixture_data_dir, tmp_path):
    from modules.diffusion.loading import sd2_uses_v_prediction
    from modules.fixtures.diffusion import build_sd2
    model = _load(infos, "tiny-sd2")
    assert model.kind == "sd2"
    _assert_same_weights(model.pipe, build_sd2(), ("unet", "vae", "text_encoder"))
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"  # from the sidecar's scheduler config
    # without a sidecar scheduler: A1111's X.yaml decides, else the UNet probe
    src = fixture_data_dir / "models" / "Stable-diffusion"
    dst = tmp_path / "sd"
    shutil.copytree(src / "tiny-sd2", dst / "tiny-sd2")
    shutil.copy(src / "tiny-sd2.safetensors", dst)
    shutil.rmtree(dst / "tiny-sd2" / "scheduler")
    (dst / "tiny-sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    info = ck.find_checkpoint(ck.list_checkpoints(dst, compute_hashes=False), "tiny-sd2")
    assert load_sd_model(info).pipe.scheduler.config.prediction_type == "v_prediction"
    (dst / "tiny-sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert load_sd_model(info).pipe.scheduler.config.prediction_type == "epsilon"
    (dst / "tiny-sd2.yaml").unlink()
    probed = load_sd_model(info)
    expected = "v_prediction" if sd2_uses_v_prediction(probed.pipe.unet) else "epsilon"
    assert probed.pipe.scheduler.config.prediction_type == expected


def test_inpainting_checkpoint_loads_inpaint_pipeline(infos):
    from diffusers import StableDiffusionInpaintPipeline
    model = _load(infos, "tiny-sd15-inpainting")
    assert model.is_inpaint and isinstance(model.pipe, StableDiffusionInpaintPipeline)
    assert model.pipe.unet.config.in_channels == 9


def test_shipped_configs_describe_the_real_models():
    """The configs/ folders must give the real architectures (checked on the meta device, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(model):
        return sum(p.numel() for p in model.parameters())

    def config(kind, comp):
        name = "scheduler_config.json" if comp == "scheduler" else "config.json"
        return json.loads((CONFIGS_DIR / kind / comp / name).read_text())

    with init_empty_weights():
        assert round(count(UNet2DConditionModel.from_config(config("sd1", "unet"))) / 1e6) == 860
        assert round(count(UNet2DConditionModel.from_config(config("sdxl", "unet"))) / 1e6) == 2567
        assert round(count(UNet2DConditionModel.from_config(config("sd2", "unet"))) / 1e6) == 866
        assert round(count(AutoencoderKL.from_config(config("sd1", "vae"))) / 1e6) == 84
        clip_l = CLIPTextModel(CLIPTextConfig(**config("sd1", "text_encoder")))
        assert round(count(clip_l) / 1e6) == 123
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**config("sdxl", "text_encoder_2")))
        assert round(count(clip_g) / 1e6) == 695
    assert config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert config("sd1", "vae")["scaling_factor"] == 0.18215


@pytest.fixture()
def lone_dir(fixture_data_dir, tmp_path) -> Path:
    """tiny-sd15.safetensors and its sidecar copied to a private folder."""
    src = fixture_data_dir / "models" / "Stable-diffusion"
    dst = tmp_path / "Stable-diffusion"
    dst.mkdir()
    shutil.copy(src / "tiny-sd15.safetensors", dst)
    shutil.copytree(src / "tiny-sd15", dst / "tiny-sd15")
    return dst


def test_missing_tokenizer_says_where_to_put_files(lone_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    shutil.rmtree(lone_dir / "tiny-sd15" / "tokenizer")
    info = ck.find_checkpoint(ck.list_checkpoints(lone_dir, tmp_path / "cache"), "tiny-sd15")
    with pytest.raises(MissingTokenizer) as err:
        load_sd_model(info)
    msg = str(err.value)
    assert "vocab.json" in msg and "merges.txt" in msg
    assert str(lone_dir / "tokenizer") in msg and str(lone_dir / "tiny-sd15" / "tokenizer") in msg


def test_shared_tokenizer_folder_beside_checkpoints(lone_dir, tmp_path):
    shutil.move(str(lone_dir / "tiny-sd15" / "tokenizer"), str(lone_dir / "tokenizer"))
    info = ck.find_checkpoint(ck.list_checkpoints(lone_dir, tmp_path / "cache"), "tiny-sd15")
    model = load_sd_model(info)
    assert model.pipe.tokenizer("a cat").input_ids[0] == model.pipe.tokenizer.bos_token_id


def test_tokenizer_from_the_local_hf_cache(lone_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(lone_dir / "tiny-sd15" / "tokenizer", repo / "snapshots" / ("0" * 40))
    shutil.rmtree(lone_dir / "tiny-sd15" / "tokenizer")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    info = ck.find_checkpoint(ck.list_checkpoints(lone_dir, tmp_path / "cache"), "tiny-sd15")
    model = load_sd_model(info)
    assert model.pipe.tokenizer("a cat").input_ids[0] == model.pipe.tokenizer.bos_token_id


def test_diffusers_folder_without_tokenizer_uses_the_shared_one(fixture_data_dir, tmp_path):
    src = fixture_data_dir / "models" / "Stable-diffusion"
    dst = tmp_path / "sd"
    shutil.copytree(src / "tiny-sd15-diffusers", dst / "mine")
    shutil.move(str(dst / "mine" / "tokenizer"), str(dst / "tokenizer"))
    info = ck.find_checkpoint(ck.list_checkpoints(dst, compute_hashes=False), "mine")
    model = load_sd_model(info)
    reference = load_sd_model(ck.find_checkpoint(ck.list_checkpoints(src, compute_hashes=False), "tiny-sd15-diffusers"))
    assert model.pipe.tokenizer("a photo").input_ids == reference.pipe.tokenizer("a photo").input_ids


def test_pickle_refused_without_flag_and_loaded_with_it(lone_dir, tmp_path):
    from safetensors.torch import load_file
    state = load_file(str(lone_dir / "tiny-sd15.safetensors"))
    torch.save({"state_dict": state}, lone_dir / "old.ckpt")
    shutil.copytree(lone_dir / "tiny-sd15", lone_dir / "old")
    infos = ck.list_checkpoints(lone_dir, tmp_path / "cache")
    info = ck.find_checkpoint(infos, "old")
    with pytest.raises(UnsafeCheckpoint, match="allow-unsafe-pickle"):
        load_sd_model(info)
    model = load_sd_model(info, allow_unsafe_pickle=True)
    reference = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"))
    assert model.kind == "sd1"
    _assert_same_weights(model.pipe, reference.pipe, ("unet", "vae", "text_encoder"))


def test_broken_checkpoint_raises_clear_error(lone_dir, tmp_path):
    (lone_dir / "bad.safetensors").write_bytes(b"junk")
    info = ck.find_checkpoint(ck.list_checkpoints(lone_dir, tmp_path / "cache"), "bad")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_sd_model(info)


def test_vae_override_and_restore(infos, fixture_data_dir):
    vae_file = fixture_data_dir / "models" / "VAE" / "tiny-vae.safetensors"
    plain = _load(infos, "tiny-sd15")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    own = plain.pipe.vae.decode(latents).sample
    with_vae = _load(infos, "tiny-sd15", vae_path=vae_file)
    assert with_vae.vae_name == "tiny-vae.safetensors"
    other = with_vae.pipe.vae.decode(latents).sample
    assert not torch.allclose(own, other)
    apply_vae(with_vae, None)
    assert torch.equal(with_vae.pipe.vae.decode(latents).sample, own)
    assert with_vae.vae_name is None


def test_vae_of_wrong_shape_is_rejected(infos, fixture_data_dir):
    from safetensors.torch import load_file, save_file
    from modules.diffusion.loading import load_vae
    model = _load(infos, "tiny-sdxl")
    bad = {k: v for k, v in load_file(str(fixture_data_dir / "models" / "VAE" / "tiny-vae.safetensors")).items()
           if "decoder" not in k}
    path = fixture_data_dir / "cache" / "half-vae.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match="missing"):
        load_vae(path, model.pipe.vae)


def test_switching_checkpoints_keeps_memory_flat(infos, caplog):
    import logging

    import psutil

    from modules.model_manager import ModelManager
    manager = ModelManager("cpu", reserve_bytes=0, max_loaded=1)
    names = ["tiny-sd15.safetensors", "tiny-sdxl.safetensors"]

    def use(i):
        info = ck.find_checkpoint(infos, names[i % 2])
        with manager.acquire("sd:" + info.title, lambda: load_sd_model(info), kind="diffusion") as model:
            assert model.info == info
    proc = psutil.Process()
    for i in range(4):  # warm up allocator pools and lazy imports
        use(i)
    baseline = proc.memory_info().rss
    for i in range(20):
        use(i)
    assert len(manager.loaded("diffusion")) == 1
    grown = proc.memory_info().rss / baseline
    assert grown < 1.10, f"RSS grew by {100 * (grown - 1):.1f}% over 20 checkpoint switches"
    with caplog.at_level(logging.WARNING, logger="modules.model_manager"):
        manager.unload_all()
    assert manager.loaded() == []
    assert "suspected leak" not in caplog.text  # the manager watches every unloaded model with a weakref


def test_vae_file_variants_load_alike(infos, fixture_data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from modules.diffusion.loading import load_vae
    model = _load(infos, "tiny-sd15")
    plain_file = fixture_data_dir / "models" / "VAE" / "tiny-vae.safetensors"
    reference = load_vae(plain_file, model.pipe.vae)
    state = load_file(str(plain_file))
    prefixed = {"first_stage_model." + k: v for k, v in state.items()}
    prefixed["model_ema.decay"] = torch.tensor(0.999)  # training leftovers found in A1111-era VAE files
    prefixed["loss.logvar"] = torch.zeros(())
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    reference.save_pretrained(tmp_path / "folder-vae")
    ref_state = reference.state_dict()
    for source in (tmp_path / "prefixed.safetensors", tmp_path / "folder-vae"):
        other = load_vae(source, model.pipe.vae).state_dict()
        assert other.keys() == ref_state.keys()
        assert all(torch.equal(other[k], ref_state[k]) for k in ref_state), source
    listed = {v.name: v for v in ck.list_vaes(tmp_path, compute_hashes=False)}
    assert listed["folder-vae"].format == "diffusers" and listed["prefixed.safetensors"].error is None


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_ldm_writer_round_trips_the_real_block_layout(kind):
    """The shipped (real) UNet/VAE layouts at toy widths: our LDM names read back through diffusers' own
    converters give every weight back, so real-size single files use the same key layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from modules.diffusion.ldm_keys import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm
    unet_cfg = json.loads((CONFIGS_DIR / kind / "unet" / "config.json").read_text())
    unet_cfg.update(block_out_channels=[32, 64, 128, 128][:len(unet_cfg["block_out_channels"])],
                    cross_attention_dim=64, norm_num_groups=16)
    if kind == "sdxl":
        unet_cfg.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                        attention_head_dim=[1, 2, 4])
    elif kind == "sd2":
        unet_cfg.update(attention_head_dim=[1, 2, 4, 4])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    state = unet.state_dict()
    ldm = {UNET_PREFIX + k: v for k, v in unet_to_ldm(state, unet_cfg["layers_per_block"]).items()}
    back = convert_ldm_unet_checkpoint(ldm, unet_cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    vae_cfg = json.loads((CONFIGS_DIR / kind / "vae" / "config.json").read_text())
    vae_cfg.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=16)
    vae = AutoencoderKL.from_config(vae_cfg)
    vstate = vae.state_dict()
    vback = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_to_ldm(vstate).items()}, vae_cfg)
    assert vback.keys() == vstate.keys()
    assert all(torch.equal(vback[k], vstate[k]) for k in vstate)


def test_architecture_mismatch_is_a_clear_error(lone_dir, tmp_path):
    # the SD1 toy checkpoint with the *real* SD1 configs: every shape is wrong
    for f in (lone_dir / "tiny-sd15").rglob("*.json"):
        if "tokenizer" not in f.parts:
            f.unlink()
    info = ck.find_checkpoint(ck.list_checkpoints(lone_dir, compute_hashes=False), "tiny-sd15")
    with pytest.raises(ValueError, match="could not be loaded with the sd1 configs"):
        load_sd_model(info)
