"""kohya LoRA output: a peft LoRA written as a kohya file loads, unchanged, in diffusers and in
Atelier's ``<lora:name:1>`` with exactly the trained effect, carries kohya's metadata and hashes, and
reads back into peft for continued training. SD 1.5 (lora_te) and SDXL (lora_te1/te2, SGM names)."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save

from modules.diffusion import checkpoints as ck
from modules.diffusion.loading import load_sd_model
from modules.diffusion.lora import apply_loras, list_loras, lora_hash
from modules.diffusion.prompt_parser import extract_extra_networks
from modules.fixtures.diffusion import build_sd15, build_sdxl
from modules.training.images import kohya_format as kf
from modules.training.images import lora_targets as lt
from modules.training.images.diffusers_lora import save_diffusers_lora
from modules.training.images.kohya_metadata import TrainingRecord, kohya_metadata, tag_frequency

BUILD = {"sd1": build_sd15, "sdxl": build_sdxl}
CHECKPOINT = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}  # the fixture files hold build_sd15()/build_sdxl()


def _record(kind: str, **extra) -> TrainingRecord:
    return TrainingRecord(output_name=f"shapes-{kind}", kind=kind, network_dim=4, network_alpha=2.0,
                          resolution=(512, 512) if kind == "sd1" else (1024, 1024), learning_rate=1e-4,
                          unet_lr=1e-4, text_encoder_lr=5e-5, conv_dim=2, conv_alpha=1.0, seed=1234,
                          max_train_steps=40, num_epochs=2, num_train_images=20, sd_model_name=CHECKPOINT[kind],
                          dataset_dirs={"10_shapes": {"n_repeats": 10, "img_count": 2}},
                          tag_frequency=tag_frequency({"10_shapes": ["red circle, Blue square", "red circle"]}),
                          training_started_at=1_700_000_000.0, **extra)


def _trained(kind: str, seed: int = 0):
    """A fixture pipeline with kohya's LoRA layers (conv too; rank 4/alpha 2, conv 2/1, TE alpha 3)
    injected through peft, and random non-zero up weights, as after some training."""
    pipe = BUILD[kind]()
    parts = kf.pipeline_components(pipe)
    kf.inject(parts["unet"], lt.lora_config(lt.unet_targets(parts["unet"], conv=True), rank=4, alpha=2.0,
                                            conv_rank=2, conv_alpha=1.0))
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            kf.inject(parts[name], lt.lora_config(lt.text_encoder_targets(parts[name]), rank=4, alpha=3.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in parts.values():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: the LoRA would change nothing
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return pipe


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """Each component's forward on fixed inputs."""
    gen = torch.Generator().manual_seed(7)
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 48, generator=gen),
                                       "time_ids": torch.randn(1, 6, generator=gen)}
    ids = torch.randint(0, 1000, (1, 77), generator=gen)
    with torch.no_grad():
        out = {"unet": unet(torch.randn(1, 4, 8, 8, generator=gen), 500, torch.randn(1, 9, cross, generator=gen),
                            **kwargs).sample,
               "text_encoder": pipe.text_encoder(ids).last_hidden_state}
        if getattr(pipe, "text_encoder_2", None) is not None:
            te2 = pipe.text_encoder_2(ids)
            out["text_encoder_2"] = torch.cat([te2.last_hidden_state.flatten(), te2.text_embeds.flatten()])
    return out


def _assert_same(got: dict, want: dict, base: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        change = (want[name] - base[name]).abs().max().item()
        assert change > 1e-3, f"{name}: the LoRA under test changes nothing ({change})"
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: output differs from the peft model's by {diff}"


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def case(request, tmp_path_factory):
    """(kind, trained peft pipe, its outputs, base outputs, kohya file written from it)."""
    kind = request.param
    pipe = _trained(kind)
    folder = tmp_path_factory.mktemp(f"lora-{kind}")
    path = kf.save_peft_as_kohya(folder / f"shapes-{kind}.safetensors", kf.pipeline_components(pipe),
                                 kohya_metadata(_record(kind), steps=40, epoch=2, finished_at=1_700_000_100.0))
    return kind, pipe, _outputs(pipe), _outputs(BUILD[kind]()), path


def test_file_layout_is_kohyas(case):
    kind, pipe, _, _, path = case
    state = load_file(str(path))
    names = {k.split(".")[0] for k in state}
    assert all(f"{n}.{part}" in state for n in names for part in kf.PARTS)
    assert len(state) == 3 * len(names)
    te_prefixes = {"sd1": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}[kind]
    assert {n.split("_text_model")[0] for n in names if n.startswith("lora_te")} == te_prefixes
    unet = lt.unet_targets(pipe.unet, conv=True)
    tes = sum(len(lt.text_encoder_targets(m).all) for c, m in kf.pipeline_components(pipe).items() if c != "unet")
    assert len(names) == len(unet.all) + tes
    if kind == "sdxl":  # sd-scripts' SGM names: down_blocks.1.attentions.0 is input_blocks.4.1
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names
        assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
        assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    q = "lora_unet_" + ("input_blocks_4_1" if kind == "sdxl" else "down_blocks_0_attentions_0") \
        + "_transformer_blocks_0_attn2_to_k"
    assert state[f"{q}.lora_down.weight"].shape[0] == 4 and state[f"{q}.alpha"].item() == 2.0
    conv = next(n for n in names if n.endswith(("resnets_0_conv1", "0_in_layers_2")))
    assert state[f"{conv}.lora_down.weight"].shape[0] == 2 and state[f"{conv}.alpha"].item() == 1.0
    assert state[f"{conv}.lora_down.weight"].ndim == 4 and state[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    te = next(n for n in names if n.startswith("lora_te"))
    assert state[f"{te}.alpha"].item() == 3.0


def test_diffusers_load_lora_weights_reproduces_the_peft_model(case):
    kind, _, trained, base, path = case
    pipe = BUILD[kind]()
    pipe.load_lora_weights(str(path), adapter_name="shapes")  # the file as written, no conversion by us
    _assert_same(_outputs(pipe), trained, base)


@pytest.fixture(scope="module")
def atelier_models(fixture_data_dir):
    return ck.list_checkpoints(fixture_data_dir / "models" / "Stable-diffusion", compute_hashes=False)


def test_atelier_lora_tag_reproduces_the_peft_model(case, atelier_models, tmp_path):
    kind, _, trained, base, path = case
    sd = load_sd_model(ck.find_checkpoint(atelier_models, CHECKPOINT[kind]))
    before = _outputs(sd.pipe)
    for name in base:  # the premise: Atelier's copy of the checkpoint is the model the LoRA was trained on
        assert torch.allclose(before[name], base[name], atol=1e-6)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shutil.copy(path, lora_dir / "my-shapes.safetensors")
    calls = extract_extra_networks("<lora:my-shapes:1>")[1]["lora"]
    with apply_loras(sd, calls, lora_dir) as applied:
        assert applied.warnings == []
        assert applied.hashes == {"my-shapes": kf.read_kohya_lora(path)[1]["sshs_model_hash"][:12]}
        _assert_same(_outputs(sd.pipe), trained, base)
    after = _outputs(sd.pipe)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_metadata_and_hashes(case):
    kind, _, _, _, path = case
    tensors, meta = kf.read_kohya_lora(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind]
    assert meta["ss_v2"] == "False" and meta["ss_output_name"] == f"shapes-{kind}"
    assert meta["ss_resolution"] == ("(512, 512)" if kind == "sd1" else "(1024, 1024)")
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_seed"]) == ("40", "2", "1234")
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.0001", "0.0001", "5e-05")
    assert meta["ss_training_started_at"] == "1700000000.0" and meta["ss_num_train_images"] == "20"
    assert meta["ss_sd_model_name"] == CHECKPOINT[kind]
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_shapes": {"red circle": 2, "blue square": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_shapes": {"n_repeats": 10, "img_count": 2}}
    assert meta["modelspec.architecture"] == {"sd1": "stable-diffusion-v1/lora",
                                              "sdxl": "stable-diffusion-xl-v1-base/lora"}[kind]
    # independent hashes: the file's bytes after its header, and kohya's ss_-only serialisation
    raw = path.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest() == lora_hash(path)
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    (info,) = list_loras(path.parent)  # what A1111-style listing makes of it
    assert (info.alias, info.base, info.format) == (f"shapes-{kind}", kind, "kohya")
    assert info.shorthash == meta["sshs_model_hash"][:12]


def test_legacy_hash_reads_the_window_at_one_mebibyte():
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(4, -1),
               "lora_unet_x.lora_up.weight": torch.ones(3, 4), "lora_unet_x.alpha": torch.tensor(4.0)}
    meta = {"ss_output_name": "big", "other": "not hashed"}
    model_hash, legacy = kf.kohya_hashes(tensors, meta)
    blob = save(tensors, {"ss_output_name": "big"})
    assert len(blob) > 0x110000
    assert legacy == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8] != hashlib.sha256(b"").hexdigest()[:8]
    assert model_hash == hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()
    assert kf.kohya_hashes(tensors, {**meta, "other": "edited"}) == (model_hash, legacy)


def test_reader_round_trips_into_peft(case):
    from peft.utils import get_peft_model_state_dict
    kind, trained_pipe, trained, base, path = case
    pipe = BUILD[kind]()
    parts = kf.pipeline_components(pipe)
    meta = kf.load_kohya_into_peft(parts, path)
    assert meta["ss_output_name"] == f"shapes-{kind}"
    _assert_same(_outputs(pipe), trained, base)
    for name, model in kf.pipeline_components(trained_pipe).items():
        want, got = get_peft_model_state_dict(model), get_peft_model_state_dict(parts[name])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    again = kf.peft_to_kohya(parts)  # and out again: the same file content
    assert again.keys() == load_file(str(path)).keys()
    assert all(torch.equal(again[k], v) for k, v in load_file(str(path)).items())
    assert any(p.requires_grad for n, p in parts["unet"].named_parameters() if "lora_A" in n)


def test_diffusers_format_copy_loads_at_the_trained_scale(case, tmp_path):
    kind, trained_pipe, trained, base, _ = case
    written = save_diffusers_lora(tmp_path / "diffusers", kf.pipeline_components(trained_pipe))
    assert written.name == "pytorch_lora_weights.safetensors"
    pipe = BUILD[kind]()
    pipe.load_lora_weights(str(written.parent))
    _assert_same(_outputs(pipe), trained, base)
