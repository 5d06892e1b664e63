"""Per-sequence block tables, and the view one forward pass of the model attends through.

The model (:class:`modules.llm.model.Llama`) knows nothing of blocks: it calls ``cache.append(layer, k, v)``
and attends to what comes back, with the ``key_mask`` and ``positions`` it is given, exactly as it does for
the contiguous left-padded cache. :class:`PagedBatch` is that cache for one forward pass over rows of different
lengths: ``append`` scatters each row's new keys/values into its own blocks, then gathers every row's slots
into a right-aligned ``[B, K, S, hd]`` view (one ``index_select`` per layer into a head-major
``[K, B, S, hd]`` tensor; the index is built once per pass), and the key mask hides the slots left of a
shorter row (a pass of one new token per row gathers whole blocks instead: :meth:`PagedBatch._decode_layout`).
Rows feeding fewer new tokens than the longest are left-padded in the query dimension; their padding
queries are computed and thrown away (their keys are never written), so the last query of every row is its
real last token (``last_only`` works).

Measured on this CPU: the gather costs about as much as the attention that reads it, and both are small next
to the weight reads of a decode step, so a custom paged-attention kernel would buy little here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from modules.llm.paged.block_pool import ROOT_HASH, BlockPool, block_hash


class BlockTable:
    """The blocks of one sequence, in order, and the pool slot of each of its token positions."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self._slots = torch.empty(0, dtype=torch.long)
        #: content hashes of the leading full blocks already registered in the prefix cache
        self.hashes: list[int] = []

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def blocks_needed(self, n_tokens: int) -> int:
        """More blocks needed to hold *n_tokens* positions."""
        size = self.pool.block_size
        return max(0, -(-n_tokens // size) - len(self.blocks))

    def add(self, blocks: Sequence[int]) -> None:
        if not blocks:
            return
        size = self.pool.block_size
        new = (torch.tensor(list(blocks), dtype=torch.long)[:, None] * size + torch.arange(size)).view(-1)
        self.blocks.extend(blocks)
        self._slots = torch.cat([self._slots, new])

    def slots(self, start: int, end: int) -> torch.Tensor:
        return self._slots[start:end]

    def free(self) -> None:
        """Give every block back to the pool (hashed ones stay cached for reuse)."""
        self.pool.release_all(self.blocks)
        self.blocks, self.hashes = [], []
        self._slots = torch.empty(0, dtype=torch.long)

    def register_full_blocks(self, token_ids: Sequence[int], computed: int) -> None:
        """Hash and register every block that is now full of computed tokens (prefix caching)."""
        size = self.pool.block_size
        while (len(self.hashes) + 1) * size <= computed:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else ROOT_HASH
            h = block_hash(parent, token_ids[i * size:(i + 1) * size])
            self.pool.register(self.blocks[i], h)
            self.hashes.append(h)


def prefix_hashes(token_ids: Sequence[int], block_size: int, limit: int) -> list[int]:
    """The hash chain of the full blocks within the first *limit* tokens."""
    hashes: list[int] = []
    parent = ROOT_HASH
    for i in range(min(limit, len(token_ids)) // block_size):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def match_prefix(pool: BlockPool, hashes: Sequence[int]) -> list[int]:
    """The cached blocks for the longest run of *hashes* from the start (not yet shared)."""
    blocks = []
    for h in hashes:
        block = pool.lookup(h)
        if block is None:
            break
        blocks.append(block)
    return blocks


class PagedBatch:
    """The cache one forward pass sees: row j has ``cached[j]`` tokens in its blocks and feeds ``new[j]``.

    Satisfies what :meth:`Llama.forward` asks of a cache (``length``, ``batch_size``, ``max_len``,
    ``append``); ``positions`` and ``key_mask`` are the arguments to pass with it.
    """

    def __init__(self, pool: BlockPool, tables: Sequence[BlockTable], cached: Sequence[int], new: Sequence[int],
                 device: torch.device):
        self.pool = pool
        self._blocks = None
        if len(tables) > 1 and all(n == 1 for n in new):
            self._decode_layout(tables, cached, device)
            return
        B, T = len(tables), max(new)
        S = max(c + n for c, n in zip(cached, new))
        self.batch_size, self.length, self.max_len = B, S - T, S
        gather = torch.zeros((B, S), dtype=torch.long)           # slot 0.. belong to the reserved block 0
        positions = torch.zeros((B, T), dtype=torch.long)
        dst = []
        ragged = False
        for j, (table, c, n) in enumerate(zip(tables, cached, new)):
            gather[j, S - c - n:] = table.slots(0, c + n)
            positions[j, T - n:] = torch.arange(c, c + n)
            dst.append(table.slots(c, c + n))
            ragged = ragged or c + n < S
        self._gather = gather.view(-1).to(device)
        self._dst = torch.cat(dst).to(device)
        #: None when every query is real (no left padding of the new tokens)
        self._src = None
        if any(n < T for n in new):
            self._src = torch.cat([torch.arange(j * T + T - n, (j + 1) * T) for j, n in enumerate(new)]).to(device)
        self.positions = positions.to(device)
        self.key_mask = None
        if ragged:
            mask = torch.arange(S)[None, :] >= (S - torch.tensor([c + n for c, n in zip(cached, new)]))[:, None]
            self.key_mask = mask.to(device)
        self._shape = (B, T, S)

    def _decode_layout(self, tables: Sequence[BlockTable], cached: Sequence[int], device: torch.device) -> None:
        """A pass where every row feeds one token: rows are gathered whole blocks at a time, left-aligned.

        Why: a block holds 16 slots of one K/V head side by side, so gathering block ids copies 16x longer
        runs than gathering slot ids (2 KB instead of 128 B for the TinyLlama shape): 0.9 against 1.6 ms a
        layer for 32 rows x 700 slots. The right-aligned slot layout of other passes cannot do that (a row's
        start is rarely on a block boundary), and it does not need to here: with one query per row no causal
        mask applies, the key mask marks each row's slots 0 .. cached (its new token last), and
        :meth:`Llama._attention_mask` lets a one-token query see exactly its row's marked keys.
        """
        size = self.pool.block_size
        lengths = [c + 1 for c in cached]
        M = max(-(-n // size) for n in lengths)
        B, S = len(tables), M * size
        self.batch_size, self.length, self.max_len = B, S - 1, S
        blocks = torch.zeros((B, M), dtype=torch.long)             # block 0: the reserved padding block
        for j, (table, n) in enumerate(zip(tables, lengths)):
            used = -(-n // size)
            blocks[j, :used] = torch.tensor(table.blocks[:used], dtype=torch.long)
        self._blocks = blocks.view(-1).to(device)
        self._dst = torch.cat([table.slots(c, c + 1) for table, c in zip(tables, cached)]).to(device)
        self._src = None
        self.positions = torch.tensor(cached, dtype=torch.long)[:, None].to(device)
        self.key_mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        self._shape = (B, 1, S)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the rows' new k, v (B, K, T, hd) into their blocks; return every row's slots (B, K, S, hd)."""
        B, T, S = self._shape
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]                 # (K, slots, hd) each
        heads, hd = pool_k.shape[0], pool_k.shape[2]
        for pool_t, new in ((pool_k, k), (pool_v, v)):
            flat = new.transpose(0, 1).reshape(heads, B * T, hd)
            if self._src is not None:
                flat = flat.index_select(1, self._src)
            pool_t.index_copy_(1, self._dst, flat.to(pool_t.dtype))
        # (B, K, S, hd) views of contiguous (K, B, S, hd) gathers: see the pool's layout note
        if self._blocks is not None:
            size = self.pool.block_size
            keys = pool_k.view(heads, -1, size * hd).index_select(1, self._blocks)
            values = pool_v.view(heads, -1, size * hd).index_select(1, self._blocks)
        else:
            keys = pool_k.index_select(1, self._gather)
            values = pool_v.index_select(1, self._gather)
        return keys.view(heads, B, S, hd).transpose(0, 1), values.view(heads, B, S, hd).transpose(0, 1)
