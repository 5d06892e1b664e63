"""The engine's logprob hooks (shared contract): generated-token logprobs, top-k, prompt logprobs (echo),
logit_bias, against a plain full forward pass of the same model."""
import pytest
import torch

from modules.llm.engine import GenerationRequest, generate
from modules.llm.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from modules.fixtures import llm as fixture
    from modules.llm.loader import load_llm
    folder = fixture.write(tmp_path_factory.mktemp("logprobs"))[0]
    return load_llm(folder, "cpu", torch.float32)


def full_logprobs(llm, ids):
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_generated_logprobs_match_a_full_forward_and_top1_is_the_same_float(llm):
    prompt = llm.tokenizer.encode("Once upon a time", add_bos=True)
    req = GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), logprobs=3)
    result = generate(llm, [req])[0]
    assert len(result.token_logprobs) == len(result.token_ids) == 6
    logp = full_logprobs(llm, prompt + result.token_ids)
    for i, (tok, lp, top) in enumerate(zip(result.token_ids, result.token_logprobs, result.top_logprobs)):
        assert len(top) == 3
        assert top[0][0] == tok and top[0][1] == lp  # greedy: the same float, not just close
        assert lp == pytest.approx(float(logp[len(prompt) - 1 + i, tok]), abs=1e-4)
    assert result.prompt_logprobs is None


def test_prompt_logprobs_in_a_padded_batch_and_across_prefill_chunks(llm, monkeypatch):
    import modules.llm.engine as engine
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 4)  # several chunks, the short row starting mid-chunk
    long = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog", add_bos=True)
    short = llm.tokenizer.encode("Hello there", add_bos=True)
    reqs = [GenerationRequest(long, SamplingParams(temperature=0, max_new_tokens=1), logprobs=1, prompt_logprobs=True),
            GenerationRequest(short, SamplingParams(temperature=0, max_new_tokens=1), logprobs=1,
                              prompt_logprobs=True),
            GenerationRequest(short, SamplingParams(temperature=0, max_new_tokens=1))]
    results = generate(llm, reqs)
    for ids, result in zip((long, short), results):
        logp = full_logprobs(llm, ids)
        assert len(result.prompt_logprobs) == len(ids) and result.prompt_logprobs[0] is None
        assert result.prompt_top_logprobs[0] is None
        for j in range(1, len(ids)):
            assert result.prompt_logprobs[j] == pytest.approx(float(logp[j - 1, ids[j]]), abs=1e-4)
            assert result.prompt_top_logprobs[j][0][0] == int(logp[j - 1].argmax())
    assert results[2].prompt_logprobs is None and results[2].token_logprobs is None


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(llm):
    prompt = llm.tokenizer.encode("Hello", add_bos=True)
    forced = 77
    req = GenerationRequest(prompt, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True,
                                                   logit_bias={forced: 100}), logprobs=0)
    result = generate(llm, [req])[0]
    assert result.token_ids == [forced] * 4
    logp = full_logprobs(llm, prompt)
    assert result.token_logprobs[0] == pytest.approx(float(logp[-1, forced]), abs=1e-4)  # before the bias


def test_logit_bias_validation():
    with pytest.raises(ValueError, match="between -100 and 100"):
        SamplingParams(logit_bias={3: 101}).validate()
    from modules.llm.sampling import RowState
    with pytest.raises(ValueError, match="outside the vocabulary"):
        RowState(SamplingParams(logit_bias={10**6: 1}), [1], 100)
