"""One preallocated pool of fixed-size KV blocks per model, with refcounts and a prefix cache.

Why blocks: a sequence's keys and values live in 16-token blocks anywhere in the pool, listed in its block
table, so a request joins or leaves a running batch without copying anyone's cache, and no slot is wasted on
padding (at most 15 tokens per sequence are unused, in its last block).

Why hashes: a FULL block is identified by its content *and* everything before it: ``hash((parent_hash,
token_ids))``, chained from the first block, so equal hashes mean the same tokens at the same positions and
therefore the same keys and values. Such a block can be shared by every sequence whose prompt starts the
same way (a system prompt, a chat history that grows turn by turn, n samples of one prompt). When its last
user lets go, a hashed block is not wiped: it waits in LRU order among the free blocks and is evicted (its hash
forgotten) only when an allocation finds no never-used block left.

Layout: ``k[layer]`` and ``v[layer]`` are ``[kv_heads, num_blocks * block_size, head_dim]``, head-major, so
gathering a batch's slots with one index gives ``[kv_heads, rows, slots, head_dim]``, contiguous: decode
attention multiplies it batched over (kv head, row) with no copy (slot-major pools gave a ``[rows, slots,
kv_heads, head_dim]`` gather that every attention matmul copied first: 11.3 against 5.5 ms a layer for 32
rows x 700 slots in bf16, the TinyLlama shape). Block 0 is never handed out: padding slots of a batch point
at it (they are masked out of attention).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

#: tokens per block (vLLM's default on GPUs; small enough that a short reply wastes little)
BLOCK_SIZE = 16

#: the hash chain's starting value (the "parent" of a sequence's first block)
ROOT_HASH = 0


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The content hash of one full block: its tokens and, through *parent*, every token before them."""
    return hash((parent, tuple(token_ids)))


class NoFreeBlocks(RuntimeError):
    """The pool has no free or evictable block left (the scheduler preempts a sequence and retries)."""


class BlockPool:
    """Keys/values of every sequence of one model, in blocks; the free list; refcounts; the prefix cache.

    Counters (for stats and tests): ``hits`` (blocks served from the prefix cache), ``evictions`` (cached
    blocks whose content was dropped to make room), ``preemptions`` (sequences the scheduler sent back to the
    queue because no block was left).
    """

    def __init__(self, num_blocks: int, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_size: int = BLOCK_SIZE):
        if num_blocks < 2:
            raise ValueError(f"a KV block pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (layers, kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refcount = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))   # never used (or wiped); pop() gives 1, 2, ...
        self._cached: OrderedDict[int, None] = OrderedDict()          # hashed, unreferenced; oldest first
        self._hash_of: dict[int, int] = {}                            # block -> its content hash
        self._block_of: dict[int, int] = {}                           # content hash -> block
        self.hits = 0
        self.evictions = 0
        self.preemptions = 0

    @staticmethod
    def bytes_for(num_blocks: int, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  block_size: int = BLOCK_SIZE) -> int:
        """Bytes a pool of *num_blocks* takes (keys and values)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * num_blocks * block_size * kv_heads * head_dim * item

    def stats(self) -> dict[str, int]:
        """What /sdapi/v1/memory reports for the pool (through the model manager's entry)."""
        return {"blocks": self.usable_blocks, "free_blocks": self.free_blocks, "cached_blocks": self.cached_blocks,
                "block_size": self.block_size, "hits": self.hits, "evictions": self.evictions,
                "preemptions": self.preemptions, "bytes": self.memory_bytes()}

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can hold at once (all but the reserved padding block)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.usable_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can get now: never-used ones plus cached ones nobody references."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    # -- allocation ---------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with refcount 1; evicts the least recently used cached block when none is unused."""
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.evictions += 1
        else:
            raise NoFreeBlocks(f"all {self.usable_blocks} KV blocks are in use")
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence uses *block* (a prefix-cache hit); a cached block leaves the LRU list."""
        if self.refcount[block] == 0:
            self._cached.pop(block)
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        """One user fewer; at zero a hashed block is kept for reuse (most recently used last), others are free."""
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} released more often than it was taken")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._hash_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def release_all(self, blocks: Sequence[int]) -> None:
        """Release a sequence's blocks, last first: its tail is evicted before the prefix others may share."""
        for block in reversed(blocks):
            self.release(block)

    # -- the prefix cache ---------------------------------------------------------------------------------
    def register(self, block: int, content_hash: int) -> None:
        """*block* is full and holds the tokens *content_hash* names. A hash already cached elsewhere keeps
        its first block (the duplicate simply stays private and is freed normally)."""
        if content_hash in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = content_hash
        self._block_of[content_hash] = block

    def lookup(self, content_hash: int) -> int | None:
        return self._block_of.get(content_hash)

    def is_cached(self, content_hash: int) -> bool:
        return content_hash in self._block_of

    def clear_cache(self) -> None:
        """Forget every cached hash (unreferenced cached blocks become free): prefix caching switched off."""
        for block in list(self._cached):
            del self._block_of[self._hash_of.pop(block)]
            self._free.append(block)
        self._cached.clear()
        for block in [b for b in self._hash_of]:
            del self._block_of[self._hash_of.pop(block)]
