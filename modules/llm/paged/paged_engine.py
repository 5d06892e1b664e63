"""The paged engine's loop: schedule a step, run it, sample, stream, repeat.

It drives the same :class:`~modules.llm.engine._Row` objects as the contiguous engine, so streaming, stop
strings, EOS, max tokens, logprobs, prompt logprobs and sampling (seeds, logit_bias, penalties) behave exactly
as there. What changes is only where keys and values live (:mod:`.block_pool`), which rows run together
(:mod:`.scheduler`) and how one forward pass attends (:mod:`.paged_cache`).

Each step runs at most two forward passes: one over every decode row (one token each) and one over the prompt
chunks the token budget allows (left-padded to the longest chunk). They are separate because padding 31 decode
rows to a 256-token chunk would multiply the work; on this CPU a prefill chunk is compute-bound, so the second
pass's extra weight read costs little.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

from modules.llm.engine import (Arrivals, GenerationRequest, GenerationResult, Sink, _NullSink, _Row,
                                check_request, context_length, eos_token_ids)
from modules.llm.paged.block_pool import BlockPool
from modules.llm.paged.kv_memory import check_fits
from modules.llm.paged.paged_cache import PagedBatch
from modules.llm.paged.scheduler import DEFAULT_TOKEN_BUDGET, Scheduler, Sequence as Seq
from modules.llm.sampling import sample_next

log = logging.getLogger(__name__)


def check_paged_request(request: GenerationRequest, ctx_len: int, pool: BlockPool) -> None:
    """check_request plus: the request must fit the whole KV pool (KVCacheExhausted otherwise)."""
    check_request(request, ctx_len)
    n = len(request.prompt_ids)
    check_fits(n, min(request.params.max_new_tokens, ctx_len - n), pool)


@torch.inference_mode()
def generate_paged(llm: Any, pool: BlockPool, requests: Sequence[GenerationRequest],
                   sinks: Sequence[Sink] | None = None, *, arrivals: Arrivals | None = None,
                   on_done: Callable[[Sink, GenerationResult], None] | None = None, max_batch: int = 8,
                   prefix_caching: bool = True, token_budget: int = DEFAULT_TOKEN_BUDGET,
                   stream_decoder: Callable[[Any], Any] | None = None) -> list[GenerationResult]:
    """:func:`modules.llm.engine.generate` on a paged KV pool: same arguments, same results (plus
    ``cached_tokens``). Rows join from *arrivals* whenever fewer than *max_batch* are running or waiting,
    without copying anything; rows that finish free their blocks at once. *arrivals* must check each request
    with :func:`check_paged_request` (LLMEngine's do)."""
    if stream_decoder is None:
        from modules.llm.tokenizer import StreamDecoder
        stream_decoder = StreamDecoder
    sinks = list(sinks) if sinks is not None else [_NullSink() for _ in requests]
    ctx_len = context_length(llm)
    for request in requests:
        check_paged_request(request, ctx_len, pool)
    eos = eos_token_ids(llm)
    model = llm.model
    device = model.model.embed_tokens.weight.device
    scheduler = Scheduler(pool, max_running=max_batch, token_budget=token_budget, prefix_caching=prefix_caching)
    if not prefix_caching:
        pool.clear_cache()

    def add(request: GenerationRequest, sink: Sink) -> _Row:
        row = _Row(llm, request, sink, ctx_len, eos, stream_decoder)
        scheduler.add(row)
        return row

    rows = [add(req, sink) for req, sink in zip(requests, sinks)]

    def finish(seq: Seq) -> None:
        scheduler.finish(seq)
        row = seq.row
        result = row.result()
        log.info("%s: %d prompt (%d cached) + %d new tokens in %.2f s (%.1f tokens/s, %d running), finish: %s",
                 row.request.label, result.prompt_tokens, seq.cached_tokens, result.completion_tokens,
                 result.seconds, result.tokens_per_second, len(scheduler.running) + 1, result.finish_reason)
        if on_done is not None:
            on_done(row.sink, result)

    while True:
        for seq in scheduler.sequences:
            if seq.row.finish_reason is None and seq.row.sink.interrupted:
                seq.row.interrupt()
                finish(seq)
        if arrivals is not None:
            room = max_batch - len(scheduler.running) - len(scheduler.waiting)
            if room > 0:
                for request, sink in arrivals.take(lambda request: True, room):
                    add(request, sink)
        if not scheduler.has_work():
            break
        step = scheduler.schedule()
        if step.empty:   # cannot happen with a pool that fits every admitted request; never spin silently
            raise RuntimeError(f"the KV scheduler found nothing to run ({len(scheduler.waiting)} waiting, "
                               f"{pool.free_blocks} free blocks)")
        ready: list[tuple[Seq, torch.Tensor]] = []
        if step.decode:
            ready += _forward(model, pool, [(s, 1) for s in step.decode], device, prefix_caching)
        if step.prefill:
            ready += _forward(model, pool, step.prefill, device, prefix_caching)
        if not ready:
            continue
        seqs = [s for s, _ in ready]
        logits = torch.stack([l for _, l in ready])
        now = time.perf_counter()
        picks = sample_next(logits, [s.row.state for s in seqs])
        for i, (seq, token) in enumerate(zip(seqs, picks)):
            if not seq.row.tokens:
                seq.row.prefilled_at = now
            seq.row.accept(token, logits[i])
            if seq.row.finish_reason is not None:
                finish(seq)
    return [row.result() for row in rows]


def _forward(model: Any, pool: BlockPool, work: list[tuple[Seq, int]], device: torch.device,
             prefix_caching: bool) -> list[tuple[Seq, torch.Tensor]]:
    """Feed each sequence its next *n* tokens in one pass; return (sequence, next-token logits [V]) for those
    now fully computed (the others are mid-prompt)."""
    tables = [s.table for s, _ in work]
    cached = [s.computed for s, _ in work]
    new = [n for _, n in work]
    ids = torch.zeros((len(work), max(new)), dtype=torch.long)
    token_lists = []
    for j, (seq, n) in enumerate(work):
        tokens = seq.token_ids()
        token_lists.append(tokens)
        ids[j, ids.shape[1] - n:] = torch.tensor(tokens[seq.computed:seq.computed + n], dtype=torch.long)
    view = PagedBatch(pool, tables, cached, new, device)
    wanting = [j for j, (seq, _) in enumerate(work) if seq.row.wants_prompt_logits
               and seq.computed < seq.row.prompt_len]
    logits = model(ids.to(device), positions=view.positions, cache=view, key_mask=view.key_mask,
                   last_only=not wanting)
    T = ids.shape[1]
    for j in wanting:
        seq, n = work[j]
        # a row preempted mid-prompt prefills again from the start: positions it already scored are skipped
        skip = seq.row.prompt_positions_seen - seq.computed
        if skip < n:
            seq.row.take_prompt_logits(logits[j, T - n + max(0, skip):])
    out = []
    for j, (seq, n) in enumerate(work):
        seq.computed += n
        if prefix_caching:
            seq.table.register_full_blocks(token_lists[j], seq.computed)
        if seq.computed == seq.total:
            out.append((seq, logits[j, -1]))
    return out
