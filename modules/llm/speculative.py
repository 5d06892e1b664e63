"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward pass.

One request at a time (batch 1), on Atelier's own model, driving the normal engine's
:class:`~modules.llm.engine._Row` so that streaming, stop strings, EOS, max tokens and the result look
exactly as they do in :func:`~modules.llm.engine.generate`.

One round, with ``seq`` the prompt plus the tokens accepted so far and both KV caches holding ``seq[:-1]``
(the draft's may lag one more token after a fully accepted round):

1. the draft feeds the tokens its cache lacks, then proposes ``d_1 .. d_k`` one at a time, each drawn
   from its processed distribution ``q_i``;
2. the target feeds ``[seq[-1], d_1 .. d_k]`` in one pass: ``k + 1`` next-token distributions ``p_i``;
3. the rule of Leviathan et al. (arXiv 2211.17192) and Chen et al. (arXiv 2302.01318): accept ``d_i`` with
   probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection draw from ``norm(max(0, p_i - q_i))``
   and stop; when all k are accepted, draw a bonus token from ``p_{k+1}``. Every emitted token is then
   distributed exactly as plain sampling from the target would draw it. Greedy is the same rule with
   one-hot distributions: accept while ``d_i`` is the target's arg-max, else take the arg-max;
4. both caches are truncated back to the new ``seq[:-1]`` (KV rollback), and k adapts: +1 when every draft
   was accepted, -1 otherwise, within ``1 .. max_k``; while even one draft is rejected, drafting pauses
   for a few plain target steps (:class:`AdaptiveK`).

The draft steps through :class:`~modules.llm.lean_decode.LeanDecoder` where it can (a draft step must cost
a small fraction of a target step for drafting to pay); the target runs its own forward, as plain decoding
does.

What p and q are. Both are the distributions *after* Atelier's processors (:func:`~modules.llm.sampling.
process_logits`: penalties, then temperature, top-k, top-p, min-p), computed with the same request
parameters. Penalties depend on the tokens generated so far, so ``p_i`` and ``q_i`` are both processed with
the hypothetical context ``seq + d_1 .. d_{i-1}`` (a forked sampling state that observes the drafts): ``p_i``
is then exactly the distribution the plain engine would sample from after that prefix, which is what makes
the output distribution equal the plain engine's with penalties on too. The draft's processed q only
affects speed (how often drafts are accepted), never the output distribution.

Random numbers: the target side (acceptance draws, resamples, bonus tokens) uses the request's own
generator, the draft's proposals a second generator seeded from the same seed, so a seeded request
replays exactly; it does not reproduce the plain engine's token sequence for that seed (no speculative
sampler can), only its distribution.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from modules.llm.draft_settings import DEFAULT_MAX_K, DRAFT_MODELS_KEY, MAX_K_LIMIT
from modules.llm.engine import (GenerationRequest, GenerationResult, Sink, _NullSink, _Row, check_request,
                                context_length, eos_token_ids)
from modules.llm.sampling import RowState, make_generator, process_logits

log = logging.getLogger(__name__)

#: mixed into the request's seed for the draft's own generator
_DRAFT_SEED_SALT = 0x5BD1E995


class DraftIncompatible(ValueError):
    """The draft model cannot draft for the target (different tokenizer)."""


class SpeculativeUnavailable(ValueError):
    """A request asked for speculative decoding that this model cannot do (no draft set, llama.cpp...)."""


@dataclass
class DraftSetup:
    """Which draft model a request uses and how far it may look ahead."""
    name: str
    #: returns a model-manager lease on the draft's LoadedLLM (key ``llm:<name>``)
    acquire: Callable[[], Any]
    max_k: int = DEFAULT_MAX_K


def resolve_draft(request: GenerationRequest, draft: Callable[[], DraftSetup | None] | None,
                  model_name: str) -> DraftSetup | None:
    """The DraftSetup *request* runs with, or None for plain decoding.

    ``request.speculative``: False never drafts; None drafts when the model has a draft set; True requires
    one (SpeculativeUnavailable naming the setting otherwise). A draft set but unusable (missing folder,
    other tokenizer) raises in both cases: the setting is wrong, and silently decoding without it would hide
    that."""
    if request.speculative is False:
        return None
    setup = draft() if draft is not None else None
    if setup is None and request.speculative:
        raise SpeculativeUnavailable(
            f"speculative decoding was asked for, but model {model_name!r} has no draft model: set one in the "
            f"{DRAFT_MODELS_KEY} setting (the Chat tab's \"Speculative decoding\" draft dropdown, or "
            f"\"{model_name}=<draft folder>\" in Settings / /sdapi/v1/options), or leave speculative out")
    return setup


def run_speculative_jobs(jobs: list[Any], acquire: Callable[[], Any], queue: Any) -> list[None]:
    """The job-queue runner of the ``llm:<model>:spec`` batch key: each job's payload is (request,
    DraftSetup); they run one after another (batch 1) under one lease on the target and one per draft, and
    so do the speculative jobs for this model that arrive meanwhile. Each job is finished as it ends, the
    last one only after the leases are released (as the plain engine does), so a caller that unloads the
    model right after its reply does not find it in use."""
    key = jobs[0].batch_key
    lease = acquire()
    drafts: dict[str, Any] = {}
    pending, pulled = list(jobs), []
    last: tuple[Any, Any] | None = None
    try:
        while pending:
            job = pending.pop(0)
            request, setup = job.payload
            if last is not None:
                last[0].finish(result=last[1])
                last = None
            try:
                if setup.name not in drafts:
                    drafts[setup.name] = setup.acquire()
                result = generate_speculative(lease.model, drafts[setup.name].model, request, job,
                                              max_k=setup.max_k, target_name=request.label, draft_name=setup.name)
            except ValueError as exc:   # a bad request (or draft) fails alone; the others run
                job.finish(error=exc)
            else:
                last = (job, result)
            if not pending:
                taken = queue.take_waiting(key, 1)
                pulled.extend(taken)
                pending.extend(taken)
        return [None] * len(jobs)
    except BaseException as exc:   # the queue fails the jobs it handed over; the ones pulled in fail here
        for job in pulled:
            if not job.done:
                job.finish(error=exc)
        raise
    finally:
        for draft_lease in drafts.values():
            draft_lease.release()
        lease.release()
        if last is not None:
            last[0].finish(result=last[1])


# -- draft / target compatibility ---------------------------------------------------------------------------

def vocabulary_fingerprint(tokenizer: Any, vocab_size: int) -> str:
    """A hash of every token string by id plus the BOS/EOS ids: equal exactly when two tokenizers map ids to
    the same pieces (what speculative decoding needs: the target scores the draft's ids as its own). Atelier's
    Tokenizer computes it once (:meth:`~modules.llm.tokenizer.Tokenizer.vocabulary_fingerprint`)."""
    cached = getattr(tokenizer, "vocabulary_fingerprint", None)
    if callable(cached):
        return cached(vocab_size)
    return hash_vocabulary(tokenizer, vocab_size)


def hash_vocabulary(tokenizer: Any, vocab_size: int) -> str:
    """:func:`vocabulary_fingerprint`, computed."""
    digest = hashlib.sha256()
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        digest.update(b"\x01" if piece is None else piece.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    digest.update(f"bos={getattr(tokenizer, 'bos_id', None)};eos={getattr(tokenizer, 'eos_id', None)}".encode())
    return digest.hexdigest()


def check_draft_compatible(target: Any, draft: Any, *, target_name: str = "the target",
                           draft_name: str = "the draft") -> None:
    """Raise DraftIncompatible, with the reason, unless *draft* shares *target*'s vocabulary.

    *target* and *draft* are anything with ``config`` and ``tokenizer`` (a LoadedLLM, or LLMFiles, which
    need no weights: the service checks before loading anything).
    """
    tv, dv = int(target.config.vocab_size), int(draft.config.vocab_size)
    if tv != dv:
        raise DraftIncompatible(f"draft model {draft_name!r} cannot draft for {target_name!r}: its vocabulary has "
                                f"{dv} tokens, the target's {tv}; choose a draft trained with the target's tokenizer")
    tt, dt = target.tokenizer, draft.tokenizer
    if int(tt.vocab_size) != int(dt.vocab_size):
        raise DraftIncompatible(f"draft model {draft_name!r} cannot draft for {target_name!r}: its tokenizer has "
                                f"{dt.vocab_size} pieces, the target's {tt.vocab_size}")
    n = min(tv, int(tt.vocab_size))
    if vocabulary_fingerprint(tt, n) != vocabulary_fingerprint(dt, n):
        first = next((i for i in range(n) if tt.id_to_token(i) != dt.id_to_token(i)), None)
        where = (f"token {first} is {tt.id_to_token(first)!r} for the target but {dt.id_to_token(first)!r} for the "
                 "draft" if first is not None else "their BOS/EOS ids differ")
        raise DraftIncompatible(f"draft model {draft_name!r} cannot draft for {target_name!r}: the tokenizers "
                                f"differ ({where}); choose a draft that uses the target's tokenizer")


# -- adaptive look-ahead -----------------------------------------------------------------------------------

class AdaptiveK:
    """The number of tokens to draft next round: +1 after a fully accepted round, -1 after a rejection,
    within ``1 .. max_k`` (HF's "heuristic" schedule, with a step of 1 up); and a pause in drafting while
    the draft is wrong even at k = 1.

    A round at k = 1 whose draft is rejected costs a draft step plus a (two-token) verify pass for the one
    token a plain step would have given, so after such a round ``pause`` says how many plain target steps
    to take before drafting again: 1, then 2, 4, ... up to 32 while it keeps happening, back to 1 once a
    draft is accepted. Plain steps are exact target samples, so pausing never changes the output."""

    #: the longest pause, in plain target steps
    MAX_PAUSE = 32

    def __init__(self, max_k: int, start: int | None = None):
        if not 1 <= max_k <= MAX_K_LIMIT:
            raise ValueError(f"max_k={max_k} must be between 1 and {MAX_K_LIMIT}")
        self.max_k = max_k
        self.k = max(1, min(max_k, start if start is not None else max_k))
        #: plain target steps still to take before the next drafting round
        self.pause = 0
        self._backoff = 1

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:                 # a plain step (paused, or the reply's last token)
            self.pause = max(0, self.pause - 1)
            return
        if accepted == 0 and self.k == 1:
            self.pause, self._backoff = self._backoff, min(self.MAX_PAUSE, self._backoff * 2)
        elif accepted > 0:
            self._backoff = 1
        self.k = min(self.max_k, self.k + 1) if accepted == drafted else max(1, self.k - 1)


# -- processed distributions --------------------------------------------------------------------------------

def _stateless(state: RowState) -> bool:
    """True when the processors ignore which tokens came before (no penalties): no fork is needed."""
    return not (state.needs_seen or state.needs_counts) and state.constraint is None and not hasattr(state, "fork")


def _fork(state: RowState) -> RowState:
    """A copy of *state* that can observe hypothetical tokens (the drafts) without touching the original.
    A RowState with more per-token state (a grammar) provides ``fork()`` itself."""
    if hasattr(state, "fork"):
        return state.fork()
    twin = copy.copy(state)
    twin.generator = None
    twin.seen = state.seen.clone() if state.seen is not None else None
    twin.counts = state.counts.clone() if state.counts is not None else None
    twin.constraint = state.constraint.fork() if state.constraint is not None else None  # a grammar's position
    return twin


def _scores(logits: torch.Tensor, state: RowState) -> torch.Tensor:
    """Processed scores [V] of one row of raw logits [V] under *state*."""
    return process_logits(logits.float()[None], [state])[0]


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


# -- the decode loop ----------------------------------------------------------------------------------------

class _Model:
    """One model and its batch-1 KV cache, fed token ids at consecutive positions."""

    def __init__(self, llm: Any, slots: int):
        self.model = llm.model
        self.device = llm.device
        self.cache = llm.model.new_kv_cache(1, slots)

    @property
    def length(self) -> int:
        return self.cache.length

    def feed(self, ids: list[int], *, last_only: bool, chunk: int = 512,
             on_chunk: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits [T, V] of the last chunk (or [1, V] with *last_only*) after appending *ids* to the cache;
        *on_chunk* gets every chunk's full logits (prompt logprobs: echo)."""
        logits = None
        for start in range(0, len(ids), chunk):
            part = torch.tensor([ids[start:start + chunk]], dtype=torch.long, device=self.device)
            logits = self.model(part, cache=self.cache, last_only=last_only and on_chunk is None)[0]
            if on_chunk is not None:
                on_chunk(logits)
        return logits

    def truncate(self, n: int) -> None:
        if n < self.cache.length:
            self.cache.truncate(n)


class _LeanModel:
    """The draft's :class:`_Model` on :class:`~modules.llm.lean_decode.LeanDecoder`: the same interface, a
    cheaper step (a draft step must cost a small fraction of a target step for drafting to pay)."""

    def __init__(self, decoder: Any):
        self.decoder = decoder

    @property
    def length(self) -> int:
        return self.decoder.length

    def feed(self, ids: list[int], *, last_only: bool, chunk: int = 512) -> torch.Tensor:
        logits = None
        for start in range(0, len(ids), chunk):
            logits = self.decoder(ids[start:start + chunk], last_only=last_only)
        return logits

    def truncate(self, n: int) -> None:
        if n < self.decoder.length:
            self.decoder.truncate(n)


def _draft_model(draft: Any, slots: int) -> _Model | _LeanModel:
    from modules.llm.lean_decode import lean_decoder
    decoder = lean_decoder(draft.model, slots)
    return _LeanModel(decoder) if decoder is not None else _Model(draft, slots)


@torch.inference_mode()
def generate_speculative(target: Any, draft: Any, request: GenerationRequest, sink: Sink | None = None, *,
                         max_k: int = DEFAULT_MAX_K, adaptive: bool = True, target_name: str = "the target",
                         draft_name: str = "the draft",
                         stream_decoder: Callable[[Any], Any] | None = None) -> GenerationResult:
    """Generate *request* on *target* (a LoadedLLM) with *draft* proposing tokens; return its result.

    Streams :class:`~modules.llm.engine.TokenDelta` items to *sink* exactly as the normal engine does. With
    *adaptive* False, k stays at *max_k*. Raises ValueError for an invalid request and DraftIncompatible
    when the draft's tokenizer differs from the target's.
    """
    if stream_decoder is None:
        from modules.llm.tokenizer import StreamDecoder
        stream_decoder = StreamDecoder
    sink = sink if sink is not None else _NullSink()
    ctx_len = context_length(target)
    check_request(request, ctx_len)
    check_draft_compatible(target, draft, target_name=target_name, draft_name=draft_name)
    if context_length(draft) < ctx_len:
        # the draft sees the same positions as the target; past its context its RoPE is untrained
        ctx_len = context_length(draft)
        check_request(request, ctx_len)
    # start half-way: a long first round that is rejected early costs more than a short one that is not
    schedule = AdaptiveK(max_k, start=max(1, (max_k + 1) // 2))
    row = _Row(target, request, sink, ctx_len, eos_token_ids(target), stream_decoder)
    state = row.state
    draft_state = RowState(state.params, request.prompt_ids, target.config.vocab_size, device=draft.device)
    if draft_state.generator is not None:
        draft_state.generator = make_generator(state.seed ^ _DRAFT_SEED_SALT, draft.device)
    big, small = _Model(target, ctx_len), _draft_model(draft, ctx_len)
    seq = list(request.prompt_ids)
    drafted_total = accepted_total = passes = 0

    def take(token: int, logits: torch.Tensor | None) -> bool:
        """Hand one token to the row; False once the row is finished."""
        state.observe(token)
        draft_state.observe(token)
        seq.append(token)
        row.accept(token, logits)
        return row.finish_reason is None

    # the first token comes from the target's prefill, as in the plain engine
    first_logits = big.feed(seq, last_only=True,
                            on_chunk=row.take_prompt_logits if row.wants_prompt_logits else None)[-1]
    passes += 1
    row.prefilled_at = time.perf_counter()
    alive = take(_pick(first_logits, state, state.generator), first_logits)
    if alive:
        small.feed(seq[:-1], last_only=True)
    while alive:
        if sink.interrupted:
            row.interrupt()
            break
        remaining = row.max_new - len(row.tokens)
        k = min(max_k if not adaptive else 0 if schedule.pause else schedule.k, remaining - 1)
        drafts, q = _propose(small, seq, k, draft_state)
        logits = big.feed([seq[-1], *drafts], last_only=False)                    # [k + 1, V]
        passes += 1
        accepted, token = _verify(logits, drafts, q, state)
        drafted_total += len(drafts)
        accepted_total += accepted
        for i in range(accepted):
            if not take(drafts[i], logits[i]):
                alive = False
                break
        if alive:
            alive = take(token, logits[accepted])
        # roll back: both caches hold seq[:-1] (the draft may hold less, it catches up next round)
        big.truncate(len(seq) - 1)
        small.truncate(len(seq) - 1)
        schedule.update(len(drafts), accepted)
    result = row.result()
    result.draft_tokens, result.accepted_tokens = drafted_total, accepted_total
    result.target_passes = passes
    log.info("%s: speculative (%s drafting): %d new tokens in %d target passes, %d/%d drafts accepted, %.1f "
             "tokens/s, finish: %s", request.label, draft_name, result.completion_tokens, passes, accepted_total,
             drafted_total, result.tokens_per_second, result.finish_reason)
    return result


def _pick(logits: torch.Tensor, state: RowState, generator: torch.Generator | None) -> int:
    """One token from *state*'s processed distribution over raw *logits* [V] (arg-max when greedy)."""
    scores = _scores(logits, state)
    if state.params.greedy or generator is None:
        return int(scores.argmax())
    return _draw(torch.softmax(scores, dim=-1), generator)


def _propose(small: _Model, seq: list[int], k: int, draft_state: RowState) -> tuple[list[int], list[torch.Tensor]]:
    """Draft up to *k* tokens after *seq*; return them and the processed distribution each was drawn from
    (for greedy rows, the distribution is not needed and the list holds the scores)."""
    if k <= 0:
        return [], []
    fork = draft_state if _stateless(draft_state) else _fork(draft_state)
    logits = small.feed(seq[small.length:], last_only=True)[-1]
    drafts: list[int] = []
    dists: list[torch.Tensor] = []
    while True:
        scores = _scores(logits, fork)
        if draft_state.params.greedy:
            token = int(scores.argmax())
            dists.append(scores)
        else:
            probs = torch.softmax(scores, dim=-1)
            token = _draw(probs, draft_state.generator)
            dists.append(probs)
        drafts.append(token)
        if len(drafts) == k:
            return drafts, dists
        if fork is not draft_state:
            fork.observe(token)
        logits = small.feed([token], last_only=True)[-1]


def _verify(logits: torch.Tensor, drafts: list[int], q: list[torch.Tensor],
            state: RowState) -> tuple[int, int]:
    """The acceptance rule over the target's raw *logits* [k + 1, V]: (number of drafts accepted, the token
    that follows them: the resample at the first rejection, or the bonus token)."""
    k = len(drafts)
    stateless = _stateless(state)
    fork = state if stateless else _fork(state)
    # without penalties every position's processing is independent: do them in one call
    batch = process_logits(logits.float(), [state] * (k + 1)) if stateless else None
    gen = state.generator
    for i in range(k + 1):
        scores = batch[i] if batch is not None else _scores(logits[i], fork)
        if state.params.greedy:
            best = int(scores.argmax())
            if i < k and drafts[i] == best:
                if fork is not state:
                    fork.observe(best)  # the next position is scored after this token (penalties, grammar)
                continue
            return i, best
        p = torch.softmax(scores, dim=-1)
        if i == k:                                   # every draft accepted: the bonus token from p_{k+1}
            return k, _draw(p, gen)
        x = drafts[i]
        px, qx = float(p[x]), float(q[i][x])
        r = float(torch.rand((), generator=gen, device=p.device))
        if qx > 0 and r < px / qx:
            if fork is not state:
                fork.observe(x)
            continue
        residual = torch.clamp(p - q[i], min=0)
        total = float(residual.sum())
        # p == q up to rounding leaves nothing to resample from; p itself is then the right distribution
        return i, _draw(residual / total if total > 0 else p, gen)
    raise AssertionError("unreachable")
