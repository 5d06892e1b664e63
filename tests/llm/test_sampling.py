"""Sampling: each processor equals transformers' on random logits; per-row parameters; seeded sampling."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from modules.llm import sampling
from modules.llm.sampling import RowState, SamplingParams, process_logits, sample_next

V = 50


def _logits(rows=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=gen) * 3


def _same(a, b):
    """Equal, with -inf in the same places."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = ~torch.isinf(a)
    torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-6)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    scores = _logits()
    history = torch.tensor([[1, 5, 5, 7], [0, 2, 49, 3], [9, 9, 9, 9]])
    seen = torch.zeros(3, V, dtype=torch.bool).scatter(1, history, True)
    ours = sampling.apply_repetition_penalty(scores, seen, torch.full((3,), penalty))
    _same(ours, RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone()))


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_transformers(temperature):
    scores = _logits()
    _same(sampling.apply_temperature(scores, torch.full((3,), temperature)),
          TemperatureLogitsWarper(temperature)(None, scores.clone()))


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_matches_transformers(k):
    scores = _logits()
    scores[0, :10] = 1.0  # ties at the boundary
    _same(sampling.apply_top_k(scores, torch.full((3,), k)), TopKLogitsWarper(k)(None, scores.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    scores = _logits(seed=1)
    _same(sampling.apply_top_p(scores, torch.full((3,), p, dtype=torch.float64)),
          TopPLogitsWarper(p)(None, scores.clone()))


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9, 1.0])
def test_min_p_matches_transformers(p):
    scores = _logits(seed=2)
    _same(sampling.apply_min_p(scores, torch.full((3,), p)), MinPLogitsWarper(p)(None, scores.clone()))


def test_per_row_parameters_equal_row_by_row_transformers_chain():
    """Rows with different settings in one batch each get exactly transformers' chain for their own values."""
    scores = _logits(rows=3, seed=3)
    prompts = [[1, 2, 3], [4, 4], [10]]
    params = [SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
              SamplingParams(temperature=1.3, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=3)]
    rows = [RowState(p, ids, V) for p, ids in zip(params, prompts)]
    ours = process_logits(scores.clone(), rows)
    for i, (p, ids) in enumerate(zip(params, prompts)):
        ref = scores[i:i + 1].clone()
        if p.repetition_penalty != 1:
            ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([ids]), ref)
        if p.temperature != 1:
            ref = TemperatureLogitsWarper(p.temperature)(None, ref)
        if p.top_k:
            ref = TopKLogitsWarper(p.top_k)(None, ref)
        if p.top_p < 1:
            ref = TopPLogitsWarper(p.top_p)(None, ref)
        if p.min_p:
            ref = MinPLogitsWarper(p.min_p)(None, ref)
        _same(ours[i:i + 1], ref)


def test_presence_and_frequency_follow_openai_formula():
    scores = torch.zeros(1, V)
    row = RowState(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), [7, 8], V)
    for token in (3, 3, 4):
        row.observe(token)
    out = process_logits(scores, [row])[0]
    assert out[3].item() == pytest.approx(-(2 * 0.25 + 0.5))
    assert out[4].item() == pytest.approx(-(0.25 + 0.5))
    assert out[7].item() == 0.0  # prompt tokens are not "generated" for OpenAI's penalties
    assert out[0].item() == 0.0


def test_greedy_takes_argmax_of_penalised_logits():
    scores = torch.tensor([[5.0, 4.0, 1.0] + [0.0] * (V - 3)])
    row = RowState(SamplingParams(temperature=0, repetition_penalty=2.0), [0], V)
    assert row.generator is None
    assert sample_next(scores, [row]) == [1]  # 5/2 < 4


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    scores = _logits(rows=2, seed=4)
    def draws(params_list, n=20):
        rows = [RowState(p, [], V) for p in params_list]
        return [sample_next(scores[: len(rows)], rows) for _ in range(n)]
    a = draws([SamplingParams(temperature=1.0, seed=123), SamplingParams(temperature=1.0, seed=7)])
    b = draws([SamplingParams(temperature=1.0, seed=123), SamplingParams(temperature=0.5, top_k=3, seed=99)])
    assert [x[0] for x in a] == [x[0] for x in b]
    c = draws([SamplingParams(temperature=1.0, seed=124)])
    assert [x[0] for x in a] != [x[0] for x in c]


def test_sampling_follows_the_distribution():
    """With top_k=2 only the two best tokens appear, in roughly softmax proportion."""
    scores = torch.full((1, V), -5.0)
    scores[0, 10], scores[0, 20] = 1.0, 0.0  # p = 0.731 / 0.269 after top-2
    row = RowState(SamplingParams(temperature=1.0, top_k=2, seed=0), [], V)
    picks = [sample_next(scores, [row])[0] for _ in range(2000)]
    assert set(picks) == {10, 20}
    assert 0.69 < picks.count(10) / len(picks) < 0.77


def test_random_seed_is_drawn_and_reported():
    p = SamplingParams(temperature=1.0, seed=None).with_seed()
    assert isinstance(p.seed, int) and p.seed >= 0
    assert SamplingParams(seed=-1).with_seed().seed != -1
    assert SamplingParams(seed=5).with_seed().seed == 5


def test_validate_names_every_bad_field():
    bad = SamplingParams(temperature=-1, top_p=0, top_k=-2, min_p=1.5, max_new_tokens=0,
                         repetition_penalty=0, presence_penalty=3, stop=["", "x"], seed="abc")
    with pytest.raises(ValueError) as err:
        bad.validate()
    message = str(err.value)
    for name in ("temperature=-1", "top_p=0", "top_k=-2", "min_p=1.5", "max_new_tokens=0",
                 "repetition_penalty=0", "presence_penalty=3", "empty string", "seed='abc'"):
        assert name in message
    assert "(0, 1]" in message
    SamplingParams(temperature=0, top_p=1.0, max_new_tokens=1).validate()


def test_top_p_of_exactly_one_is_allowed_and_neutral():
    scores = _logits()
    _same(sampling.apply_top_p(scores, torch.ones(3, dtype=torch.float64)), scores)


def test_from_dict_rejects_unknown_keys_and_wraps_a_single_stop():
    assert SamplingParams.from_dict({"stop": "END", "top_k": None}).stop == ["END"]
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 1})
