"""LlamaConfig: HF config.json in and out, validation that reports every problem, presets."""
import json

import pytest
import torch

from modules.llm.config import PRESETS, LlamaConfig

TINYLLAMA_CHAT_CONFIG = {   # TinyLlama-1.1B-Chat-v1.0's config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 22, "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000,
}


def test_reads_tinyllama_config_and_matches_preset():
    config = LlamaConfig.from_hf_dict(TINYLLAMA_CHAT_CONFIG)
    assert config == LlamaConfig.from_name("tinyllama-1.1b", torch_dtype="bfloat16")
    assert (config.head_dim, config.kv_groups, config.eos_token_ids) == (64, 8, [2])
    assert config.num_parameters() == 1_100_048_384


def test_round_trip_through_json_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig.from_name("tiny-gqa", rope_scaling={"type": "linear", "factor": 4.0},
                                   tie_word_embeddings=True, eos_token_id=[2, 7])
    config.to_json_file(tmp_path / "config.json")
    again = LlamaConfig.from_json_file(tmp_path / "config.json")
    assert again == config
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_config.num_key_value_heads == 2 and hf_config.tie_word_embeddings is True
    assert LlamaConfig.from_hf_dict(hf_config.to_dict()) == config     # transformers 5's rope_parameters
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(hf_config)
    unique = {id(p): p.numel() for p in hf_model.parameters()}
    assert sum(unique.values()) == config.num_parameters()


def test_defaults_mha_and_rope_variants():
    base = {k: PRESETS["tiny-gqa"][k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads")}
    config = LlamaConfig.from_hf_dict(base)
    assert config.num_key_value_heads == config.num_attention_heads and config.rope_scaling is None
    dynamic = LlamaConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2}})
    assert dynamic.rope_scaling == {"type": "dynamic", "factor": 2}
    v5 = LlamaConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v5.rope_theta == 5e5 and v5.rope_scaling is None


def test_validation_reports_every_problem_with_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINYLLAMA_CHAT_CONFIG, "num_key_value_heads": 5, "hidden_act": "gelu",
                                "rms_norm_eps": -1, "rope_scaling": {"type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError) as info:
        LlamaConfig.from_json_file(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in ("num_attention_heads (32) must be a multiple of num_key_value_heads (5)",
                     "hidden_act 'gelu'", "rms_norm_eps", "rope_scaling type 'yarn'"):
        assert fragment in message


def test_missing_fields_bad_json_and_wrong_model_type(tmp_path):
    with pytest.raises(ValueError, match="'hidden_size' is missing") as info:
        LlamaConfig.from_hf_dict({"vocab_size": 10, "model_type": "llama"}, source="x/config.json")
    assert "'num_hidden_layers' is missing" in str(info.value) and "x/config.json" in str(info.value)
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        LlamaConfig.from_hf_dict({**TINYLLAMA_CHAT_CONFIG, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="positive integer"):
        LlamaConfig.from_hf_dict({**TINYLLAMA_CHAT_CONFIG, "hidden_size": "2048"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_json_file(tmp_path / "nope" / "config.json")


def test_presets():
    with pytest.raises(ValueError, match="tinyllama-1.1b"):
        LlamaConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="Unknown LlamaConfig field"):
        LlamaConfig.from_name("tiny-gqa", n_layers=3)
    wider = LlamaConfig.from_name("tiny-gqa", hidden_size=128)
    assert wider.head_dim == 32            # derived again from the overridden size
