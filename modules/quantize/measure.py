"""What a quantized model costs and keeps: perplexity, greedy agreement, decode and prefill speed.

One definition of each figure for every format, so the rows of a report compare:

* **perplexity**: lm-eval's rolling windows (:func:`modules.training.llm.evaluate.rolling_windows`, disjoint
  windows of the model's context, the first predicted from BOS), ``exp(total NLL / tokens)``. Atelier's own
  models are scored with :func:`modules.training.llm.evaluate.perplexity`; a GGUF is scored by llama.cpp on
  exactly the same windows (:class:`LlamaCppLogits`, a context that keeps every position's logits, as
  llama.cpp's own ``llama-perplexity`` tool does);
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


def heldout_documents(template: Any, count: int = 120, seed: int = 0) -> list[str]:
    """Held-out chats rendered with *template*: the synthetic families of ``make-sft-data`` phrased only with
    its held-out templates (made by code, so no download, and never in the demo model's training data)."""
    import random

    from modules.training.llm.drawing_requests import drawing_items
    from modules.training.llm.small_tasks import arithmetic_items, formatting_items
    rng = random.Random(seed)
    per = max(1, count // 3)
    items = (drawing_items(per, rng, held_out=True) + arithmetic_items(per, rng, held_out=True)
             + formatting_items(per, rng, held_out=True))
    return [template.render(item["messages"], add_generation_prompt=False) for item in items[:count]]


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


def window_perplexity(logits_of: Any, tokenizer: Any, documents: Sequence[str], seq_len: int) -> dict:
    """Perplexity over lm-eval's rolling windows with *logits_of(ids) -> [T, V]* (any backend)."""
    from modules.training.llm.evaluate import rolling_windows
    nll, tokens = 0.0, 0
    for document in documents:
        ids = tokenizer.encode(document, add_bos=False)
        for context, continuation in rolling_windows(ids, tokenizer.bos_id, seq_len):
            whole = (list(context) + list(continuation))[-(seq_len + 1):]
            logits = logits_of(whole[:-1]).float()
            scored = torch.log_softmax(logits[-len(continuation):], dim=-1)
            target = torch.tensor(continuation, dtype=torch.long)
            nll -= float(scored.gather(1, target[:, None]).sum())
            tokens += len(continuation)
    if not tokens:
        raise ValueError("the held-out text is empty")
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens}


def atelier_perplexity(llm: Any, documents: Sequence[str], seq_len: int | None = None) -> dict:
    """Perplexity of a loaded Atelier model (batched, :func:`modules.training.llm.evaluate.perplexity`)."""
    from modules.training.llm.evaluate import perplexity
    return perplexity(llm.model, llm.tokenizer, list(documents), seq_len=seq_len or llm.config.max_position_embeddings)


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
    """Greedy replies (EOS ignored, so every prompt yields *max_new_tokens*) on *llm*'s own backend."""
    from modules.llm.engine import GenerationRequest, _NullSink, generate
    from modules.llm.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True,
                            repetition_penalty=1.0)
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
