"""The generation engine: prompt token ids in, streamed text and a result out.

Two layers:

* :func:`generate` decodes a batch of requests on a loaded model: left-padded prefill (per-row RoPE
  positions, padding slots masked out with ``key_mask``), then one token per row per step. A row that
  finishes (EOS, stop string, max tokens, context full, interrupted) leaves through
  ``cache.select_rows``; between steps, waiting requests join (continuous batching on a contiguous
  cache: a newcomer is prefilled alone, then both caches are copied right-aligned into a fresh one).
  Each row streams its text deltas to a *sink* (anything with ``emit(item)`` and an ``interrupted``
  flag: a :class:`~modules.jobs.Job`).
* :class:`LLMEngine` puts requests on the shared job queue with ``submit_batchable`` under the key
  ``"llm:<model>"``, holds the model lease while a batch runs, pulls same-model arrivals in with
  ``take_waiting`` between decode steps, and finishes each job as soon as its row is done.

Design for the later paged-KV engine: callers only see ``LLMEngine.submit`` -> :class:`GenerationHandle`
(``events()``, ``result()``, ``interrupt()``) and the dataclasses below, so the batch loop can be replaced
without touching the service, the UI or the API. What paged KV would add: no copy when a row joins,
no padding slots, prefix sharing.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Protocol, Sequence

import torch

from modules.jobs import Job, JobInterrupted
from modules.llm.sampling import RowState, SamplingParams, sample_next

log = logging.getLogger(__name__)

#: the kind of the generation jobs on the shared queue
JOB_KIND = "llm"

#: prompts are prefilled in chunks of this many tokens, bounding attention memory for long prompts
PREFILL_CHUNK = 512


class PromptTooLong(ValueError):
    """The prompt does not fit the model's context (leaving room for at least one new token)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    #: what the caller calls the request (API id, chat id), for logs
    label: str = "generate"
    #: the reply continues text mid-sentence: keep the space SentencePiece's decode drops from a first
    #: "▁word" piece (a fresh reply starts without it, as transformers' decode gives)
    keep_leading_space: bool = False
    #: None: no log-probabilities; k >= 0: record each generated token's logprob and the k most likely
    #: alternatives (of the raw distribution: log_softmax of the model's fp32 logits, before any processor)
    logprobs: int | None = None
    #: also record each prompt token's logprob (given the tokens before it; the first has none): echo
    prompt_logprobs: bool = False
    #: speculative decoding (:mod:`modules.llm.speculative`): None = as the llm.draft_model setting says,
    #: True = required (an error when no usable draft is set), False = off
    speculative: bool | None = None


@dataclass
class TokenDelta:
    """One streamed step: the new text (may be empty while a stop string or a UTF-8 character is
    incomplete) and the token that produced it."""
    text: str
    token_id: int
    index: int  # 0-based index of the token in the completion
    #: the token's logprob and its top alternatives [(id, logprob)], when the request asked for logprobs
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    #: on a row's first delta only, when it asked for prompt logprobs (so a stream can echo them first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    #: "stop" (EOS or a stop string), "length" (max tokens or context full), "interrupted"
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int | None = None
    seconds: float = 0.0  # from the start of the batch to this row's last token
    prefill_seconds: float = 0.0
    stop_string: str | None = None  # the stop string that ended the reply, if one did
    #: per generated token (when the request's ``logprobs`` is set): its logprob and [(id, logprob)] top-k
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    #: per prompt token (when ``prompt_logprobs``): None for the first, then as above
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    #: speculative decoding only: tokens the draft proposed, how many the target accepted, and the target's
    #: forward passes (prefill included); all 0 for plain decoding
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0
    #: prompt tokens whose keys/values came from the paged engine's prefix cache instead of being computed
    cached_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens, None when nothing was drafted."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Sink(Protocol):
    """Where one row's streamed items go, and how it learns it was stopped (a Job fits)."""

    def emit(self, item: Any) -> None: ...

    @property
    def interrupted(self) -> bool: ...


class _NullSink:
    interrupted = False

    def emit(self, item: Any) -> None:
        pass


# -- helpers about the loaded model ---------------------------------------------------------------------------

def context_length(llm: Any) -> int:
    return int(llm.config.max_position_embeddings)


def eos_token_ids(llm: Any) -> set[int]:
    """Every id that ends a reply: the config's, the generation config's and the tokenizer's EOS."""
    ids: set[int] = set()
    gen = llm.generation_config or {}
    gen_eos = gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None)
    for value in (llm.config.eos_token_id, gen_eos, getattr(llm.tokenizer, "eos_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def check_prompt_fits(n_tokens: int, ctx_len: int, *, what: str = "the prompt",
                      fix: str = "shorten the prompt") -> None:
    """The one context-overflow check (engine, service and API): a prompt needs room for at least one
    new token. Raises PromptTooLong saying how long *what* is, the context, and *fix*."""
    if n_tokens >= ctx_len:
        raise PromptTooLong(f"{what} is {n_tokens} tokens but the model's context is {ctx_len} tokens, leaving no "
                            f"room for a reply; {fix} to under {ctx_len} tokens")


def check_request(request: GenerationRequest, ctx_len: int) -> None:
    """Raise ValueError (PromptTooLong for length) for a request that cannot run."""
    request.params.validate()
    n = len(request.prompt_ids)
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token (most prompts start with BOS)")
    check_prompt_fits(n, ctx_len)


# -- stop strings -----------------------------------------------------------------------------------------------

def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in *text*: (index, stop), or None."""
    best = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of *text* that could be the beginning of a stop string: that much must be
    held back until the next token shows whether the stop string completes."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


# -- log-probabilities ---------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Logprobs of *token_ids* [N] under *logits* [N, V] and each row's top *k*, from one fp32 log_softmax.

    Both come out of the same tensor, so a token that is its row's arg-max has exactly the float of its
    top-1 entry (lm-eval's greedy check compares them with ``==``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, token_ids.view(-1, 1).to(logp.device)).view(-1).tolist()
    if k <= 0:
        return chosen, [[] for _ in chosen]
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    tops = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return chosen, tops


# -- one row of a batch -----------------------------------------------------------------------------------------

class _Row:
    def __init__(self, llm: Any, request: GenerationRequest, sink: Sink, ctx_len: int, eos: set[int],
                 stream_decoder: Callable[[Any], Any]):
        self.request = request
        self.sink = sink
        self.prompt_len = len(request.prompt_ids)
        self.state = RowState(request.params, request.prompt_ids, llm.config.vocab_size,
                              device=llm.device)
        # the reply may not run past the context: positions are 0 .. ctx_len - 1
        self.max_new = min(request.params.max_new_tokens, ctx_len - self.prompt_len)
        self.eos = set() if request.params.ignore_eos else eos
        self.decoder = stream_decoder(llm.tokenizer)
        self.stops = list(request.params.stop)
        self.tokens: list[int] = []
        self.pending = ""  # decoded text not yet emitted (may start a stop string)
        self.text = ""  # emitted text
        self.finish_reason: str | None = None
        self.stop_string: str | None = None
        self.started = time.perf_counter()  # the row is made right before its prefill
        self.prefilled_at = self.started
        self.finished_at = self.started
        self.logprobs_k = request.logprobs
        self.token_logprobs: list[float] | None = [] if request.logprobs is not None else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if request.logprobs is not None else None
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
        self._prompt_seen = 0  # prompt positions whose logits take_prompt_logits has received
        self.cached_tokens = 0  # prompt tokens served from the paged engine's prefix cache

    @property
    def position(self) -> int:
        """RoPE position of the next token fed to the model (the last sampled one)."""
        return self.prompt_len + len(self.tokens) - 1

    def _emit(self, text: str, token_id: int) -> None:
        self.text += text
        logprob = top = None
        if self.token_logprobs and token_id >= 0:
            logprob, top = self.token_logprobs[-1], self.top_logprobs[-1]
        first = len(self.tokens) == 1
        self.sink.emit(TokenDelta(text, token_id, len(self.tokens) - 1, logprob, top,
                                  self.prompt_logprobs if first else None,
                                  self.prompt_top_logprobs if first else None))

    @property
    def wants_prompt_logits(self) -> bool:
        """Whether the prefill must hand this row its full [prompt_len, V] logits (echo with logprobs)."""
        return self.request.prompt_logprobs

    @property
    def prompt_positions_seen(self) -> int:
        """Prompt positions whose logits :meth:`take_prompt_logits` has received so far."""
        return self._prompt_seen

    def take_prompt_logits(self, logits_2d: torch.Tensor) -> None:
        """Record prompt logprobs from the next consecutive chunk of this row's prefill logits.

        Row j of all chunks together is the model's output after prompt token j, so it scores token j + 1;
        chunked prefill calls this once per chunk, in order. The first prompt token has no logprob (None)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs, self.prompt_top_logprobs = [None], [None]
        start = self._prompt_seen
        n = min(logits_2d.shape[0], self.prompt_len - 1 - start)  # the last row scores the first new token
        self._prompt_seen += logits_2d.shape[0]
        if n <= 0:
            return
        targets = torch.tensor(self.request.prompt_ids[start + 1:start + 1 + n], dtype=torch.long)
        chosen, tops = token_logprobs(logits_2d[:n], targets, self.logprobs_k or 0)
        self.prompt_logprobs.extend(chosen)
        self.prompt_top_logprobs.extend(tops)

    def accept(self, token_id: int, logits: torch.Tensor | None = None) -> None:
        """Take one sampled token: decode it, check stop conditions, stream what is safe to show.

        *logits* are the raw [V] next-token logits the token was chosen from; with them, the token's logprob
        (and top-k) are recorded when the request asked for logprobs."""
        if self.token_logprobs is not None and logits is not None:
            chosen, tops = token_logprobs(logits.view(1, -1), torch.tensor([token_id]), self.logprobs_k)
            self.token_logprobs.append(chosen[0])
            self.top_logprobs.append(tops[0])
        self.tokens.append(token_id)
        if token_id in self.eos:
            self._finish("stop", token_id)
            return
        if len(self.tokens) == 1 and self.request.keep_leading_space:
            piece = self.decoder.tokenizer.id_to_token(token_id) or ""
            if piece.startswith("\u2581"):
                self.pending = " "
        self.pending += self.decoder.push(token_id)
        hit = find_stop(self.pending, self.stops) if self.stops else None
        if hit is not None:
            index, stop = hit
            self.pending = self.pending[:index]
            self.stop_string = stop
            self._finish("stop", token_id, flush_decoder=False)
            return
        if len(self.tokens) >= self.max_new:
            self._finish("length", token_id)
            return
        keep = held_suffix(self.pending, self.stops) if self.stops else 0
        ready, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self._emit(ready, token_id)

    def _finish(self, reason: str, token_id: int, *, flush_decoder: bool = True) -> None:
        tail = self.pending + (self.decoder.flush() if flush_decoder else "")
        self.pending = ""
        if tail or token_id >= 0:
            self._emit(tail, token_id)
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def interrupt(self) -> None:
        self._finish("interrupted", -1)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text, token_ids=list(self.tokens), finish_reason=self.finish_reason or "interrupted",
            prompt_tokens=self.prompt_len, completion_tokens=len(self.tokens), seed=self.state.seed,
            seconds=max(0.0, self.finished_at - self.started), prefill_seconds=self.prefilled_at - self.started,
            stop_string=self.stop_string, token_logprobs=self.token_logprobs, top_logprobs=self.top_logprobs,
            prompt_logprobs=self.prompt_logprobs, prompt_top_logprobs=self.prompt_top_logprobs,
            cached_tokens=self.cached_tokens)


# -- the batch loop -------------------------------------------------------------------------------------------

class Arrivals(Protocol):
    """Requests that may join a running batch between decode steps (continuous batching)."""

    def take(self, fits: Callable[[GenerationRequest], bool], limit: int) -> list[tuple[GenerationRequest, Sink]]:
        """Claim up to *limit* waiting requests, in order, while ``fits(request)`` says they fit."""
        ...


def _new_cache(model: Any, batch: int, slots: int) -> Any:
    """A KV cache with *slots* token slots. Left padding and joining rows make slots exceed positions, so a
    batch may need more slots than the context length even though no row's position does."""
    return model.new_kv_cache(batch, slots)


def _prefill(model: Any, rows: list[_Row], cache: Any,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the left-padded prompts through the model in chunks; return the last logits [B, V] and the
    key mask [B, width] (False on padding slots). Rows that want prompt logits get each chunk's full
    logits (the model computes every position's logits only for chunks of batches holding such a row)."""
    width = max(r.prompt_len for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    key_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        pad = width - row.prompt_len
        ids[i, pad:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
        positions[i, pad:] = torch.arange(row.prompt_len)
        key_mask[i, pad:] = True
    ids, positions, key_mask = ids.to(device), positions.to(device), key_mask.to(device)
    padded = bool((~key_mask).any())
    wanting = [i for i, row in enumerate(rows) if row.wants_prompt_logits]
    logits = None
    for start in range(0, width, PREFILL_CHUNK):
        end = min(width, start + PREFILL_CHUNK)
        logits = model(ids[:, start:end], positions=positions[:, start:end], cache=cache,
                       key_mask=key_mask[:, :end] if padded else None, last_only=not wanting)
        for i in wanting:
            first = max(start, width - rows[i].prompt_len)  # this row's prompt starts after its padding
            if first < end:
                rows[i].take_prompt_logits(logits[i, first - start:])
    return logits[:, -1], key_mask


class _Batch:
    """The rows decoding together and their shared-slot KV cache.

    All rows fill the same slots, right-aligned: a row's valid slots end at ``cache.length`` and the
    slots before its first token are masked out. Rows leave with ``select_rows``; rows join by prefilling
    them on their own and copying both caches, right-aligned, into a fresh cache (dropping slot columns
    that no remaining row uses); :func:`_admit` keeps the slot count within the caller's budget.
    """

    def __init__(self, llm: Any, rows: list[_Row]):
        self.model = llm.model
        self.device = self.model.model.embed_tokens.weight.device   # lm_head may be quantized
        width = max(r.prompt_len for r in rows)
        self.cache = _new_cache(self.model, len(rows), width + max(r.max_new for r in rows))
        self.logits, self.key_mask = _prefill(self.model, rows, self.cache, self.device)
        self.rows = list(rows)

    @property
    def length(self) -> int:
        return self.cache.length

    def keep(self, live: list[int]) -> None:
        if len(live) == len(self.rows):
            return
        self.cache.select_rows(live)
        self.key_mask = self.key_mask[live]
        if self.logits is not None:
            self.logits = self.logits[live]
        self.rows = [self.rows[i] for i in live]

    def _leading_unused(self) -> int:
        """Slot columns at the left that every row masks out (freed by rows that left)."""
        used = self.key_mask.any(dim=0)
        return int(used.float().argmax()) if bool(used.any()) else self.length

    def slots_after_join(self, prompt_lens: list[int], max_news: list[int]) -> int:
        """Slots the batch would need if rows with these prompt lengths / token budgets joined now."""
        length = max([self.length - self._leading_unused(), *prompt_lens])
        remaining = [r.max_new - len(r.tokens) for r in self.rows] + list(max_news)
        return length + max(remaining)

    def join(self, rows: list[_Row]) -> None:
        """Prefill *rows* and merge them into the batch (their logits wait to be sampled with the rest)."""
        width = max(r.prompt_len for r in rows)
        side = _new_cache(self.model, len(rows), width)
        logits, mask = _prefill(self.model, rows, side, self.device)
        lead = self._leading_unused()
        old_len = self.length - lead
        length = max(old_len, width)
        slots = self.slots_after_join([r.prompt_len for r in rows], [r.max_new for r in rows])
        merged = _new_cache(self.model, len(self.rows) + len(rows), slots)
        n_old = len(self.rows)
        for layer in range(len(merged.k)):
            for dst, src in ((merged.k[layer], (self.cache.k[layer], side.k[layer])),
                             (merged.v[layer], (self.cache.v[layer], side.v[layer]))):
                dst[:n_old, :, length - old_len:length] = src[0][:, :, lead:self.length]
                dst[n_old:, :, length - width:length] = src[1][:, :, :width]
        merged.length = length
        key_mask = torch.zeros((n_old + len(rows), length), dtype=torch.bool, device=self.device)
        key_mask[:n_old, length - old_len:] = self.key_mask[:, lead:]
        key_mask[n_old:, length - width:] = mask
        self.cache, self.key_mask = merged, key_mask
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows.extend(rows)

    def sample(self) -> None:
        picks = sample_next(self.logits, [r.state for r in self.rows])
        for i, (row, token) in enumerate(zip(self.rows, picks)):
            row.accept(token, self.logits[i])
        self.logits = None

    def forward(self) -> None:
        """Feed every row's last token; leaves the next logits for :meth:`sample`."""
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.position] for r in self.rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(self.rows), 1), dtype=torch.bool, device=self.device)
        self.key_mask = torch.cat([self.key_mask, ones], dim=1)
        padded = bool((~self.key_mask).any())
        self.logits = self.model(ids, positions=positions, cache=self.cache,
                                 key_mask=self.key_mask if padded else None, last_only=True)[:, -1]


@torch.inference_mode()
def generate(llm: Any, requests: Sequence[GenerationRequest], sinks: Sequence[Sink] | None = None, *,
             arrivals: Arrivals | None = None, on_done: Callable[[Sink, GenerationResult], None] | None = None,
             max_batch: int = 8, stream_decoder: Callable[[Any], Any] | None = None) -> list[GenerationResult]:
    """Generate every request as one batch on *llm* (a LoadedLLM); return one result per request.

    Each row streams :class:`TokenDelta` items to its sink and stops early when its sink reports
    ``interrupted``. With *arrivals*, waiting requests join between decode steps while the batch has fewer
    than *max_batch* rows; *on_done(sink, result)* is called as each row (joined ones included) finishes.
    Raises ValueError before any work when one of *requests* is invalid.
    """
    if stream_decoder is None:
        from modules.llm.tokenizer import StreamDecoder
        stream_decoder = StreamDecoder
    sinks = list(sinks) if sinks is not None else [_NullSink() for _ in requests]
    ctx_len = context_length(llm)
    for request in requests:
        check_request(request, ctx_len)
    eos = eos_token_ids(llm)

    def make_row(request: GenerationRequest, sink: Sink) -> _Row:
        return _Row(llm, request, sink, ctx_len, eos, stream_decoder)

    rows = [make_row(req, sink) for req, sink in zip(requests, sinks)]
    # Joining rows are right-aligned with the batch, so slots can exceed any row's positions; capping them
    # bounds KV memory (a newcomer that would need more waits for the next batch).
    slot_limit = ctx_len + ctx_len // 2
    batch = _Batch(llm, rows)
    for row in rows:
        row.prefilled_at = time.perf_counter()

    def finish(finished: list[_Row]) -> None:
        for row in finished:
            result = row.result()
            log.info("%s: %d prompt + %d new tokens in %.2f s (%.1f tokens/s, batch of %d), finish: %s",
                     row.request.label, result.prompt_tokens, result.completion_tokens, result.seconds,
                     result.tokens_per_second, len(batch.rows), result.finish_reason)
            if on_done is not None:
                on_done(row.sink, result)

    def drop_finished() -> None:
        live = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
        finish([row for row in batch.rows if row.finish_reason is not None])
        batch.keep(live)

    while True:
        for row in batch.rows:
            if row.finish_reason is None and row.sink.interrupted:
                row.interrupt()
        drop_finished()
        if arrivals is not None and len(batch.rows) < max_batch:
            joining = _admit(batch, arrivals, make_row, ctx_len, max_batch - len(batch.rows), slot_limit)
            if joining:
                if batch.rows:
                    batch.join(joining)
                else:  # everyone else is done: the newcomers make a fresh batch
                    batch = _Batch(llm, joining)
                for row in joining:
                    row.prefilled_at = time.perf_counter()
        if not batch.rows:
            break
        batch.sample()
        drop_finished()
        if not batch.rows:
            break
        batch.forward()
    return [row.result() for row in rows]


def _admit(batch: _Batch | None, arrivals: Arrivals, make_row: Callable[[GenerationRequest, Sink], _Row],
           ctx_len: int, limit: int, slot_limit: int) -> list[_Row]:
    """Claim waiting requests that fit the batch's slot budget; return their (not yet prefilled) rows."""
    lens: list[int] = []
    news: list[int] = []

    def fits(request: GenerationRequest) -> bool:
        n = len(request.prompt_ids)
        budget = min(request.params.max_new_tokens, ctx_len - n)
        if batch is not None and batch.rows and \
                batch.slots_after_join(lens + [n], news + [budget]) > slot_limit:
            return False
        lens.append(n)
        news.append(budget)
        return True

    return [make_row(request, sink) for request, sink in arrivals.take(fits, limit)]


# -- the job-queue front door --------------------------------------------------------------------------------

class GenerationHandle:
    """The caller's view of one submitted request."""

    def __init__(self, job: Job, request: GenerationRequest):
        self.job = job
        self.request = request

    @property
    def id(self) -> str:
        return self.job.id

    def events(self, timeout: float | None = None) -> Iterator[TokenDelta]:
        """Yield text deltas as they are generated; ends when the request ends. Re-raises its error."""
        try:
            yield from self.job.stream(timeout=timeout)
        except JobInterrupted:
            return

    def event_batches(self, timeout: float | None = None) -> Iterator[list[TokenDelta]]:
        """The deltas of :meth:`events`, each step giving every delta already generated (see
        :meth:`modules.jobs.Job.stream_batches`)."""
        try:
            yield from self.job.stream_batches(timeout=timeout)
        except JobInterrupted:
            return

    async def event_batches_async(self) -> AsyncIterator[list[TokenDelta]]:
        """:meth:`event_batches` for an asyncio consumer, without a thread hop per batch
        (:meth:`modules.jobs.Job.stream_batches_async`)."""
        try:
            async for batch in self.job.stream_batches_async():
                yield batch
        except JobInterrupted:
            return

    def result(self, timeout: float | None = None) -> GenerationResult:
        try:
            return self.job.result(timeout)
        except JobInterrupted:  # stopped before it started: nothing was generated
            return GenerationResult("", [], "interrupted", len(self.request.prompt_ids), 0,
                                    seed=self.request.params.seed)

    def interrupt(self) -> None:
        self.job.interrupt()

    @property
    def done(self) -> bool:
        return self.job.done


class LLMEngine:
    """Queues generation requests for one model and runs them in batches on the shared job queue.

    Args:
        jobs: the app's JobQueue.
        model_name: batches are keyed ``"llm:<model_name>"``.
        acquire: returns a model-manager Lease on the LoadedLLM (loading it if needed); held per batch.
        max_batch: most rows decoded together.
    """

    def __init__(self, jobs: Any, model_name: str, acquire: Callable[[], Any], *, max_batch: int = 8,
                 paged: bool = True, kv_pool: Callable[[Any], Any] | None = None,
                 options: Callable[[], dict[str, Any]] | None = None,
                 draft: Callable[[], Any] | None = None):
        self.jobs = jobs
        self.model_name = model_name
        self.batch_key = f"llm:{model_name}"
        self._acquire = acquire
        self.max_batch = max_batch
        #: returns the model's DraftSetup (modules.llm.speculative) or None when no draft is set; raises
        #: ValueError when the setting names an unusable draft
        self._draft = draft
        #: True: the paged engine (modules.llm.paged); False: the contiguous batch loop (:func:`generate`),
        #: kept for benchmarks and comparisons
        self.paged = paged
        #: lease -> the model's BlockPool (the service allocates it through the model manager); None: the
        #: engine sizes one itself (:func:`modules.llm.paged.kv_memory.pool_blocks`, automatic size)
        self._kv_pool = kv_pool
        #: read at the start of each batch: {"max_batch": int, "prefix_caching": bool, "paged": bool} (the
        #: llm.* settings), overriding the arguments
        self._options = options
        self._own_pool: tuple[Any, Any] | None = None   # (weakref to the model, its pool) without kv_pool

    def _pool_for(self, lease: Any, max_batch: int) -> Any:
        if self._kv_pool is not None:
            return self._kv_pool(lease)
        import weakref

        from modules.llm.paged.kv_memory import new_pool, pool_blocks
        llm = lease.model
        if self._own_pool is None or self._own_pool[0]() is not llm:
            self._own_pool = None   # drop the old model's pool before allocating
            blocks = pool_blocks(llm, kv_cache_mb=0, max_batch=max_batch, free_bytes=None)
            self._own_pool = (weakref.ref(llm), new_pool(llm, blocks))
        return self._own_pool[1]

    def submit(self, request: GenerationRequest, *, owner: str | None = None) -> GenerationHandle:
        """Queue *request*; *owner* (see :mod:`modules.job_owner`) is recorded on its job. Only the returned
        handle stops it: image Interrupts and other callers never touch a reply.

        A request that resolves to speculative decoding goes on its own batch key, ``llm:<model>:spec``,
        whose runner (:func:`modules.llm.speculative.run_speculative_jobs`) leases target and draft."""
        request.params.validate()
        request.params = request.params.with_seed()
        name = f"{self.model_name}: {request.label}"
        if request.speculative is not False:
            from modules.llm.speculative import resolve_draft, run_speculative_jobs
            setup = resolve_draft(request, self._draft, self.model_name)
            if setup is not None:
                job = self.jobs.submit_batchable(f"{self.batch_key}:spec", (request, setup),
                                                 lambda jobs: run_speculative_jobs(jobs, self._acquire, self.jobs),
                                                 kind=JOB_KIND, owner=owner, name=f"{name} (speculative)")
                return GenerationHandle(job, request)
        job = self.jobs.submit_batchable(self.batch_key, request, self._run_batch, kind=JOB_KIND, owner=owner,
                                         name=name)
        return GenerationHandle(job, request)

    def _run_batch(self, jobs: list[Job]) -> list[GenerationResult | None]:
        """Run *jobs* (and every same-model request that arrives meanwhile) under one model lease.

        Jobs are finished one by one as their rows finish (so callers get results without waiting for the
        slowest row); the job queue sees every job done when this returns.
        """
        lease = self._acquire()
        arrivals = None
        # Jobs finish as their rows finish; the batch's last ones only after the lease is released, so a
        # caller that unloads the model right after its reply does not find it still in use.
        running, deferred = [0], []

        def on_done(job: Job, result: GenerationResult) -> None:
            running[0] -= 1
            if running[0] > 0:
                job.finish(result=result)
            else:
                deferred.append((job, result))

        def on_take(taken: list[Job]) -> None:
            running[0] += len(taken)
            while deferred:  # more work arrived: no reason to hold these back
                job, result = deferred.pop(0)
                job.finish(result=result)

        try:
            llm = lease.model
            ctx_len = context_length(llm)
            options = {"max_batch": self.max_batch, "prefix_caching": True, "paged": self.paged,
                       **(self._options() if self._options else {})}
            max_batch = int(options["max_batch"])
            check = functools.partial(check_request, ctx_len=ctx_len)
            if options["paged"]:
                from modules.llm.paged.paged_engine import check_paged_request, generate_paged
                pool = self._pool_for(lease, max_batch)
                check = functools.partial(check_paged_request, ctx_len=ctx_len, pool=pool)
                run = functools.partial(generate_paged, llm, pool, prefix_caching=bool(options["prefix_caching"]))
            else:
                run = functools.partial(generate, llm)
            arrivals = _QueueArrivals(self.jobs, self.batch_key, check, on_take)
            first = []
            for job in jobs:
                try:
                    check(job.payload)
                    first.append(job)
                except ValueError as exc:
                    job.finish(error=exc)  # a bad request fails alone; the others run
            running[0] = len(first)
            while first:
                run([job.payload for job in first], first, arrivals=arrivals, max_batch=max_batch, on_done=on_done)
                # requests that did not fit the last batch's slot budget start the next one
                first = [job for _request, job in arrivals.take(lambda request: True, max_batch)]
            return [None] * len(jobs)
        except BaseException as exc:  # the queue fails the jobs it handed over; the ones pulled in fail here
            for job in arrivals.taken if arrivals is not None else []:
                if not job.done:
                    job.finish(error=exc)
            raise
        finally:
            lease.release()
            for job, result in deferred:
                job.finish(result=result)


class _QueueArrivals:
    """The requests for one model waiting at the head of the job queue, for :func:`generate` to pull in.

    Only the worker running this batch takes jobs from the queue, and new jobs are appended at the tail,
    so peeking at the head and then taking one job claims exactly the job that was peeked at.
    """

    def __init__(self, jobs: Any, batch_key: str, check: Callable[[GenerationRequest], None],
                 on_take: Callable[[list[Job]], None]):
        """*check(request)* raises ValueError for a request that cannot run (it then fails alone)."""
        self.jobs, self.batch_key, self.check, self.on_take = jobs, batch_key, check, on_take
        self.taken: list[Job] = []

    def take(self, fits: Callable[[GenerationRequest], bool], limit: int) -> list[tuple[GenerationRequest, Job]]:
        out: list[tuple[GenerationRequest, Job]] = []
        while len(out) < limit:
            waiting = self.jobs.waiting_jobs()
            if not waiting or waiting[0].batch_key != self.batch_key:
                break
            head = waiting[0]
            try:
                self.check(head.payload)
            except ValueError as exc:
                for job in self.jobs.take_waiting(self.batch_key, 1):
                    job.finish(error=exc)
                continue
            if not fits(head.payload):
                break
            claimed = self.jobs.take_waiting(self.batch_key, 1)
            if not claimed:
                break
            self.taken.extend(claimed)
            self.on_take(claimed)
            out.extend((job.payload, job) for job in claimed)
        return out
