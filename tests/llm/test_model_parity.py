"""Logits and greedy tokens of modules.llm.model.Llama against transformers' LlamaForCausalLM.

Both models get the same random weights (scaled so logits are O(1), otherwise a 1e-4 tolerance
would hide real differences), fp32, and must agree within 1e-4.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from modules.fixtures.llm import randomize_weights  # noqa: E402
from modules.llm.config import LlamaConfig  # noqa: E402
from modules.llm.model import Llama  # noqa: E402

ATOL = 1e-4

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa8-untied": dict(num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False),
    "gqa2-linear-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                             rope_scaling={"type": "linear", "factor": 2.0}),
    "gqa2-dynamic-rope": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                              rope_scaling={"type": "dynamic", "factor": 2.0}),
}


def build_pair(overrides, seed=0):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=128, rms_norm_eps=1e-5)
    config = LlamaConfig(**{**base, **overrides})
    ours = Llama(config).eval()
    randomize_weights(ours, seed=seed)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return config, ours, hf


def random_ids(config, B, T, seed=1):
    return torch.randint(3, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return build_pair(CONFIGS[request.param])


@torch.inference_mode()
def test_full_forward_matches(pair):
    config, ours, hf = pair
    ids = random_ids(config, 2, 24)
    ref = hf(ids).logits
    got = ours(ids)
    assert got.shape == ref.shape == (2, 24, config.vocab_size)
    assert ref.abs().max() > 0.5, "weights too small for a meaningful comparison"
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(ids, last_only=True), ref[:, -1:], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_token_by_token_with_cache_matches(pair):
    config, ours, hf = pair
    ids = random_ids(config, 2, 24, seed=2)
    out = hf(ids[:, :5], use_cache=True)                            # HF's own incremental decode
    ref, past = [out.logits], out.past_key_values
    for t in range(5, 24):
        out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        ref.append(out.logits)
        past = out.past_key_values
    ref = torch.cat(ref, dim=1)
    cache = ours.new_kv_cache(2, 32)
    pieces = [ours(ids[:, :5], cache=cache)]                      # a prefill of 5, then one at a time
    for t in range(5, 24):
        pieces.append(ours(ids[:, t:t + 1], cache=cache))
    assert cache.length == 24
    got = torch.cat(pieces, dim=1)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    if (config.rope_scaling or {}).get("type") != "dynamic":   # dynamic NTK re-scales with the length
        torch.testing.assert_close(got, hf(ids).logits, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_left_padded_batch_equals_rows_alone():
    config, ours, _ = build_pair(CONFIGS["gqa4-tied"])
    rows = [random_ids(config, 1, n, seed=n)[0] for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        valid[b, width - len(r):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = ours.new_kv_cache(len(rows), width + 4)
    first = ours(ids, positions=positions, cache=cache, key_mask=valid, last_only=True)
    steps, nxt, pos, mask = [first], first.argmax(-1), positions[:, -1:], valid
    for _ in range(3):
        pos = pos + 1
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
        out = ours(nxt, positions=pos, cache=cache, key_mask=mask)
        steps.append(out)
        nxt = out.argmax(-1)
    batched = torch.cat(steps, dim=1)                                  # (B, 4, V)
    for b, r in enumerate(rows):
        alone_cache = ours.new_kv_cache(1, width + 4)
        alone = [ours(r[None], cache=alone_cache, last_only=True)]
        for s in range(3):
            alone.append(ours(batched[b:b + 1, s].argmax(-1, keepdim=True), cache=alone_cache))
        torch.testing.assert_close(batched[b:b + 1], torch.cat(alone, dim=1), atol=ATOL, rtol=0)
        assert torch.isfinite(cache.k[0][b]).all()


@torch.inference_mode()
def test_cache_truncate_and_select_rows():
    config, ours, _ = build_pair(CONFIGS["gqa8-untied"])
    ids = random_ids(config, 3, 10, seed=3)
    full = ours(ids)
    cache = ours.new_kv_cache(3, 16)
    ours(ids[:, :6], cache=cache)
    ours(random_ids(config, 3, 2, seed=4), cache=cache)              # a branch we roll back
    cache.truncate(6)
    torch.testing.assert_close(ours(ids[:, 6:8], cache=cache), full[:, 6:8], atol=ATOL, rtol=0)
    cache.select_rows([2, 0])
    torch.testing.assert_close(ours(ids[[2, 0], 8:], cache=cache), full[[2, 0], 8:], atol=ATOL, rtol=0)
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="rows"):
        ours(ids[:1, :1], cache=cache)


@torch.inference_mode()
def test_greedy_generation_matches_hf_generate():
    config, ours, hf = build_pair(CONFIGS["gqa8-untied"], seed=0)
    prompt = random_ids(config, 1, 6, seed=6)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                      min_new_tokens=20, pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    cache = ours.new_kv_cache(1, 32)
    logits = ours(prompt, cache=cache, last_only=True)
    got = []
    for _ in range(20):
        token = logits[:, -1].argmax(-1, keepdim=True)
        got.append(int(token))
        logits = ours(token, cache=cache)
    assert got == ref
    assert len(set(got)) > 5, "degenerate weights: greedy decoding repeats itself"


def test_tinyllama_preset_parameter_count_on_meta_device():
    config = LlamaConfig.from_name("tinyllama-1.1b")
    with torch.device("meta"):
        model = Llama(config)
    assert model.num_parameters() == config.num_parameters() == 1_100_048_384
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (256, 2048)


@torch.inference_mode()
def test_row_parallel_decode_matches():
    """Splitting decode matmuls over threads (RowParallel) changes nothing but speed."""
    config, ours, hf = build_pair(CONFIGS["gqa4-tied"])
    ids = random_ids(config, 2, 12, seed=7)
    ref = hf(ids).logits
    threads_before = torch.get_num_threads()
    ours.use_row_parallel(2)
    ours.row_parallel.min_rows = 1                 # split even these tiny matrices
    try:
        cache = ours.new_kv_cache(2, 12)
        pieces = [ours(ids[:, :4], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(4, 12)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=ATOL, rtol=0)
        assert torch.get_num_threads() == threads_before
    finally:
        ours.use_row_parallel(None)
    assert all(block.mlp.row_parallel is None for block in ours.model.layers)


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)])
def test_grouped_decode_attention_equals_sdpa(heads, kv_heads):
    """The single-query path bf16 decode takes on a CPU (two matmuls per K/V head group) computes SDPA's
    attention: checked in fp32, where both are exact, with a padding mask and without one."""
    import torch.nn.functional as F

    from modules.llm.model import attend, grouped_decode_attend
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, 1, 16, generator=g)
    k, v = torch.randn(3, kv_heads, 20, 16, generator=g), torch.randn(3, kv_heads, 20, 16, generator=g)
    mask = torch.rand(3, 1, 1, 20, generator=g) > 0.3
    mask[..., -1] = True                                     # every row sees its own slot
    for m in (mask, None):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(grouped_decode_attend(q, k, v, m), expected, atol=1e-6, rtol=1e-5)
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
    routed = attend(*bf16, mask, causal=False)
    assert torch.equal(routed, grouped_decode_attend(*bf16, mask))                     # bf16 decode routes here
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(routed.float(), masked, atol=2e-2, rtol=2e-2)           # to bf16 rounding
    # the paged cache hands (B, K, S, hd) views of head-major (K, B, S, hd) gathers: the same numbers
    for m in (mask, None):
        head_major = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in bf16[1:]]
        assert not head_major[0].is_contiguous()
        assert torch.equal(grouped_decode_attend(bf16[0], *head_major, m), grouped_decode_attend(*bf16, m))


def test_a_one_token_query_sees_exactly_the_keys_its_row_marks():
    """Decode passes of the paged engine put a row's new token in any slot (rows gathered left-aligned, whole
    blocks): the mask for one query per row is the key mask itself; a row marking nothing sees its last slot."""
    key_mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    mask = Llama._attention_mask(3, 1, 3, key_mask, torch.device("cpu"))
    assert mask.shape == (3, 1, 1, 4)
    assert mask[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False],
                                      [False, False, False, True]]
    longer = Llama._attention_mask(1, 2, 2, torch.tensor([[False, True, True, True]]), torch.device("cpu"))
    assert longer[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]   # causal, as before
