"""Textual-inversion embeddings: formats, lazy loading by name, SDXL clip_l/clip_g, TI hashes."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.diffusion import checkpoints as ck
from modules.diffusion.conditioning import encode_schedule
from modules.diffusion.embeddings import list_embeddings, mentioned, read_embedding
from modules.diffusion.loading import load_sd_model


@pytest.fixture()
def models(fixture_data_dir, tmp_path):
    """A private copy of the embeddings folder beside the shared checkpoints."""
    shutil.copytree(fixture_data_dir / "models" / "embeddings", tmp_path / "embeddings")
    return fixture_data_dir / "models", tmp_path / "embeddings"


def _load(models, name, emb_dir):
    infos = ck.list_checkpoints(models / "Stable-diffusion", compute_hashes=False)
    return load_sd_model(ck.find_checkpoint(infos, name), embeddings_dir=emb_dir)


def test_formats(tmp_path):
    vec = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    save_file({"emb_params": vec}, str(tmp_path / "a1111.safetensors"))
    save_file({"<tok>": vec[0].clone()}, str(tmp_path / "diffusers.safetensors"))
    save_file({"clip_l": vec.clone(), "clip_g": vec * 2}, str(tmp_path / "xl.safetensors"))
    save_file({"x": vec, "y": vec.clone()}, str(tmp_path / "other.safetensors"))
    save_file({"string_to_param.*": vec.clone(), "string_to_token.*": torch.tensor([265])},
              str(tmp_path / "flat.safetensors"))
    assert torch.equal(read_embedding(tmp_path / "flat.safetensors")["clip_l"], vec)
    torch.save({"string_to_param": {"*": vec}, "name": "old"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="allow-unsafe-pickle"):
        read_embedding(tmp_path / "old.pt")
    assert torch.equal(read_embedding(tmp_path / "old.pt", allow_unsafe_pickle=True)["clip_l"], vec)
    assert torch.equal(read_embedding(tmp_path / "a1111.safetensors")["clip_l"], vec)
    assert read_embedding(tmp_path / "diffusers.safetensors")["clip_l"].shape == (1, 3)
    assert set(read_embedding(tmp_path / "xl.safetensors")) == {"clip_l", "clip_g"}
    with pytest.raises(ValueError, match="not a textual-inversion"):
        read_embedding(tmp_path / "other.safetensors")
    infos = {i.name: i for i in list_embeddings(tmp_path)}
    assert infos["other"].error and infos["a1111"].vectors == 2
    assert "pickle" in infos["old"].error
    data = (tmp_path / "xl.safetensors").read_bytes()
    assert infos["xl"].shorthash == hashlib.sha256(data).hexdigest()[:12] and infos["xl"].kind == "sdxl"


def test_mentioned_matches_whole_names():
    assert mentioned("tiny-emb", ["a photo, tiny-emb style"])
    assert not mentioned("tiny-emb", ["a tiny-emb2 photo", "xtiny-emb"])


def test_sd15_embedding_loaded_by_name_with_its_vectors(models):
    root, emb_dir = models
    sd = _load(root, "tiny-sd15", emb_dir)
    plain = encode_schedule(sd, "a photo of a cat", "", 4, 1)
    assert plain.ti_hashes == {} and sd.loaded_embeddings == {}
    sched = encode_schedule(sd, "a photo of tiny-emb", "", 4, 1)
    expected_hash = hashlib.sha256((emb_dir / "tiny-emb.safetensors").read_bytes()).hexdigest()[:12]
    assert sched.ti_hashes == {"tiny-emb": expected_hash}
    tok, enc = sd.pipe.tokenizer, sd.pipe.text_encoder
    ids = tok.convert_tokens_to_ids(["tiny-emb", "tiny-emb_1"])
    vectors = load_file(str(emb_dir / "tiny-emb.safetensors"))["emb_params"]
    assert torch.equal(enc.get_input_embeddings().weight[ids].detach(), vectors)
    # the two vectors are really in the prompt: 4 words + 2 embedding tokens after BOS
    explicit = sd.pipe.text_encoder(torch.tensor([[tok.bos_token_id] + tok("a photo of", add_special_tokens=False)
                                                   .input_ids + ids + [tok.eos_token_id] * (77 - 6)]))[0]
    assert torch.allclose(sched.at_step(0)["prompt_embeds"], explicit, atol=1e-6)
    again = encode_schedule(sd, "tiny-emb", "tiny-emb", 4, 1)  # already loaded: no second load
    assert again.ti_hashes == {"tiny-emb": expected_hash}


def test_sdxl_embedding_fills_both_encoders_and_wrong_type_is_ignored(models):
    root, emb_dir = models
    sd = _load(root, "tiny-sdxl", emb_dir)
    sched = encode_schedule(sd, "tiny-xl-emb and tiny-emb", "", 4, 1)
    assert set(sched.ti_hashes) == {"tiny-xl-emb"}
    assert any("tiny-emb" in w and "does not fit" in w for w in sched.warnings)
    state = load_file(str(emb_dir / "tiny-xl-emb.safetensors"))
    for key, tok, enc in (("clip_l", sd.pipe.tokenizer, sd.pipe.text_encoder),
                          ("clip_g", sd.pipe.tokenizer_2, sd.pipe.text_encoder_2)):
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("tiny-xl-emb")]
        assert torch.equal(row.detach(), state[key][0])


def test_pickled_embedding_needs_the_flag_and_then_loads_with_weights_only(models):
    """--allow-unsafe-pickle enables A1111's own .pt embeddings (read with weights_only=True); without it they
    are listed as skipped with a reason that names the flag, and a prompt naming one warns instead."""
    root, emb_dir = models
    vectors = load_file(str(emb_dir / "tiny-emb.safetensors"))["emb_params"]
    torch.save({"string_to_param": {"*": vectors.clone()}, "name": "old-emb", "step": 100}, emb_dir / "old-emb.pt")
    refused = {i.name: i for i in list_embeddings(emb_dir)}["old-emb"]
    assert "--allow-unsafe-pickle" in refused.error and refused.vectors == 0
    allowed = {i.name: i for i in list_embeddings(emb_dir, allow_unsafe_pickle=True)}["old-emb"]
    assert allowed.error is None and allowed.vectors == 2 and allowed.kind is None  # tiny width: no SD type

    sd = _load(root, "tiny-sd15", emb_dir)
    sched = encode_schedule(sd, "a photo of old-emb", "", 4, 1)
    assert "old-emb" not in sched.ti_hashes and any("--allow-unsafe-pickle" in w for w in sched.warnings)

    infos = ck.list_checkpoints(root / "Stable-diffusion", compute_hashes=False)
    sd = load_sd_model(ck.find_checkpoint(infos, "tiny-sd15"), embeddings_dir=emb_dir, allow_unsafe_pickle=True)
    sched = encode_schedule(sd, "a photo of old-emb", "", 4, 1)
    assert sched.ti_hashes == {"old-emb": allowed.shorthash}
    ids = sd.pipe.tokenizer.convert_tokens_to_ids(["old-emb", "old-emb_1"])
    assert torch.equal(sd.pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vectors)


def test_pickle_that_is_more_than_tensors_is_refused_even_with_the_flag(tmp_path):
    import argparse  # any class outside torch's weights_only allow-list stands for a code-running payload
    torch.save({"string_to_param": {"*": torch.ones(1, 3)}, "x": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 not really a zip")
    infos = {i.name: i for i in list_embeddings(tmp_path, allow_unsafe_pickle=True)}
    assert "safe unpickler" in infos["evil"].error
    assert "not a readable PyTorch file" in infos["cut"].error
