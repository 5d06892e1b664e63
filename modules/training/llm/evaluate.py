"""Scoring a language model the way lm-evaluation-harness does: log-likelihoods, perplexity, multiple choice.

Everything goes through one scorer, :func:`loglikelihoods`, which takes ``(context_ids, continuation_ids)``
requests and returns the summed log-probability of the continuation given the context, exactly as
lm-eval's ``HFLM._loglikelihood_tokens``: the input is ``(context + continuation)[-(L + 1):][:-1]`` (left-
truncated to the model's context ``L``) and the logits of its last ``len(continuation)`` positions score the
continuation. Requests are sorted longest first and batched with right padding; a causal model never lets
a real position see the padding after it, so batched and unbatched scores agree (to float rounding).

Conventions, each as in lm-eval (EleutherAI/lm-evaluation-harness, ``lm_eval/models/huggingface.py`` and
``lm_eval/utils.py``; see ``shared/reference/ecosystem.md`` §1.1):

* **Context / continuation split** (:func:`encode_pair`): trailing whitespace of the context moves to the
  front of the continuation, then ``whole = encode(context + continuation)`` and the continuation's tokens
  are ``whole[len(encode(context)):]``. Encoding the whole string once matters with SentencePiece: the
  dummy-prefix space is added only at the start of the text, and " Paris" inside a sentence is the single
  piece "▁Paris", which encoding " Paris" on its own would not give ("▁" + "▁Paris").
* **Multiple choice** (:func:`multiple_choice`): each choice is scored as the continuation
  ``target_delimiter + choice`` (default delimiter " "); ``acc`` takes the argmax log-likelihood,
  ``acc_norm`` the argmax of log-likelihood divided by the choice's length in UTF-8 bytes (the issue's
  definition; lm-eval divides by ``len(choice)`` in characters, the same number for ASCII text).
* **BOS**: with ``add_bos=True`` (the default, lm-eval's ``add_bos_token=True``, which is how a Llama
  tokenizer encodes by default) the context starts with ``<s>``; ``add_bos=False`` is lm-eval's default for
  HF models. An empty context is always ``[<s>]``, as lm-eval's ``prefix_token_id``.
* **Perplexity** (:func:`perplexity`): lm-eval's ``loglikelihood_rolling``: the text is encoded without
  BOS and split by :func:`rolling_windows` into windows of at most ``seq_len`` tokens that predict every
  token exactly once, the first one from ``<s>``. With ``context_len=1`` (lm-eval's setting) the windows are
  disjoint and each is conditioned only on the one token before it; a larger ``context_len`` gives strided
  windows that re-read ``context_len`` tokens of the previous window, so every token but the first
  ``seq_len`` has that much context (lower, fairer perplexity, more compute). Reported: token-level
  perplexity ``exp(sum NLL / tokens)``, bits per byte ``sum NLL / (bytes * ln 2)``, byte and word
  perplexity (lm-eval's ``weighted_perplexity`` aggregates over documents).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from modules.llm.model import Llama
from modules.llm.tokenizer import Tokenizer

#: Upper bound on the float32 logits one forward pass may produce (B * T * V); 2**26 floats = 256 MiB.
MAX_LOGITS_PER_BATCH = 2 ** 26


class EvalError(ValueError):
    """Bad evaluation input (a file, an item, a setting); the message says what is wrong and what to do."""


@dataclass
class MCItem:
    """One multiple-choice question: the context, the choices, the index of the right one."""
    context: str
    choices: list[str]
    gold: int
    #: where the item came from ("file.jsonl:12"), for messages and per-item results
    source: str = ""


# ------------------------------------------------------------------------------------ tokenization
def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, *,
                add_bos: bool = True) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval's ``_encode_pair`` (see the module docstring)."""
    if context == "":
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    context_ids = tokenizer.encode(context, add_bos=add_bos)
    return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` requests that score every token of ``tokens`` exactly once.

    lm-eval's ``get_rolling_token_windows`` followed by ``make_disjoint_window``: the first window predicts
    up to ``max_len`` tokens from ``[prefix_token]``; each next one predicts ``max_len - context_len + 1``
    new tokens, its input being the ``max_len`` tokens that end just before its last prediction.
    """
    if not 1 <= context_len <= max_len:
        raise EvalError(f"context_len must be between 1 and the window size {max_len}, got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        window_input = tokens[max(end - max_len - 1, 0):end - 1]
        # make_disjoint_window: the part of the input that is not itself predicted is the context
        windows.append((window_input[:len(window_input) - (n - 1)], tokens[end - n:end]))
        predicted = end
    return windows


# ------------------------------------------------------------------------------------------ scoring
@torch.inference_mode()
def loglikelihoods(model: Llama, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   max_len: int | None = None, batch_size: int = 16) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), is_greedy)`` per request, in the order given.

    is_greedy: every continuation token is the argmax at its position (lm-eval's second result).
    max_len: the model's context to use (default ``max_position_embeddings``); longer inputs keep their
    last ``max_len`` tokens, as lm-eval does.
    """
    max_len = _check_max_len(model, max_len)
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    inputs = []
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise EvalError(f"request {index}: the continuation has no tokens; there is nothing to score")
        if len(continuation) > max_len:
            raise EvalError(f"request {index}: the continuation has {len(continuation)} tokens, more than the "
                            f"model's context of {max_len}; shorten it or evaluate with a longer context")
        if not context:
            raise EvalError(f"request {index}: the context has no tokens; start it with <s> (BOS)")
        whole = (list(context) + list(continuation))[-(max_len + 1):][:-1]
        inputs.append((index, whole, list(continuation)))
    inputs.sort(key=lambda r: -len(r[1]))       # longest first: padding stays small, memory peaks early
    device = model.model.embed_tokens.weight.device     # lm_head may be an int8/int4 layer
    vocab = model.config.vocab_size
    results: list[tuple[float, bool] | None] = [None] * len(inputs)
    start = 0
    while start < len(inputs):
        longest = len(inputs[start][1])
        rows = max(1, min(batch_size, MAX_LOGITS_PER_BATCH // max(1, longest * vocab)))
        batch = inputs[start:start + rows]
        ids = torch.zeros((len(batch), longest), dtype=torch.long)   # right padding: never attended
        for row, (_, whole, _) in enumerate(batch):
            ids[row, :len(whole)] = torch.tensor(whole)
        logits = model(ids.to(device))                                # (B, T, V) float32
        for row, (index, whole, continuation) in enumerate(batch):
            end = len(whole)
            scores = torch.log_softmax(logits[row, end - len(continuation):end].double(), dim=-1)  # (C, V)
            target = torch.tensor(continuation, device=scores.device)
            token_lls = scores.gather(1, target[:, None])[:, 0]
            greedy = bool((scores.argmax(dim=-1) == target).all())
            results[index] = (float(token_lls.sum()), greedy)
        start += len(batch)
    return results  # type: ignore[return-value]


def _check_max_len(model: Llama, max_len: int | None) -> int:
    limit = model.config.max_position_embeddings
    if max_len is None:
        return limit
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= limit:
        raise EvalError(f"seq_len must be an integer between 1 and the model's context of {limit}, "
                        f"got {max_len!r}")
    return max_len


# --------------------------------------------------------------------------------------- perplexity
def perplexity(model: Llama, tokenizer: Tokenizer, text: str | Sequence[str], seq_len: int | None = None, *,
               context_len: int = 1, batch_size: int = 8) -> dict:
    """Perplexity of held-out text (one string, or a list of documents scored separately).

    seq_len: window size in tokens (default the model's context). context_len: see :func:`rolling_windows`.
    Returns ppl, nll (mean per token, nats), tokens, bytes, words, bits_per_byte, byte_perplexity,
    word_perplexity, documents, windows, seq_len and context_len.
    """
    seq_len = _check_max_len(model, seq_len)
    documents = [text] if isinstance(text, str) else list(text)
    requests, tokens, n_bytes, words, scored_docs = [], 0, 0, 0, 0
    for document in documents:
        ids = tokenizer.encode(document, add_bos=False)
        if not ids:
            continue
        # every document's windows go into one request list, so short documents share batches
        requests += rolling_windows(ids, tokenizer.bos_id, seq_len, context_len)
        tokens += len(ids)
        n_bytes += len(document.encode("utf-8"))
        words += len(re.split(r"\s+", document))       # lm-eval's word count for word_perplexity
        scored_docs += 1
    if not tokens:
        raise EvalError("the text to score is empty; give held-out text with at least one token")
    total_nll = -sum(ll for ll, _ in loglikelihoods(model, requests, max_len=seq_len, batch_size=batch_size))
    return {
        "ppl": math.exp(total_nll / tokens), "nll": total_nll / tokens, "tokens": tokens, "bytes": n_bytes,
        "words": words, "bits_per_byte": total_nll / (n_bytes * math.log(2)),
        "byte_perplexity": math.exp(total_nll / n_bytes), "word_perplexity": math.exp(total_nll / words),
        "documents": scored_docs, "windows": len(requests), "seq_len": seq_len, "context_len": context_len,
    }


# ---------------------------------------------------------------------------------- multiple choice
def multiple_choice(model: Llama, tokenizer: Tokenizer, items: Iterable[MCItem | dict], *,
                    add_bos: bool = True, target_delimiter: str = " ", seq_len: int | None = None,
                    batch_size: int = 16) -> dict:
    """Zero-shot multiple choice: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "items", "per_item"}.

    Every choice of every item is one request (all batched together). per_item holds, per item, its
    source, gold, the per-choice ``loglikelihoods``, ``is_greedy`` and ``choice_bytes``, the predictions
    ``pred`` / ``pred_norm`` and whether they were right (``acc`` / ``acc_norm``, 0.0 or 1.0).
    """
    items = [_as_item(item, i) for i, item in enumerate(items)]
    if not items:
        raise EvalError("no multiple-choice items to evaluate")
    requests, owners = [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, target_delimiter + choice, add_bos=add_bos))
            owners.append(i)
    scores = loglikelihoods(model, requests, max_len=seq_len, batch_size=batch_size)
    per_item = []
    cursor = 0
    for item in items:
        item_scores = scores[cursor:cursor + len(item.choices)]
        cursor += len(item.choices)
        lls = [ll for ll, _ in item_scores]
        lengths = [max(1, len(choice.encode("utf-8"))) for choice in item.choices]
        pred = max(range(len(lls)), key=lambda k: lls[k])
        pred_norm = max(range(len(lls)), key=lambda k: lls[k] / lengths[k])
        per_item.append({
            "source": item.source, "gold": item.gold, "loglikelihoods": lls,
            "is_greedy": [greedy for _, greedy in item_scores], "choice_bytes": lengths,
            "pred": pred, "pred_norm": pred_norm,
            "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
        })
    acc = [p["acc"] for p in per_item]
    acc_norm = [p["acc_norm"] for p in per_item]
    return {"acc": _mean(acc), "acc_norm": _mean(acc_norm), "acc_stderr": _stderr(acc),
            "acc_norm_stderr": _stderr(acc_norm), "items": len(items), "per_item": per_item}


def _as_item(item: MCItem | dict, index: int) -> MCItem:
    if isinstance(item, MCItem):
        mc = item
    elif isinstance(item, dict):
        try:
            mc = MCItem(context=item["context"], choices=list(item["choices"]), gold=item["gold"],
                        source=str(item.get("source", "")))
        except (KeyError, TypeError) as exc:
            raise EvalError(f"item {index}: needs 'context', 'choices' and 'gold' ({exc})") from None
    else:
        raise EvalError(f"item {index}: expected an MCItem or a dict, got {type(item).__name__}")
    problems = item_problems(mc.context, mc.choices, mc.gold)
    if problems:
        raise EvalError(f"item {mc.source or index}: " + "; ".join(problems))
    return mc


def item_problems(context, choices, gold) -> list[str]:
    """What is wrong with one item's fields (empty when it is valid); shared with the JSONL reader."""
    problems = []
    if not isinstance(context, str):
        problems.append(f"'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        problems.append("'choices' must be a list of at least two strings")
    elif not all(isinstance(c, str) and c.strip() for c in choices):
        problems.append("every choice must be a non-empty string")
    if not isinstance(gold, int) or isinstance(gold, bool):
        problems.append(f"'gold' must be the integer index of the right choice, got {gold!r}")
    elif isinstance(choices, list) and len(choices) >= 2 and not 0 <= gold < len(choices):
        problems.append(f"'gold' is {gold} but there are {len(choices)} choices (valid: 0 to {len(choices) - 1})")
    return problems


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean with the sample variance, as lm-eval's ``mean_stderr``; None for one item."""
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
