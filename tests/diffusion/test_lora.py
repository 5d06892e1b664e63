"""LoRA: kohya and diffusers/PEFT files change the weights by the expected amount, and go away cleanly."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import load_sd_model
from modules.diffusion.lora import apply_loras, find_lora, list_loras, lora_hash
from modules.diffusion.prompt_parser import extract_extra_networks


@pytest.fixture(scope="module")
def models(fixture_data_dir):
    return fixture_data_dir / "models"


@pytest.fixture(scope="module")
def sd15(models):
    return load_sd_model(ck.find_checkpoint(ck.list_checkpoints(models / "Stable-diffusion", compute_hashes=False),
                                            "tiny-sd15"))


@pytest.fixture(scope="module")
def sdxl(models):
    return load_sd_model(ck.find_checkpoint(ck.list_checkpoints(models / "Stable-diffusion", compute_hashes=False),
                                            "tiny-sdxl"))


def _calls(tags: str):
    return extract_extra_networks(tags)[1]["lora"]


def _snapshot(pipe):
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def _assert_restored(pipe, snapshot):
    for name, state in snapshot.items():
        now = getattr(pipe, name).state_dict()
        assert now.keys() == state.keys(), f"{name}: LoRA layers left behind"
        for key in state:
            assert torch.equal(now[key], state[key]), f"{name}.{key} changed"
        assert not any("lora" in type(m).__module__ for m in getattr(pipe, name).modules())


def _delta(module, x):
    """The LoRA branch's contribution: output with adapters minus the base layer's output."""
    with torch.no_grad():
        return module(x) - module.base_layer(x)


def test_listing_hashes_and_formats(models, tmp_path, monkeypatch):
    quick = {l.name: l for l in list_loras(models / "Lora")}
    assert quick["tiny-sd15-peft"].shorthash is None  # listing reads headers only
    loras = {l.name: l for l in list_loras(models / "Lora", compute_hashes=True, cache_dir=tmp_path)}
    assert loras["tiny-sd15-kohya"].format == "kohya" and loras["tiny-sd15-kohya"].base == "sd1"
    assert loras["tiny-sdxl-kohya"].base == "sdxl"
    assert loras["tiny-sd15-peft"].format == "diffusers" and loras["tiny-sd15-peft"].base == "sd1"
    path = models / "Lora" / "tiny-sd15-peft.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert loras["tiny-sd15-peft"].shorthash == lora_hash(path)[:12]
    from modules.diffusion import lora as lora_module
    monkeypatch.setattr(lora_module, "lora_hash", lambda p: (_ for _ in ()).throw(AssertionError("not cached")))
    again = {l.name: l for l in list_loras(models / "Lora", compute_hashes=True, cache_dir=tmp_path)}
    assert again["tiny-sd15-peft"].shorthash == loras["tiny-sd15-peft"].shorthash
    item = loras["tiny-sd15-kohya"].api_item()
    assert item["alias"] == "tiny-sd15-kohya" and item["metadata"]["ss_network_dim"] == "4"
    found = find_lora(list(loras.values()), "tiny-sd15-kohya")
    assert found.filename == str(models / "Lora" / "tiny-sd15-kohya.safetensors")


def test_kohya_lora_changes_unet_and_te_by_expected_amount(sd15, models):
    pipe = sd15.pipe
    snapshot = _snapshot(pipe)
    state = load_file(str(models / "Lora" / "tiny-sd15-kohya.safetensors"))
    scale = 2.0 / 4  # alpha / rank
    gen = torch.Generator().manual_seed(0)
    with apply_loras(sd15, _calls("<lora:tiny-sd15-kohya:0.5:1.5>"), models / "Lora") as applied:
        assert applied.hashes == {"tiny-sd15-kohya": lora_hash(models / "Lora" / "tiny-sd15-kohya.safetensors")[:12]}
        assert applied.warnings == []
        q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        x = torch.randn(2, 5, q.in_features, generator=gen)
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        expect = x @ state[f"{name}.lora_down.weight"].T @ state[f"{name}.lora_up.weight"].T * scale * 1.5
        assert torch.allclose(_delta(q, x), expect, atol=1e-5)
        fc1 = pipe.text_encoder.encoder.layers[1].mlp.fc1
        x = torch.randn(3, fc1.in_features, generator=gen)
        name = "lora_te_text_model_encoder_layers_1_mlp_fc1"
        expect = x @ state[f"{name}.lora_down.weight"].T @ state[f"{name}.lora_up.weight"].T * scale * 0.5
        assert torch.allclose(_delta(fc1, x), expect, atol=1e-5)
        proj_in = pipe.unet.down_blocks[0].attentions[0].proj_in  # a 1x1 conv in SD1
        x = torch.randn(1, proj_in.base_layer.in_channels, 4, 4, generator=gen)
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        down, up = state[f"{name}.lora_down.weight"][:, :, 0, 0], state[f"{name}.lora_up.weight"][:, :, 0, 0]
        expect = torch.einsum("oi,bihw->bohw", up @ down, x) * scale * 1.5
        assert torch.allclose(_delta(proj_in, x), expect, atol=1e-5)
    _assert_restored(pipe, snapshot)


def test_peft_and_kohya_together_and_unknown_lora_warns(sd15, models):
    pipe = sd15.pipe
    snapshot = _snapshot(pipe)
    peft = load_file(str(models / "Lora" / "tiny-sd15-peft.safetensors"))
    kohya = load_file(str(models / "Lora" / "tiny-sd15-kohya.safetensors"))
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))  # cross-attention width 32
    calls = _calls("<lora:tiny-sd15-kohya:te=1:unet=0.25> <lora:missing-one:1> <lora:tiny-sd15-peft:2>")
    with apply_loras(sd15, calls, models / "Lora") as applied:
        k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k  # the wrapped layer
        assert set(applied.hashes) == {"tiny-sd15-kohya", "tiny-sd15-peft"}
        assert len(applied.warnings) == 1 and "missing-one" in applied.warnings[0]
        base = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        expect_peft = x @ peft[f"unet.{base}.lora.down.weight"].T @ peft[f"unet.{base}.lora.up.weight"].T * 2.0
        name = "lora_unet_" + base.replace(".", "_")
        expect_kohya = x @ kohya[f"{name}.lora_down.weight"].T @ kohya[f"{name}.lora_up.weight"].T * 0.5 * 0.25
        assert torch.allclose(_delta(k, x), expect_peft + expect_kohya, atol=1e-5)
    _assert_restored(pipe, snapshot)


def test_sdxl_kohya_sgm_names_reach_both_text_encoders(sdxl, models):
    pipe = sdxl.pipe
    snapshot = _snapshot(pipe)
    state = load_file(str(models / "Lora" / "tiny-sdxl-kohya.safetensors"))
    gen = torch.Generator().manual_seed(2)
    with apply_loras(sdxl, _calls("<lora:tiny-sdxl-kohya:1>"), models / "Lora") as applied:
        assert applied.warnings == []
        q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        x = torch.randn(1, 2, q.in_features, generator=gen)
        name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # SGM name of down_blocks.1.attentions.0
        expect = x @ state[f"{name}.lora_down.weight"].T @ state[f"{name}.lora_up.weight"].T * 0.5
        assert torch.allclose(_delta(q, x), expect, atol=1e-5)
        v2 = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.v_proj
        x = torch.randn(1, v2.in_features, generator=gen)
        name = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
        expect = x @ state[f"{name}.lora_down.weight"].T @ state[f"{name}.lora_up.weight"].T * 0.5
        assert torch.allclose(_delta(v2, x), expect, atol=1e-5)
    _assert_restored(pipe, snapshot)


def test_wrong_model_type_and_broken_files_warn(sd15, models, tmp_path):
    lora_dir = tmp_path / "Lora"
    shutil.copytree(models / "Lora", lora_dir)
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    snapshot = _snapshot(sd15.pipe)
    with apply_loras(sd15, _calls("<lora:tiny-sdxl-kohya:1> <lora:broken:1> <lora:tiny-sd15-kohya:abc>"),
                     lora_dir) as applied:
        assert applied.hashes == {}
        assert len(applied.warnings) == 3
        assert "sdxl" in applied.warnings[0] and "broken" in applied.warnings[1] and "abc" in applied.warnings[2]
    _assert_restored(sd15.pipe, snapshot)


def test_lora_removed_even_when_the_job_fails(sd15, models):
    snapshot = _snapshot(sd15.pipe)
    with pytest.raises(RuntimeError, match="job failed"):
        with apply_loras(sd15, _calls("<lora:tiny-sd15-peft:1>"), models / "Lora"):
            raise RuntimeError("job failed")
    _assert_restored(sd15.pipe, snapshot)


def test_kohya_metadata_hash_and_alias(models, tmp_path):
    state = load_file(str(models / "Lora" / "tiny-sd15-kohya.safetensors"))
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "file-name.safetensors"),
              {"sshs_model_hash": "0123456789abcdef" * 4, "ss_output_name": "pretty-name"})
    (info,) = list_loras(tmp_path)
    assert (info.name, info.alias, info.shorthash) == ("file-name", "pretty-name", "0123456789ab")
    assert find_lora([info], "pretty-name") is info


def test_unconvertible_lora_is_a_warning_and_leaves_nothing_behind(sd15, models, tmp_path):
    from safetensors.torch import save_file
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    # a LoHa-style file: kohya names but keys diffusers cannot convert
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(4, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.ones(4, 16),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)},
              str(lora_dir / "loha.safetensors"))
    shutil.copy(models / "Lora" / "tiny-sd15-peft.safetensors", lora_dir)
    snapshot = _snapshot(sd15.pipe)
    with apply_loras(sd15, _calls("<lora:loha:1> <lora:tiny-sd15-peft:1>"), lora_dir) as applied:
        assert list(applied.hashes) == ["tiny-sd15-peft"]
        assert len(applied.warnings) == 1 and "loha" in applied.warnings[0]
    _assert_restored(sd15.pipe, snapshot)
