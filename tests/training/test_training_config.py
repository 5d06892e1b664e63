"""Training configs: the example loads, every problem of a bad config is reported at once."""
from pathlib import Path

import pytest

from modules.training.config import ConfigError, PretrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads_with_overrides():
    config = load_config(REPO / "configs/training/pretrain-tiny.yaml", ["data=/tmp/ds", "lr=4e-4",
                                                                         "model.hidden_size=128"])
    assert isinstance(config, PretrainConfig)
    assert config.data == "/tmp/ds" and config.lr == 4e-4          # "4e-4" is a str to PyYAML; accepted
    assert config.model == {"vocab_size": 512, "hidden_size": 128}
    assert config.grad_accum_steps() == 2
    assert config.model_config().hidden_size == 128


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\nseq_len: long\nlr: 0\nmicro_batch: 3\nglobal_batch_tokens: 1000\n"
                    "max_steps: 10\ndata: /d\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.hidden_sise=64", "warmup_stepz=3"])
    text = str(info.value)
    assert "unknown key 'learning_rate'" in text
    assert "unknown key 'warmup_stepz' (did you mean 'warmup_steps'?)" in text
    assert "seq_len must be an integer, got 'long'" in text
    assert "lr must be > 0" in text                            # value problems in the same error
    path.write_text("lr: 0\nmicro_batch: 3\nglobal_batch_tokens: 1000\nseq_len: 64\nmax_steps: 10\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.hidden_sise=64"], world_size=2)
    text = str(info.value)
    assert "lr must be > 0" in text
    assert "must be a multiple of micro_batch x processes x seq_len = 3 x 2 x 64 = 384" in text
    assert "data is required" in text
    assert "model.hidden_sise is not a Llama config field (did you mean 'hidden_size'?)" in text


def test_model_shape_problems_and_length_are_named():
    with pytest.raises(ConfigError, match="num_attention_heads .* multiple of num_key_value_heads"):
        load_config(None, ["data=/d", "max_steps=1", "model.num_key_value_heads=3"])
    with pytest.raises(ConfigError, match="set max_steps or max_tokens"):
        load_config(None, ["data=/d"])
    with pytest.raises(ConfigError, match="model_preset 'tiny-gq' is unknown \\(did you mean 'tiny-gqa'"):
        load_config(None, ["data=/d", "max_steps=1", "model_preset=tiny-gq"])
    assert load_config(None, ["data=/d", "max_tokens=40000", "global_batch_tokens=16384"]).total_steps() == 3
