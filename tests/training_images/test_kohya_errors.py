"""kohya files: nothing the user has is overwritten or half-written, and files or adapters that cannot
be a kohya LoRA are refused with a message naming the file, layer and reason."""
from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.fixtures.diffusion import build_sd15, build_sdxl, kohya_lora
from modules.training.images import kohya_format as kf
from modules.training.images import lora_targets as lt
from modules.training.images.kohya_metadata import KohyaMetadataError, TrainingRecord, kohya_metadata


def _tensors(value: float = 1.0) -> dict:
    return {"lora_unet_a.lora_down.weight": torch.full((2, 3), value), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
            "lora_unet_a.alpha": torch.tensor(2.0)}


def test_existing_file_is_never_replaced_unless_asked(tmp_path):
    path = tmp_path / "Lora" / "mine.safetensors"
    assert kf.save_kohya_lora(path, _tensors(1.0), {"ss_output_name": "mine"}) == path
    before = path.read_bytes()
    with pytest.raises(kf.LoraExistsError, match="mine.safetensors already exists and was left as it is"):
        kf.save_kohya_lora(path, _tensors(2.0), {"ss_output_name": "mine"})
    assert path.read_bytes() == before
    second = kf.save_kohya_lora(path, _tensors(2.0), {"ss_output_name": "mine"}, if_exists="number")
    assert second.name == "mine-2.safetensors" and path.read_bytes() == before
    assert load_file(str(second))["lora_unet_a.lora_down.weight"][0, 0] == 2.0
    kf.save_kohya_lora(path, _tensors(3.0), {"ss_output_name": "mine"}, if_exists="replace")
    assert load_file(str(path))["lora_unet_a.lora_down.weight"][0, 0] == 3.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["mine-2.safetensors", "mine.safetensors"]


def test_full_disk_leaves_no_partial_file_and_the_old_one_whole(tmp_path):
    path = tmp_path / "mine.safetensors"
    kf.save_kohya_lora(path, _tensors(), {"ss_output_name": "mine"})
    before = path.read_bytes()

    def full_disk(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(kf.LoraWriteError, match="the disk is full"):
        kf.write_atomic(path, full_disk, if_exists="replace")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]


def test_writer_refuses_what_loaders_would_reject(tmp_path):
    with pytest.raises(kf.KohyaFormatError, match="lora_unet_a lacks alpha"):
        kf.save_kohya_lora(tmp_path / "x.safetensors", {k: v for k, v in _tensors().items() if "alpha" not in k}, {})
    with pytest.raises(kf.KohyaFormatError, match="bundle_emb"):
        kf.save_kohya_lora(tmp_path / "x.safetensors", {**_tensors(), "bundle_emb.x.string_to_param": torch.ones(1)},
                           {})
    with pytest.raises(kf.KohyaFormatError, match="must be strings; not so for ss_network_dim"):
        kf.save_kohya_lora(tmp_path / "x.safetensors", _tensors(), {"ss_network_dim": 4})
    assert not list(tmp_path.iterdir())


def test_exporting_needs_a_plain_lora_adapter():
    from peft import LoraConfig
    pipe = build_sd15()
    with pytest.raises(kf.KohyaFormatError, match="no LoRA adapter named 'default'"):
        kf.peft_to_kohya(kf.pipeline_components(pipe))
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(kf.KohyaFormatError, match=r"unet\.down_blocks\.0\..*to_q cannot be written.*DoRA"):
        kf.peft_to_kohya(kf.pipeline_components(pipe))


def test_rslora_scale_becomes_kohya_alpha():
    from peft import LoraConfig
    pipe = build_sd15()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_k"], use_rslora=True))
    state = kf.peft_to_kohya({"unet": pipe.unet})
    alphas = {v.item() for k, v in state.items() if k.endswith(".alpha")}
    assert alphas == {4.0}  # peft scale 2/√4 = 1 = kohya alpha/rank


def test_reader_names_every_problem(tmp_path):
    pipe = build_sd15()
    parts = kf.pipeline_components(pipe)
    good = kohya_lora(pipe, seed=3)
    bad = dict(good)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad[f"{q}.lora_up.weight"] = torch.ones(7, 4)  # wrong out features
    bad["lora_unet_no_such_layer.lora_down.weight"] = torch.ones(4, 4)
    bad["lora_unet_no_such_layer.lora_up.weight"] = torch.ones(4, 4)
    bad["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = torch.ones(4, 4)
    bad["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = torch.ones(1, 32)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(kf.KohyaFormatError) as info:
        kf.load_kohya_into_peft(parts, path)
    message = str(info.value)
    assert str(path) in message
    for expected in (f"{q}: shapes", "lora_unet_no_such_layer: no such layer in this SD 1.x/2.x model",
                     "hada_w1_a: a LyCORIS", "dora_scale: DoRA"):
        assert expected in message
    assert not any("lora" in type(m).__name__.lower() for m in pipe.unet.modules())  # nothing half-injected
    with pytest.raises(kf.KohyaFormatError, match="was made for SDXL .* this is an SD 1.x/2.x model"):
        kf.kohya_to_peft(kohya_lora(build_sdxl(), seed=1, sgm_names=True), parts)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(kf.KohyaFormatError, match="junk.safetensors is not a readable safetensors LoRA"):
        kf.read_kohya_lora(tmp_path / "junk.safetensors")


def test_reader_takes_diffusers_spelled_sdxl_files_and_missing_alpha():
    import re
    pipe = build_sdxl()
    parts = kf.pipeline_components(pipe)
    sgm = lt.kohya_names("unet", pipe.unet, sdxl=True)
    spelled = {sgm[p]: name for p, name in lt.kohya_names("unet", pipe.unet, sdxl=True, layout="diffusers").items()}
    state = {}  # SDXL with diffusers-style UNet names, as some other trainers write them
    for key, value in kohya_lora(pipe, rank=4, alpha=2.0, seed=5, sgm_names=True).items():
        name, _, part = key.partition(".")
        state[f"{spelled.get(name, name)}.{part}"] = value
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    del state[f"{name}.alpha"]  # old files have none: alpha = rank
    loras = kf.kohya_to_peft(state, parts)
    config = loras["unet"].config
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert config.r == 4 and config.lora_alpha == 2.0 and path in config.target_modules
    assert config.alpha_pattern == {re.escape(path): 4.0} and config.rank_pattern == {}
    assert set(loras) == {"unet", "text_encoder", "text_encoder_2"}


def test_metadata_record_problems_are_listed_together():
    record = TrainingRecord(output_name="", kind="sd3", network_dim=0, network_alpha=1.0, resolution=(512, 500.5),
                            learning_rate=1e-4, extra={"not_ss": "x"})
    with pytest.raises(KohyaMetadataError) as info:
        kohya_metadata(record, steps=1, epoch=1)
    message = str(info.value)
    for expected in ("output_name", "kind must be sd1, sd2 or sdxl", "network_dim", "resolution", "'not_ss'"):
        assert expected in message


def test_loading_twice_under_one_adapter_name_is_refused_before_any_change():
    pipe = build_sd15()
    parts = kf.pipeline_components(pipe)
    state = kohya_lora(pipe, seed=2)
    kf.load_kohya_into_peft(parts, state)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(kf.KohyaFormatError, match="unet, text_encoder already has an adapter named 'default'"):
        kf.load_kohya_into_peft(parts, state)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
