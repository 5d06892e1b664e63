"""Which sequences run in the next step, and how many tokens each feeds.

vLLM's policy, reduced to what one CPU process needs:

* FIFO admission: waiting sequences start in arrival order while the batch has room (``max_running``) and
  the pool has blocks for their first chunk; nothing overtakes the head of the queue.
* A per-step token budget: every running decode row feeds its one token each step (decode rows never wait
  for a prompt); what is left of the budget goes to prompts, in chunks, oldest first. A long prompt is
  therefore prefilled over several steps while the other streams keep getting a token every step.
* Preemption by recompute: when a running row needs a block and none is free (or evictable), the newest
  running row gives all its blocks back and goes to the *front* of the queue; when readmitted it prefills its
  prompt plus the tokens it had generated and continues where it stopped. Its sampler state lives in the row,
  so the output equals an unpreempted run.
* Prefix caching: at admission the longest run of cached full blocks of the sequence is shared instead of
  computed (``cached_tokens``); a sequence whose next block is being computed by another running prompt
  waits for it (so n samples of one prompt prefill it once).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from modules.llm.paged.block_pool import BlockPool
from modules.llm.paged.paged_cache import BlockTable, match_prefix, prefix_hashes

#: tokens one step may feed (decode rows count one each); bounds a step's latency and attention memory
DEFAULT_TOKEN_BUDGET = 256


class Sequence:
    """A row of the engine (:class:`modules.llm.engine._Row`) and its place in the KV pool."""

    def __init__(self, row: Any, pool: BlockPool, order: int):
        self.row = row
        self.table = BlockTable(pool)
        self.order = order          # arrival number: "newest" for preemption
        self.computed = 0           # positions whose keys/values are in the pool
        self.cached_tokens = 0      # prompt tokens the prefix cache served (first admission)
        self.admitted_once = False
        self.preemptions = 0
        self.prompt_hashes: list[int] = []

    def token_ids(self) -> list[int]:
        """Everything the model must have seen: the prompt and every sampled token."""
        return self.row.request.prompt_ids + self.row.tokens

    @property
    def total(self) -> int:
        return self.row.prompt_len + len(self.row.tokens)

    @property
    def pending(self) -> int:
        return self.total - self.computed

    def free(self) -> None:
        self.table.free()
        self.computed = 0


@dataclass
class Step:
    """What one step feeds: ``(sequence, new tokens)`` pairs; sequences are never listed twice."""
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_running: int, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 prefix_caching: bool = True):
        if token_budget < 1 or max_running < 1:
            raise ValueError("token_budget and max_running must be positive")
        self.pool = pool
        self.max_running = max_running
        self.token_budget = max(token_budget, max_running)   # every decode row must fit one step
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = 0

    def add(self, row: Any) -> Sequence:
        seq = Sequence(row, self.pool, self._arrivals)
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    @property
    def sequences(self) -> list[Sequence]:
        return self.running + list(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, seq: Sequence) -> None:
        """*seq* is done (or cancelled): its blocks go back to the pool at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.free()

    # -- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> Step:
        step = Step()
        budget = self.token_budget - sum(1 for s in self.running if s.pending == 1)
        for seq in list(self.running):
            if seq not in self.running:      # preempted while making room for an older row
                continue
            n = 1 if seq.pending == 1 else min(seq.pending, budget)
            if n <= 0:
                continue
            if not self._reserve(seq, seq.computed + n, step):
                continue                     # it was preempted itself
            if seq.pending == 1:
                step.decode.append(seq)
            else:
                step.prefill.append((seq, n))
                budget -= n
        self._admit(step, budget)
        return step

    def _reserve(self, seq: Sequence, n_tokens: int, step: Step) -> bool:
        """Blocks for *seq* to hold *n_tokens*, preempting the newest running rows until they fit. False when
        *seq* itself had to go."""
        while seq.table.blocks_needed(n_tokens) > self.pool.free_blocks:
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim, step)
            if victim is seq:
                return False
        seq.table.add([self.pool.allocate() for _ in range(seq.table.blocks_needed(n_tokens))])
        return True

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        step.decode = [s for s in step.decode if s is not seq]
        step.prefill = [(s, n) for s, n in step.prefill if s is not seq]
        seq.free()
        seq.preemptions += 1
        self.pool.preemptions += 1
        step.preempted.append(seq)
        self.waiting.appendleft(seq)

    def _in_flight(self) -> set[int]:
        """Hashes of prompt blocks running rows are computing right now (not yet in the prefix cache)."""
        out: set[int] = set()
        for seq in self.running:
            out.update(seq.prompt_hashes[len(seq.table.hashes):])
        return out

    def _admit(self, step: Step, budget: int) -> None:
        in_flight = self._in_flight() if self.prefix_caching else set()
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            ids = seq.token_ids()
            shared: list[int] = []
            if self.prefix_caching:
                # at least the last token is computed: its logits pick the next token
                seq.prompt_hashes = prefix_hashes(ids, self.pool.block_size, len(ids))
                if not seq.row.wants_prompt_logits or seq.admitted_once:
                    usable = prefix_hashes(ids, self.pool.block_size, len(ids) - 1)
                    shared = match_prefix(self.pool, usable)
                if len(seq.prompt_hashes) > len(shared) and seq.prompt_hashes[len(shared)] in in_flight:
                    break                    # another row is computing this block: share it next step
            start = len(shared) * self.pool.block_size
            n = min(len(ids) - start, budget)
            new_blocks = -(-(start + n) // self.pool.block_size) - len(shared)
            # shared blocks that sit in the LRU list are not free for this row's new blocks
            evictable_shared = sum(1 for b in shared if self.pool.refcount[b] == 0)
            if new_blocks > self.pool.free_blocks - evictable_shared:
                break                        # wait for running rows to finish (FIFO: nobody overtakes)
            self.waiting.popleft()
            for block in shared:
                self.pool.share(block)
            seq.table.add(shared)
            seq.table.hashes = list(seq.prompt_hashes[:len(shared)])
            seq.table.add([self.pool.allocate() for _ in range(new_blocks)])
            seq.computed = start
            self.pool.hits += len(shared)
            if not seq.admitted_once:
                seq.cached_tokens = seq.row.cached_tokens = start
            seq.admitted_once = True
            self.running.append(seq)
            if n == 1:
                step.decode.append(seq)
            else:
                step.prefill.append((seq, n))
            budget -= n
            in_flight.update(seq.prompt_hashes[len(shared):])
