"""The draft's lean batch-1 forward computes what the model computes, and refuses what it cannot do exactly."""
import pytest
import torch

from modules.llm.config import LlamaConfig
from modules.llm.lean_decode import lean_decoder
from modules.llm.model import Llama

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


def model(dtype=torch.float32, **fields):
    torch.manual_seed(0)
    m = Llama(LlamaConfig(**{**SHAPE, **fields})).eval().requires_grad_(False)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_steps_match_the_model_with_rollback(dtype):
    m = model(dtype)
    lean = lean_decoder(m, 64)
    cache = m.new_kv_cache(1, 64)
    prompt, more, step = list(range(3, 20)), [40, 41, 42], [7]
    with torch.inference_mode():
        for ids in (prompt, more, step):          # prefill from empty, several tokens after a cache, one token
            want = m(torch.tensor([ids]), cache=cache)[0]
            got = lean(ids, last_only=False)
            torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-4)
        cache.truncate(len(prompt))                # a rejected draft run: both roll back and go on
        lean.truncate(len(prompt))
        want = m(torch.tensor([step]), cache=cache, last_only=True)[0]
        torch.testing.assert_close(lean(step), want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-4)
    assert lean.length == cache.length == len(prompt) + 1
    with pytest.raises(ValueError, match="exceed the cache size"):
        lean(list(range(64)))


def test_models_it_cannot_run_exactly_are_left_to_the_model():
    assert lean_decoder(model(rope_scaling={"type": "linear", "factor": 2.0}), 32) is None
    biased = model(attention_bias=True)
    assert lean_decoder(biased, 32) is None
    assert lean_decoder(model(), 32) is not None
