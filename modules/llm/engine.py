"""The generation engine: prompt token ids in, streamed text and a result out.

Two layers:

* :func:`generate` runs a list of requests as one static batch on a loaded model: left-padded
  prefill (per-row RoPE positions, padding slots masked out with ``key_mask``), then batched decode,
  one token per row per step. A row that finishes (EOS, stop string, max tokens, context full,
  interrupted) leaves the batch through ``cache.select_rows``. Each row streams its text deltas to a
  *sink* (anything with ``emit(item)`` and an ``interrupted`` flag: a :class:`~modules.jobs.Job`).
* :class:`LLMEngine` puts requests on the shared job queue with ``submit_batchable`` under the key
  ``"llm:<model>"``, so requests that arrive together run as one batch, holding the model lease for
  the whole run. After a batch ends, requests that arrived meanwhile are pulled in with
  ``take_waiting`` and run as the next wave under the same lease.

Design for the later paged-KV continuous-batching engine: callers only see ``LLMEngine.submit`` ->
:class:`GenerationHandle` (``events()``, ``result()``, ``interrupt()``) and the dataclasses below;
the batch loop behind it can be replaced without touching the service, the UI or the API. Joining
new rows into a running decode needs per-row KV slots (paged KV), which this contiguous cache lacks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from modules.jobs import Job, JobInterrupted
from modules.llm.sampling import RowState, SamplingParams, sample_next

log = logging.getLogger(__name__)

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


@dataclass
class TokenDelta:
    """One streamed step: the new text (may be empty while a stop string or a UTF-8 character is
    incomplete) and the token that produced it."""
    text: str
    token_id: int
    index: int  # 0-based index of the token in the completion


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


def check_request(request: GenerationRequest, ctx_len: int) -> None:
    """Raise ValueError (PromptTooLong for length) for a request that cannot run."""
    request.params.validate()
    n = len(request.prompt_ids)
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token (most prompts start with BOS)")
    if n >= ctx_len:
        raise PromptTooLong(f"the prompt is {n} tokens but the model's context is {ctx_len} tokens, leaving no "
                            f"room for a reply; shorten the prompt to under {ctx_len} tokens")


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


# -- one row of a batch -----------------------------------------------------------------------------------------

class _Row:
    def __init__(self, llm: Any, request: GenerationRequest, sink: Sink, ctx_len: int, eos: set[int],
                 stream_decoder: Callable[[Any], Any]):
        self.request = request
        self.sink = sink
        self.prompt_len = len(request.prompt_ids)
        self.state = RowState(request.params, request.prompt_ids, llm.config.vocab_size,
                              device=llm.model.lm_head.weight.device)
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
        self.finished_at = 0.0

    @property
    def position(self) -> int:
        """RoPE position of the next token fed to the model (the last sampled one)."""
        return self.prompt_len + len(self.tokens) - 1

    def _emit(self, text: str, token_id: int) -> None:
        self.text += text
        self.sink.emit(TokenDelta(text, token_id, len(self.tokens) - 1))

    def accept(self, token_id: int) -> None:
        """Take one sampled token: decode it, check stop conditions, stream what is safe to show."""
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

    def result(self, started: float, prefill_seconds: float) -> GenerationResult:
        return GenerationResult(
            text=self.text, token_ids=list(self.tokens), finish_reason=self.finish_reason or "interrupted",
            prompt_tokens=self.prompt_len, completion_tokens=len(self.tokens), seed=self.state.seed,
            seconds=max(0.0, self.finished_at - started), prefill_seconds=prefill_seconds,
            stop_string=self.stop_string)


# -- the batch loop -------------------------------------------------------------------------------------------

def _new_cache(model: Any, batch: int, slots: int) -> Any:
    """A KV cache with *slots* token slots. Left padding makes slots exceed positions, so a batch may need
    more slots than the context length even though no row's position does."""
    if slots <= model.config.max_position_embeddings or model.config.rope_scaling is not None:
        return model.new_kv_cache(batch, slots)
    from modules.llm.model import KVCache  # same cache, sized by slots rather than positions
    cfg, weight = model.config, model.lm_head.weight
    return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim,
                   dtype=weight.dtype, device=weight.device)


def _prefill(model: Any, rows: list[_Row], cache: Any,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the left-padded prompts through the model in chunks; return the last logits [B, V] and the
    key mask [B, width] (False on padding slots)."""
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
    logits = None
    for start in range(0, width, PREFILL_CHUNK):
        end = min(width, start + PREFILL_CHUNK)
        logits = model(ids[:, start:end], positions=positions[:, start:end], cache=cache,
                       key_mask=key_mask[:, :end] if padded else None, last_only=True)
    return logits[:, -1], key_mask


@torch.inference_mode()
def generate(llm: Any, requests: Sequence[GenerationRequest], sinks: Sequence[Sink] | None = None, *,
             stream_decoder: Callable[[Any], Any] | None = None) -> list[GenerationResult]:
    """Generate every request as one batch on *llm* (a LoadedLLM); return one result per request.

    Each row streams :class:`TokenDelta` items to its sink and stops early when its sink reports
    ``interrupted``. Raises ValueError before any work when a request is invalid.
    """
    if stream_decoder is None:
        from modules.llm.tokenizer import StreamDecoder
        stream_decoder = StreamDecoder
    sinks = list(sinks) if sinks is not None else [_NullSink() for _ in requests]
    ctx_len = context_length(llm)
    for request in requests:
        check_request(request, ctx_len)
    model = llm.model
    device = model.lm_head.weight.device
    eos = eos_token_ids(llm)
    rows = [_Row(llm, req, sink, ctx_len, eos, stream_decoder) for req, sink in zip(requests, sinks)]
    started = time.perf_counter()
    width = max(r.prompt_len for r in rows)
    cache = _new_cache(model, len(rows), width + max(r.max_new for r in rows))
    logits, key_mask = _prefill(model, rows, cache, device)
    prefill_seconds = time.perf_counter() - started
    active = list(rows)
    while True:
        for row in active:
            if row.finish_reason is None and row.sink.interrupted:
                row.interrupt()
        live = [i for i, row in enumerate(active) if row.finish_reason is None]
        if not live:
            break
        if len(live) < len(active):  # rows stopped by their callers leave the batch
            cache.select_rows(live)
            logits, key_mask = logits[live], key_mask[live]
            active = [active[i] for i in live]
        for row, token in zip(active, sample_next(logits, [r.state for r in active])):
            row.accept(token)
        live = [i for i, row in enumerate(active) if row.finish_reason is None]
        if not live:
            break
        if len(live) < len(active):  # finished rows leave the batch
            cache.select_rows(live)
            key_mask = key_mask[live]
            active = [active[i] for i in live]
        ids = torch.tensor([[r.tokens[-1]] for r in active], dtype=torch.long, device=device)
        positions = torch.tensor([[r.position] for r in active], dtype=torch.long, device=device)
        key_mask = torch.cat([key_mask, torch.ones((len(active), 1), dtype=torch.bool, device=device)], dim=1)
        padded = bool((~key_mask).any())
        logits = model(ids, positions=positions, cache=cache, key_mask=key_mask if padded else None,
                       last_only=True)[:, -1]
    results = [row.result(started, prefill_seconds) for row in rows]
    for row, result in zip(rows, results):
        log.info("%s: %d prompt + %d new tokens in %.2f s (%.1f tokens/s, batch of %d), finish: %s",
                 row.request.label, result.prompt_tokens, result.completion_tokens, result.seconds,
                 result.tokens_per_second, len(rows), result.finish_reason)
    return results


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

    def __init__(self, jobs: Any, model_name: str, acquire: Callable[[], Any], *, max_batch: int = 8):
        self.jobs = jobs
        self.model_name = model_name
        self.batch_key = f"llm:{model_name}"
        self._acquire = acquire
        self.max_batch = max_batch

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        request.params.validate()
        request.params = request.params.with_seed()
        job = self.jobs.submit_batchable(self.batch_key, request, self._run_batch,
                                         name=f"{self.model_name}: {request.label}")
        return GenerationHandle(job, request)

    def _run_batch(self, jobs: list[Job]) -> list[GenerationResult]:
        lease = self._acquire()
        try:
            llm = lease.model
            results = self._run_wave(llm, jobs)
            while True:  # requests that queued up meanwhile: next wave, same lease
                more = self.jobs.take_waiting(self.batch_key, self.max_batch)
                if not more:
                    break
                try:
                    for job, result in zip(more, self._run_wave(llm, more)):
                        job._finish(result=result)
                except BaseException as exc:  # noqa: BLE001 - the wave's jobs get the error, not the worker
                    for job in more:
                        if not job.done:
                            job._finish(error=exc)
                    if not isinstance(exc, Exception):
                        raise
            return results
        finally:
            lease.release()

    def _run_wave(self, llm: Any, jobs: list[Job]) -> list[GenerationResult | None]:
        """Generate for *jobs*; a job whose request is invalid fails alone, the others still run."""
        ctx_len = context_length(llm)
        good, results = [], [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                check_request(job.payload, ctx_len)
                good.append(i)
            except ValueError as exc:
                job._finish(error=exc)
        if good:
            outs = generate(llm, [jobs[i].payload for i in good], [jobs[i] for i in good])
            for i, out in zip(good, outs):
                results[i] = out
        return results
