"""Evaluation equals transformers' LlamaForCausalLM on the same weights, scored the way lm-eval scores.

The reference numbers come from transformers on the fixture folder (loaded by ``from_pretrained``) and,
for tokenization, from transformers' own Llama tokenizer on the same ``tokenizer.model``.
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modules.fixtures.llm import FIXTURE_MODELS, write_model  # noqa: E402
from modules.llm.loader import load_llm  # noqa: E402
from modules.training.llm.evaluate import (  # noqa: E402
    EvalError, MCItem, encode_pair, loglikelihoods, multiple_choice, perplexity, rolling_windows)

ATOL = 1e-4

ITEMS = [
    MCItem("The capital of France is", ["Paris", "London", "a small robot who wanted to paint the sky"], 0),
    MCItem("Water boils at 100 degrees", ["Celsius", "Fahrenheit"], 1),
    MCItem("Question: Why is the sky blue?\nAnswer:", ["Because air scatters blue light more than red light.",
                                                       "Cats sleep.", "Café, naïve, résumé"], 0),
    MCItem("Summer is warm, winter is ", ["cold", "golden", "green and autumn is golden"], 0),   # trailing space
    MCItem("", ["Hello! How are you today?", "Good night"], 0),                                 # empty context
]
HELD_OUT = ("Once upon a time there was a little robot who wanted to paint the sky. She opened the window, "
            "and the morning light filled the quiet room. Stars shine brightly on a clear night far away "
            "from the city lights; the baker makes fresh bread, cakes and cookies for the town. Größe! 12345")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("eval") / "tiny-llama-gqa", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture(scope="module")
def ours(folder):
    llm = load_llm(folder)
    return llm.model, llm.tokenizer


@pytest.fixture(scope="module")
def hf(folder):
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@torch.inference_mode()
def hf_continuation_ll(model, context_ids, continuation_ids):
    """Sum of log p(continuation | context) from transformers' logits for context + continuation."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(continuation_ids)
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + n)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, continuation_ids))


def lm_eval_pair(hf_tok, tok, context, continuation, add_bos):
    """lm-eval's ``_encode_pair`` run on transformers' tokenizer. An empty context is lm-eval's
    ``[prefix_token_id]`` + the continuation, taken from our tokenizer: transformers 5 drops SentencePiece's
    dummy prefix before a leading space, unlike SentencePiece itself (see modules/llm/tokenizer.py)."""
    if not context:
        return [tok.bos_id], tok.encode(continuation, add_bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = hf_tok(context + continuation, add_special_tokens=add_bos)["input_ids"]
    ctx = hf_tok(context, add_special_tokens=add_bos)["input_ids"]
    return ctx, whole[len(ctx):]


# ------------------------------------------------------------------------------------ tokenization
def test_pairs_split_like_lm_eval_with_the_dummy_prefix_only_at_the_text_start(ours, hf):
    _, tok = ours
    _, hf_tok = hf
    context, choice = "The capital of France is", "Paris"
    ctx, cont = encode_pair(tok, context, " " + choice)
    # context and the whole string are what transformers' tokenizer gives for them (BOS included)
    assert ctx == hf_tok(context)["input_ids"]
    assert ctx + cont == hf_tok(context + " " + choice)["input_ids"]
    assert ctx[0] == tok.bos_id and tok.bos_id not in cont
    # " Paris" inside the text is not " Paris" encoded alone (that would get a second, dummy-prefix space)
    assert cont != tok.encode(" Paris", add_bos=False)
    # a trailing space on the context moves to the continuation: same tokens as the delimiter form
    assert encode_pair(tok, context + " ", choice) == (ctx, cont)
    assert encode_pair(tok, context, " " + choice, add_bos=False) == (ctx[1:], cont)
    # an empty context is <s> alone
    assert encode_pair(tok, "", " Hello")[0] == [tok.bos_id]


# ------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("add_bos", [True, False])
def test_per_choice_loglikelihoods_equal_transformers(ours, hf, batch_size, add_bos):
    model, tok = ours
    hf_model, hf_tok = hf
    result = multiple_choice(model, tok, ITEMS, add_bos=add_bos, batch_size=batch_size)
    assert result["items"] == len(ITEMS)
    for item, got in zip(ITEMS, result["per_item"]):
        pairs = [lm_eval_pair(hf_tok, tok, item.context, " " + c, add_bos) for c in item.choices]
        assert [encode_pair(tok, item.context, " " + c, add_bos=add_bos) for c in item.choices] == pairs
        expected = [hf_continuation_ll(hf_model, *pair) for pair in pairs]
        assert max(abs(e) for e in expected) > 1.0, "log-likelihoods too small to tell implementations apart"
        assert got["loglikelihoods"] == pytest.approx(expected, abs=ATOL, rel=0)
        # acc: argmax log-likelihood; acc_norm: argmax log-likelihood per UTF-8 byte of the choice
        lengths = [len(c.encode("utf-8")) for c in item.choices]
        assert got["choice_bytes"] == lengths
        assert got["pred"] == max(range(len(expected)), key=lambda k: expected[k])
        assert got["pred_norm"] == max(range(len(expected)), key=lambda k: expected[k] / lengths[k])
        assert got["acc"] == float(got["pred"] == item.gold)
        assert got["acc_norm"] == float(got["pred_norm"] == item.gold)
    assert result["acc"] == pytest.approx(sum(p["acc"] for p in result["per_item"]) / len(ITEMS))
    assert result["acc_norm"] == pytest.approx(sum(p["acc_norm"] for p in result["per_item"]) / len(ITEMS))


def test_batched_and_unbatched_scores_agree_and_greedy_is_reported(ours):
    model, tok = ours
    requests = [encode_pair(tok, item.context, " " + c) for item in ITEMS for c in item.choices]
    assert len({len(a) + len(b) for a, b in requests}) > 3, "requests of one length would not test padding"
    one = loglikelihoods(model, requests, batch_size=1)
    many = loglikelihoods(model, requests, batch_size=64)
    assert [ll for ll, _ in many] == pytest.approx([ll for ll, _ in one], abs=1e-5, rel=0)
    assert [g for _, g in many] == [g for _, g in one]
    # is_greedy is true exactly when the continuation is the model's own greedy choice
    context = tok.encode("The capital of France is")
    with torch.inference_mode():
        greedy_token = int(model(torch.tensor([context]))[0, -1].argmax())
    other = (greedy_token + 7) % model.config.vocab_size
    assert [g for _, g in loglikelihoods(model, [(context, [greedy_token]), (context, [other])])] == [True, False]


def test_long_inputs_are_left_truncated_to_the_context_as_lm_eval_does(ours, hf):
    model, tok = ours
    hf_model, _ = hf
    context = tok.encode(HELD_OUT * 3)
    continuation = tok.encode(" the sky", add_bos=False)
    (got, _), = loglikelihoods(model, [(context, continuation)], max_len=32)
    kept = (context + continuation)[-33:]
    assert got == pytest.approx(hf_continuation_ll(hf_model, kept[:-len(continuation)], continuation), abs=ATOL)
    with pytest.raises(EvalError, match="more than the model's context"):
        loglikelihoods(model, [(context[:2], context[:40])], max_len=32)


# ------------------------------------------------------------------------------------ perplexity
def test_rolling_windows_score_every_token_once_with_the_documented_context():
    tokens = list(range(100, 137))                      # 37 tokens, window 8
    for context_len in (1, 3, 8):
        windows = rolling_windows(tokens, prefix_token=1, max_len=8, context_len=context_len)
        predicted = [t for _, cont in windows for t in cont]
        assert predicted == tokens
        first_ctx, first_cont = windows[0]
        assert first_ctx == [1] and first_cont == tokens[:8]
        for ctx, cont in windows[1:]:
            start = tokens.index(cont[0])
            assert ctx == tokens[start - len(ctx):start], "the context is what precedes the predictions"
            assert len(ctx) + len(cont) == 9               # every later window is a full input of 8 tokens
            if cont[-1] != tokens[-1]:                     # all but the last predict seq_len - context_len + 1
                assert len(cont) == 8 - context_len + 1 and len(ctx) == context_len
    assert rolling_windows([], 1, 8) == []
    with pytest.raises(EvalError, match="context_len"):
        rolling_windows(tokens, 1, 8, context_len=9)


@torch.inference_mode()
def test_perplexity_equals_transformers_over_disjoint_and_strided_windows(ours, hf):
    model, tok = ours
    hf_model, _ = hf
    ids = tok.encode(HELD_OUT, add_bos=False)
    L = 16
    ids_2l = ids[:2 * L]
    text_2l = tok.decode(ids_2l)
    assert tok.encode(text_2l, add_bos=False) == ids_2l
    # lm-eval's disjoint windows over exactly two windows: [<s>] + t[:L-1] -> t[:L], then t[L-1:2L-1] -> t[L:2L]
    expected = -(hf_continuation_ll(hf_model, [tok.bos_id], ids_2l[:L])
                 + hf_continuation_ll(hf_model, [ids_2l[L - 1]], ids_2l[L:]))
    got = perplexity(model, tok, text_2l, seq_len=L)
    assert got["tokens"] == 2 * L and got["windows"] == 2
    assert got["nll"] * got["tokens"] == pytest.approx(expected, abs=ATOL)
    assert got["ppl"] == pytest.approx(math.exp(expected / (2 * L)), rel=1e-6)
    n_bytes = len(text_2l.encode("utf-8"))
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(expected / (n_bytes * math.log(2)), rel=1e-6)
    # context_len = L: every token after the first window is scored from exactly the L tokens before it
    strided = -hf_continuation_ll(hf_model, [tok.bos_id], ids[:L])
    for i in range(L, len(ids)):
        strided -= hf_continuation_ll(hf_model, ids[i - L:i], [ids[i]])
    got = perplexity(model, tok, HELD_OUT, seq_len=L, context_len=L)
    assert got["tokens"] == len(ids) and got["windows"] == 1 + len(ids) - L
    assert got["nll"] * got["tokens"] == pytest.approx(strided, abs=ATOL)
    # more context per token: the strided perplexity differs from the disjoint one on the same text
    assert perplexity(model, tok, HELD_OUT, seq_len=L)["ppl"] != pytest.approx(got["ppl"], rel=1e-3)


def test_documents_are_scored_separately_and_aggregated_by_tokens(ours):
    model, tok = ours
    docs = [HELD_OUT[:120], HELD_OUT[120:]]
    parts = [perplexity(model, tok, d, seq_len=32) for d in docs]
    both = perplexity(model, tok, docs, seq_len=32)
    assert both["documents"] == 2 and both["tokens"] == sum(p["tokens"] for p in parts)
    total_nll = sum(p["nll"] * p["tokens"] for p in parts)
    assert both["nll"] * both["tokens"] == pytest.approx(total_nll, rel=1e-9)
    assert both["word_perplexity"] == pytest.approx(math.exp(total_nll / sum(p["words"] for p in parts)))


def test_bad_scoring_input_is_a_clear_error(ours):
    model, tok = ours
    with pytest.raises(EvalError, match="empty"):
        perplexity(model, tok, ["", ""])
    with pytest.raises(EvalError, match="seq_len must be an integer between 1 and the model's context of 256"):
        perplexity(model, tok, HELD_OUT, seq_len=1000)
    with pytest.raises(EvalError, match="'gold' is 2 but there are 2 choices"):
        multiple_choice(model, tok, [{"context": "a", "choices": ["b", "c"], "gold": 2}])
    with pytest.raises(EvalError, match="at least two"):
        multiple_choice(model, tok, [MCItem("a", ["b"], 0)])
    with pytest.raises(EvalError, match="no multiple-choice items"):
        multiple_choice(model, tok, [])
