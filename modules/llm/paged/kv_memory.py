"""How big a model's KV block pool is, and the error for a request that can never fit it.

``llm.kv_cache_mb`` sets the pool size; 0 means automatic: :data:`AUTO_BUDGET_SHARE` of the memory the model
manager could still give out once the model is loaded, but never more than ``max_batch`` full-context rows
need (a bigger pool could never be used) and never less than one full-context row (so any request that fits
the context fits the pool). The pool is allocated once per loaded model and freed with it.
"""
from __future__ import annotations

from typing import Any

import torch

from modules.llm.paged.block_pool import BLOCK_SIZE, BlockPool

#: the share of the model manager's free budget an automatic pool takes
AUTO_BUDGET_SHARE = 0.25

MB = 1024 * 1024


class KVCacheExhausted(ValueError):
    """One request needs more KV cache than the whole pool holds: it could never run."""


def _shape(llm: Any) -> dict:
    config = llm.config
    return dict(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                dtype=llm.model.model.embed_tokens.weight.dtype)


def bytes_per_token(llm: Any) -> int:
    return BlockPool.bytes_for(1, block_size=1, **_shape(llm))


def pool_blocks(llm: Any, *, kv_cache_mb: int, max_batch: int, free_bytes: int | None) -> int:
    """Blocks (including the reserved padding block) for *llm*'s pool under the setting *kv_cache_mb*."""
    ctx = int(llm.config.max_position_embeddings)
    per_block = bytes_per_token(llm) * BLOCK_SIZE
    row_blocks = -(-ctx // BLOCK_SIZE)
    if kv_cache_mb > 0:
        blocks = int(kv_cache_mb * MB // per_block)
    else:
        most = row_blocks * max_batch
        share = int(AUTO_BUDGET_SHARE * free_bytes // per_block) if free_bytes is not None else most
        blocks = max(row_blocks, min(most, share))
    return max(2, blocks + 1)


def new_pool(llm: Any, num_blocks: int) -> BlockPool:
    return BlockPool(num_blocks, device=llm.device, **_shape(llm))


def check_fits(prompt_len: int, max_new: int, pool: BlockPool) -> None:
    """Raise KVCacheExhausted when *prompt_len* + *max_new* tokens can never be held by *pool*."""
    need = prompt_len + max_new - 1      # the last sampled token is never fed back
    if need > pool.capacity_tokens:
        raise KVCacheExhausted(
            f"this request needs KV cache for {need} tokens ({prompt_len} prompt + {max_new} new) but the whole "
            f"KV cache holds {pool.capacity_tokens} tokens; lower max_tokens or shorten the prompt, or raise "
            f"the llm.kv_cache_mb setting (now {pool.memory_bytes() / MB:.0f} MB) and reload the model")
