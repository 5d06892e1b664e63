"""HF folder loading and saving: round trips, shards, strict keys, shapes, pickle policy, loader."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.fixtures.llm import FIXTURE_MODELS, randomize_weights, write_model
from modules.llm.checkpoint import CheckpointError, load_model, save_hf_folder
from modules.llm.config import LlamaConfig
from modules.llm.loader import list_llm_models, load_llm
from modules.llm.model import Llama

IDS = torch.tensor([[1, 5, 9, 200, 3, 77, 12]])


@pytest.fixture(scope="module")
def fixture_folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("ckpt") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture
def folder(fixture_folder, tmp_path):
    """A private copy each test may damage."""
    return shutil.copytree(fixture_folder, tmp_path / "model")


def random_model(**overrides):
    model = Llama(LlamaConfig(**{**FIXTURE_MODELS["tiny-llama-gqa"], **overrides})).eval()
    randomize_weights(model, seed=3)
    return model


def assert_same_logits(a, b, atol=1e-6):
    with torch.inference_mode():
        torch.testing.assert_close(a(IDS), b(IDS), atol=atol, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_and_transformers_loads_it(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = random_model(tie_word_embeddings=tied)
    save_hf_folder(model, tmp_path)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tied
    loaded = load_model(tmp_path)
    assert_same_logits(model, loaded)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(IDS).logits, loaded(IDS), atol=1e-4, rtol=0)


def test_sharded_round_trip_with_tokenizer_files(fixture_folder, tmp_path):
    model = load_model(fixture_folder)
    save_hf_folder(model, tmp_path, tokenizer_dir=fixture_folder, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (fixture_folder / name).read_bytes()
    assert_same_logits(model, load_model(tmp_path))
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]):
        load_model(tmp_path)


def test_dtype_cast(fixture_folder):
    model = load_model(fixture_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cache = model.new_kv_cache(1, 16)
    assert cache.k[0].dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.isfinite(model(IDS, cache=cache)).all()


def test_strict_keys_name_missing_and_unexpected(folder):
    weights = load_file(folder / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)   # old checkpoints: ignored
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected keys (1): model.layers.0.self_attn.extra.weight" in message
    assert "inv_freq" not in message


def test_inv_freq_is_ignored(folder, fixture_folder):
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(weights, folder / "model.safetensors")
    assert_same_logits(load_model(folder), load_model(fixture_folder))


def test_shape_mismatch_names_tensor_and_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint has [176, 64], config.json implies [128, 64]" \
        in str(info.value)


def test_pickle_refused_unless_allowed(folder, fixture_folder):
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle"):
        load_model(folder)
    assert_same_logits(load_model(folder, allow_unsafe_pickle=True), load_model(fixture_folder))
    torch.save({"weights": state, "fn": print}, folder / "pytorch_model.bin")    # not weights-only
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        load_model(folder, allow_unsafe_pickle=True)


def test_no_weights_and_malformed_config(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    (folder / "config.json").write_text('{"vocab_size": 512, "hidden_size": 64')
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_model(folder)


def test_loader_and_listing(fixture_folder, tmp_path):
    root = tmp_path / "LLM"
    shutil.copytree(fixture_folder, root / "good")
    shutil.copytree(fixture_folder, root / "no-tokenizer")
    (root / "no-tokenizer" / "tokenizer.model").unlink()
    shutil.copytree(fixture_folder, root / "bad-config")
    (root / "bad-config" / "config.json").write_text(json.dumps({"vocab_size": 512}))
    (root / "not-a-model").mkdir()
    listing = {m["name"]: m for m in list_llm_models(root)}
    assert sorted(listing) == ["bad-config", "good", "no-tokenizer"]
    assert listing["good"]["error"] is None
    assert "tokenizer.model" in listing["no-tokenizer"]["error"]
    assert "hidden_size" in listing["bad-config"]["error"]
    llm = load_llm(root / "good")
    assert llm.name == "good" and llm.tokenizer.eos_id == 2 and llm.template.origin == "tokenizer_config.json"
    assert llm.generation_config["eos_token_id"] == 2
    assert llm.memory_bytes() == 4 * llm.model.num_parameters()
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_llm(root / "no-tokenizer")
    with pytest.raises(ValueError, match="hidden_size"):
        load_llm(root / "bad-config")
    assert list_llm_models(tmp_path / "missing") == []
