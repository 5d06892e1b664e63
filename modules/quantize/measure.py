"""What a quantized model costs and keeps: perplexity, greedy agreement, decode and prefill speed.

One definition of each figure for every format, so the rows of a report compare:

* **perplexity**: of the assistant's answers given their prompts, over the held-out chats of
  :mod:`modules.quantize.heldout_text` (why answers and not whole chats: that module's docstring), with the
  same inputs on every backend: Atelier's forward pass, or llama.cpp through a context that keeps every
  position's logits (:class:`LlamaCppLogits`, as llama.cpp's own ``llama-perplexity`` tool does);
* **greedy agreement**: over a fixed prompt set, the share of the reference's greedy tokens that the
  quantized model reproduces before its first divergence (1.0 = identical continuations), and the share of
  prompts whose continuations are identical;
* **speed**: the same greedy runs through the backend's engine path (:func:`modules.llm.engine.generate`
  or :func:`modules.llm.llamacpp_backend.generate_llamacpp`), decode tokens/s excluding the prefill, and
  prefill tokens/s of the prompts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

#: prompts for greedy agreement and decode speed: chat turns the demo model was tuned for, and plain text
AGREEMENT_PROMPTS = (
    "Draw a small red circle at the top left on a white background.",
    "What is 17 plus 25?",
    "Write the word atelier in capital letters.",
    "How do I start Atelier?",
    "Please paint two blue squares in the middle.",
    "What does the Chat tab do?",
    "Reverse the letters of the word model.",
    "Tell me a short story about a lighthouse.",
)


def chat_prompt_ids(files: Any, text: str) -> list[int]:
    """A one-turn chat prompt for *text* with the model's template, as the Chat tab builds it."""
    from modules.llm.chat_template import prompt_ids
    rendered = files.template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return prompt_ids(files.tokenizer, files.template, rendered)


# --------------------------------------------------------------------------------------------- perplexity
class LlamaCppLogits:
    """Every position's logits of a window from llama.cpp (a context of its own, cleared per window)."""

    def __init__(self, path: str, n_ctx: int, threads: int, extra_buffers: bool = False):
        from modules.llm.llamacpp_runtime import LlamaCppContext, LlamaCppModel
        self.weights = LlamaCppModel(path, extra_buffers=extra_buffers)
        self.context = LlamaCppContext(self.weights, n_ctx=n_ctx, threads=threads)

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        self.context.clear()
        return torch.from_numpy(self.context.eval(list(ids), all_logits=True))

    def close(self) -> None:
        self.context.close()
        self.weights.close()


def answer_requests(files: Any, per_family: int = 40, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the held-out chats (:mod:`modules.quantize.heldout_text`) for this model's
    tokenizer and template."""
    from modules.quantize.heldout_text import answer_requests as requests_for, heldout_chats
    return requests_for(files.tokenizer, files.template, heldout_chats(per_family, seed))


def answer_perplexity(logits_of: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      seq_len: int) -> dict:
    """{"ppl", "nll", "tokens", "greedy"} of the answers given their prompts, with *logits_of(ids) -> [T, V]*
    from any backend: the input is ``(prompt + answer)[-(seq_len + 1):][:-1]`` and its last ``len(answer)``
    positions score the answer (lm-eval's log-likelihood convention); ``greedy`` is the share of answers that
    are the argmax at every token."""
    nll, tokens, greedy = 0.0, 0, 0
    for context, answer in requests:
        whole = (list(context) + list(answer))[-(seq_len + 1):]
        logits = logits_of(whole[:-1]).float()[-len(answer):]
        target = torch.tensor(list(answer), dtype=torch.long)
        nll -= float(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
        greedy += int(bool((logits.argmax(dim=-1) == target).all()))
        tokens += len(answer)
    if not tokens:
        raise ValueError("there are no answers to score")
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "greedy": greedy / len(requests)}


# ------------------------------------------------------------------------------------- greedy and speed
@dataclass
class GreedyRun:
    """Greedy continuations of the prompt set and how fast they came."""
    tokens: list[list[int]]
    decode_tokens: int
    decode_seconds: float
    prefill_tokens: int
    prefill_seconds: float

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def greedy_run(llm: Any, prompts: Sequence[list[int]], max_new_tokens: int = 32) -> GreedyRun:
    """Greedy replies, ending at EOS or *max_new_tokens*, on *llm*'s own backend (what Chat would answer
    at temperature 0; past EOS a chat model's tokens mean nothing, so they are not compared)."""
    from modules.llm.engine import GenerationRequest, _NullSink, generate
    from modules.llm.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    out, decode_tokens, decode_seconds, prefill_tokens, prefill_seconds = [], 0, 0.0, 0, 0.0
    for ids in prompts:
        request = GenerationRequest(list(ids), params, label="quantize report")
        started = time.perf_counter()
        if getattr(llm, "backend", "atelier") == "llama.cpp":
            from modules.llm.llamacpp_backend import generate_llamacpp
            llm.reset()   # no prefix reuse between prompts: every prefill is timed whole
            result = generate_llamacpp(llm, request, _NullSink())
        else:
            result = generate(llm, [request], max_batch=1)[0]
        total = time.perf_counter() - started
        out.append(result.token_ids)
        prefill_tokens += result.prompt_tokens
        prefill_seconds += result.prefill_seconds
        decode_tokens += max(0, result.completion_tokens - 1)      # the first token comes from the prefill
        decode_seconds += max(0.0, total - result.prefill_seconds)
    return GreedyRun(out, decode_tokens, decode_seconds, prefill_tokens, prefill_seconds)


def agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict:
    """``tokens``: mean share of each reference continuation reproduced before the first divergence;
    ``identical``: share of prompts whose continuations are identical."""
    shares, same = [], 0
    for ref, got in zip(reference, candidate):
        n = 0
        while n < min(len(ref), len(got)) and ref[n] == got[n]:
            n += 1
        shares.append(n / len(ref) if ref else 1.0)
        same += int(list(ref) == list(got))
    count = max(1, len(shares))
    return {"tokens": sum(shares) / count, "identical": same / count}
