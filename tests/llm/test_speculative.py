"""Speculative decoding on tiny fixture models: greedy equality with the plain engine, the exact output
distribution of sampled decoding, KV rollback, adaptive k and the tokenizer check."""
import pytest
import torch

from modules.llm.engine import GenerationRequest, generate
from modules.llm.sampling import RowState, SamplingParams, process_logits
from modules.llm.speculative import (AdaptiveK, DraftIncompatible, _Model, check_draft_compatible,
                                     generate_speculative)

TARGET = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False)
DRAFT = dict(TARGET, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)

PROMPTS = ["Hello! How are you today?", "The quick brown fox", "Once upon a time there was a little robot who"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, draft, a draft with another tokenizer): real folders, loaded in fp32."""
    from modules.fixtures.llm import write_model
    from modules.llm.loader import load_llm
    root = tmp_path_factory.mktemp("spec")
    target = load_llm(write_model(root / "target", TARGET, seed=0), "cpu", torch.float32)
    draft = load_llm(write_model(root / "draft", DRAFT, seed=1), "cpu", torch.float32)
    other = load_llm(write_model(root / "other", dict(DRAFT, vocab_size=600), seed=2), "cpu", torch.float32)
    return target, draft, other


class Sink:
    def __init__(self):
        self.items = []
        self.interrupted = False

    def emit(self, item):
        self.items.append(item)


def request(llm, text, **params):
    return GenerationRequest(llm.tokenizer.encode(text, add_bos=True), SamplingParams(**params))


def plain(llm, req):
    sink = Sink()
    return generate(llm, [req], [sink])[0], sink


def spec(target, draft, req, **kw):
    sink = Sink()
    return generate_speculative(target, draft, req, sink, **kw), sink


@pytest.mark.parametrize("max_k", [1, 3, 8])
def test_greedy_equals_plain_greedy(models, max_k):
    target, draft, _ = models
    for text in PROMPTS:
        want, want_sink = plain(target, request(target, text, temperature=0, max_new_tokens=40))
        got, got_sink = spec(target, draft, request(target, text, temperature=0, max_new_tokens=40), max_k=max_k)
        assert got.token_ids == want.token_ids, (text, max_k)
        assert got.text == want.text and got.finish_reason == want.finish_reason
        assert [(d.text, d.token_id, d.index) for d in got_sink.items] == \
               [(d.text, d.token_id, d.index) for d in want_sink.items]
        assert got.draft_tokens > 0 and 0 <= got.accepted_tokens <= got.draft_tokens


def test_greedy_with_penalties_equals_plain(models):
    target, draft, _ = models
    params = dict(temperature=0, max_new_tokens=30, repetition_penalty=1.3, frequency_penalty=0.5)
    for text in PROMPTS:
        want, _ = plain(target, request(target, text, **params))
        got, _ = spec(target, draft, request(target, text, **params), max_k=4)
        assert got.token_ids == want.token_ids


def test_stop_string_and_eos_inside_an_accepted_run(models):
    """With the target as its own draft every draft is accepted, so stops land inside accepted runs."""
    target, _, _ = models
    text = PROMPTS[0]
    free, _ = plain(target, request(target, text, temperature=0, max_new_tokens=30))
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert stop.strip()
    want, want_sink = plain(target, request(target, text, temperature=0, max_new_tokens=30, stop=[stop]))
    got, got_sink = spec(target, target, request(target, text, temperature=0, max_new_tokens=30, stop=[stop]))
    assert want.finish_reason == "stop" and want.stop_string == stop
    assert (got.text, got.token_ids, got.stop_string) == (want.text, want.token_ids, want.stop_string)
    assert [d.text for d in got_sink.items] == [d.text for d in want_sink.items]
    # EOS: make the target end after its 5th token by treating that token as EOS
    eos_token = free.token_ids[4]
    target.config.eos_token_id = [2, eos_token]
    try:
        want, _ = plain(target, request(target, text, temperature=0, max_new_tokens=30))
        got, _ = spec(target, target, request(target, text, temperature=0, max_new_tokens=30), max_k=8)
    finally:
        target.config.eos_token_id = 2
    assert want.finish_reason == "stop" and want.token_ids[-1] == eos_token
    assert (got.token_ids, got.finish_reason, got.text) == (want.token_ids, want.finish_reason, want.text)


def test_max_tokens_and_context_are_respected(models):
    target, draft, _ = models
    for n in (1, 2, 7):
        got, _ = spec(target, target, request(target, PROMPTS[1], temperature=0, max_new_tokens=n, ignore_eos=True))
        assert got.completion_tokens == n and got.finish_reason == "length"
    ids = target.tokenizer.encode(PROMPTS[1], add_bos=True)
    long = GenerationRequest(ids * (250 // len(ids)), SamplingParams(temperature=0, max_new_tokens=100,
                                                                     ignore_eos=True))
    got = generate_speculative(target, draft, long, max_k=8)
    assert len(long.prompt_ids) + got.completion_tokens == 256 and got.finish_reason == "length"


def test_draft_equal_to_target_accepts_everything(models):
    target, _, _ = models
    got, _ = spec(target, target, request(target, PROMPTS[2], temperature=0, max_new_tokens=40, ignore_eos=True))
    assert got.draft_tokens > 0 and got.accepted_tokens == got.draft_tokens and got.acceptance_rate == 1.0
    sampled, _ = spec(target, target, request(target, PROMPTS[2], temperature=1.0, seed=3, max_new_tokens=40,
                                              ignore_eos=True))
    assert sampled.acceptance_rate > 0.97   # p == q: accepted unless rounding makes p(x) a hair below q(x)
    # k grows to the maximum when everything is accepted: 40 tokens in far fewer target passes
    assert got.target_passes <= 1 + 40 // 5


def test_kv_rollback_leaves_the_cache_as_a_fresh_prefill(models):
    target, _, _ = models
    ids = target.tokenizer.encode(PROMPTS[2], add_bos=True)
    keep, rejected, rest = ids[:6], [7, 8, 9, 10], ids[6:]
    rolled = _Model(target, 64)
    rolled.feed(keep, last_only=True)
    rolled.feed(rejected, last_only=False)        # a verify pass whose drafts are rejected
    rolled.truncate(len(keep))
    after = rolled.feed(rest, last_only=False)
    fresh = _Model(target, 64)
    want = fresh.feed(ids, last_only=False)[len(keep):]
    assert rolled.length == fresh.length == len(ids)
    for a, b in zip(rolled.cache.k + rolled.cache.v, fresh.cache.k + fresh.cache.v):
        torch.testing.assert_close(a[:, :, :len(ids)], b[:, :, :len(ids)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, want, atol=1e-4, rtol=1e-4)


def test_adaptive_k():
    k = AdaptiveK(4, start=2)
    k.update(2, 2)
    assert k.k == 3
    k.update(3, 3), k.update(4, 4), k.update(4, 4)
    assert k.k == 4
    for _ in range(6):
        k.update(4, 1)
    assert k.k == 1
    with pytest.raises(ValueError, match="max_k"):
        AdaptiveK(0)


def test_adaptive_k_pauses_drafting_while_even_one_draft_is_rejected():
    k = AdaptiveK(4, start=1)
    pauses = []
    for _ in range(4):                 # k = 1 and rejected: pause 1, 2, 4, 8 plain steps
        k.update(1, 0)
        pauses.append(k.pause)
        while k.pause:
            k.update(0, 0)
    assert pauses == [1, 2, 4, 8] and k.k == 1
    k.update(1, 1)                     # accepted: k grows, the back-off starts over
    assert k.k == 2 and k.pause == 0
    k.update(2, 0), k.update(1, 0)
    assert k.pause == 1


def test_a_useless_draft_costs_few_draft_steps(models):
    """A draft that is never right stops being asked: far fewer drafted tokens than generated ones, and the
    reply is still the target's greedy one."""
    target, draft, _ = models
    req = request(target, PROMPTS[2], temperature=0, max_new_tokens=80, ignore_eos=True)
    want, _ = plain(target, req)
    got, _ = spec(target, draft, request(target, PROMPTS[2], temperature=0, max_new_tokens=80, ignore_eos=True),
                  max_k=4)
    assert got.token_ids == want.token_ids
    assert got.accepted_tokens <= 2 and got.draft_tokens < 30


def test_tokenizer_mismatch_is_refused(models):
    target, draft, other = models
    check_draft_compatible(target, draft)
    with pytest.raises(DraftIncompatible, match="vocabulary has 600 tokens, the target's 512"):
        generate_speculative(target, other, request(target, "Hi", temperature=0), target_name="t", draft_name="o")

    class Swapped:   # the same size, two pieces swapped
        def __init__(self, tok):
            self.tok, self.vocab_size, self.bos_id, self.eos_id = tok, tok.vocab_size, tok.bos_id, tok.eos_id

        def id_to_token(self, i):
            return self.tok.id_to_token({300: 301, 301: 300}.get(i, i))

    fake = type("Files", (), {"config": draft.config, "tokenizer": Swapped(draft.tokenizer)})()
    with pytest.raises(DraftIncompatible, match="token 300 is"):
        check_draft_compatible(target, fake, draft_name="swapped")


# -- the output distribution ------------------------------------------------------------------------------

def _exact(llm, prompt, params, n):
    """Exact probability of every n-token continuation under *llm*'s processed distribution."""
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, prob in out.items():
            state = RowState(params, prompt, llm.config.vocab_size)
            for t in prefix:
                state.observe(t)
            with torch.no_grad():
                logits = llm.model(torch.tensor([prompt + list(prefix)]), last_only=True)[0, -1]
            p = torch.softmax(process_logits(logits[None].float(), [state])[0], dim=-1)
            for t in torch.nonzero(p > 0).flatten().tolist():
                nxt[prefix + (t,)] = prob * float(p[t])
        out = nxt
    return out


def _tv(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.5, "presence_penalty": 1.0}],
                         ids=["plain", "penalties"])
def test_sampled_distribution_equals_the_targets(models, extra):
    """Leviathan/Chen acceptance: over seeded runs, the first 3 tokens follow the target's exact distribution.

    top_k=3 keeps the outcome space small (at most 27 sequences) and makes p and q differ in support, so the
    residual resample matters. Always accepting would give the draft's distribution instead, which is far
    (> 3x the bound) from the target's: the bound below would catch it.
    """
    target, draft, _ = models
    prompt = target.tokenizer.encode("The cat", add_bos=True)
    params = SamplingParams(temperature=1.5, top_k=3, max_new_tokens=3, ignore_eos=True, **extra)
    p = _exact(target, prompt, params, 3)
    q = _exact(draft, prompt, params, 3)
    n = 1500
    counts = {}
    for seed in range(n):
        req = GenerationRequest(prompt, SamplingParams(**{**params.__dict__, "seed": seed}))
        got = generate_speculative(target, draft, req, max_k=3, adaptive=False)
        key = tuple(got.token_ids)
        counts[key] = counts.get(key, 0) + 1
    empirical = {k: v / n for k, v in counts.items()}
    bound = 0.07   # E[TV] for 27 outcomes at n=1500 is about 0.03; fixed seeds make the test deterministic
    assert _tv(empirical, p) < bound, (_tv(empirical, p), _tv(q, p))
    assert _tv(q, p) > 3 * bound
    assert set(empirical) <= set(p)   # never a token the target's top-k excludes
