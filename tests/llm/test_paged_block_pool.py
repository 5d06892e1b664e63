"""The KV block pool and the scheduler's bookkeeping, without a model."""
import pytest
import torch

from modules.llm.paged.block_pool import BlockPool, NoFreeBlocks, block_hash
from modules.llm.paged.paged_cache import BlockTable, PagedBatch, match_prefix, prefix_hashes


def pool(blocks=6, size=4):
    return BlockPool(blocks, layers=2, kv_heads=2, head_dim=3, dtype=torch.float32, block_size=size)


def test_allocate_free_and_refcounts():
    p = pool()
    assert p.free_blocks == p.usable_blocks == 5
    got = [p.allocate() for _ in range(5)]
    assert sorted(got) == [1, 2, 3, 4, 5] and 0 not in got   # block 0 is the padding block
    with pytest.raises(NoFreeBlocks):
        p.allocate()
    p.share(got[0])
    p.release(got[0])
    assert p.free_blocks == 0 and p.refcount[got[0]] == 1
    p.release(got[0])
    assert p.free_blocks == 1
    with pytest.raises(ValueError):
        p.release(got[0])


def test_hash_chain_depends_on_position_and_content():
    a = block_hash(0, [1, 2, 3, 4])
    assert a == block_hash(0, [1, 2, 3, 4])
    assert a != block_hash(0, [1, 2, 3, 5])
    assert block_hash(a, [1, 2, 3, 4]) != a            # same tokens, later position
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 9) == [a, block_hash(a, [5, 6, 7, 8])]
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 7) == [a]   # only full blocks within the limit


def test_cached_blocks_are_reused_then_evicted_lru_first():
    p = pool(blocks=4)            # 3 usable
    tokens = list(range(12))
    table = BlockTable(p)
    table.add([p.allocate() for _ in range(3)])
    table.register_full_blocks(tokens, 12)
    first_blocks = list(table.blocks)
    table.free()
    assert p.free_blocks == 3 and p.cached_blocks == 3
    hashes = prefix_hashes(tokens, 4, 12)
    assert match_prefix(p, hashes) == first_blocks
    # a different sequence needs 2 blocks: the least recently used cached ones go (released last-first, so
    # the sequence's tail is the oldest entry and the shared prefix survives longest)
    other = [p.allocate(), p.allocate()]
    assert p.evictions == 2
    assert match_prefix(p, hashes) == first_blocks[:1]
    assert set(other) == set(first_blocks[1:])
    p.share(first_blocks[0])      # a hit takes the block out of the LRU list
    assert p.cached_blocks == 0
    with pytest.raises(NoFreeBlocks):
        p.allocate()


def test_clear_cache_frees_unreferenced_cached_blocks():
    p = pool()
    t = BlockTable(p)
    t.add([p.allocate()])
    t.register_full_blocks([1, 2, 3, 4], 4)
    t.free()
    assert p.cached_blocks == 1
    p.clear_cache()
    assert p.cached_blocks == 0 and p.free_blocks == 5 and match_prefix(p, prefix_hashes([1, 2, 3, 4], 4, 4)) == []


def test_a_decode_pass_writes_each_new_token_into_its_block_and_gathers_whole_blocks_left_aligned():
    p = pool(blocks=8)
    a, b = BlockTable(p), BlockTable(p)
    a.add([p.allocate(), p.allocate()])    # 5 cached + 1 new
    b.add([p.allocate()])                  # 2 cached + 1 new
    p.k[0, :, a.slots(0, 5)] = 1.0
    p.k[0, :, b.slots(0, 2)] = 2.0
    view = PagedBatch(p, [a, b], cached=[5, 2], new=[1, 1], device=torch.device("cpu"))
    assert (view.length, view.batch_size, view.max_len) == (7, 2, 8)        # two blocks of 4 per row
    assert view.positions.tolist() == [[5], [2]]
    assert view.key_mask.tolist() == [[True] * 6 + [False] * 2, [True] * 3 + [False] * 5]
    k = torch.full((2, 2, 1, 3), 7.0)
    keys, values = view.append(0, k, k)
    assert keys.shape == (2, 2, 8, 3)
    assert (p.k[0, :, a.slots(5, 6)] == 7).all() and (p.k[0, :, b.slots(2, 3)] == 7).all()
    assert keys[0, 0, :6, 0].tolist() == [1, 1, 1, 1, 1, 7]
    assert keys[1, 0, :3, 0].tolist() == [2, 2, 7]


def test_a_pass_with_longer_chunks_gathers_rows_right_aligned():
    p = pool(blocks=8)
    a, b = BlockTable(p), BlockTable(p)
    a.add([p.allocate(), p.allocate()])    # 4 cached + 2 new
    b.add([p.allocate()])                  # 2 cached + 1 new
    p.k[0, :, a.slots(0, 4)] = 1.0
    p.k[0, :, b.slots(0, 2)] = 2.0
    view = PagedBatch(p, [a, b], cached=[4, 2], new=[2, 1], device=torch.device("cpu"))
    assert (view.length, view.batch_size, view.max_len) == (4, 2, 6)
    assert view.positions.tolist() == [[4, 5], [0, 2]]
    assert view.key_mask.tolist() == [[True] * 6, [False, False, False, True, True, True]]
    k = torch.full((2, 2, 2, 3), 7.0)
    keys, _ = view.append(0, k, k)
    assert keys[0, 0, :, 0].tolist() == [1, 1, 1, 1, 7, 7]
    assert keys[1, 0, 3:, 0].tolist() == [2, 2, 7]


def test_paged_batch_left_pads_short_chunks():
    p = pool(blocks=8)
    a, b = BlockTable(p), BlockTable(p)
    a.add([p.allocate()])
    b.add([p.allocate()])
    view = PagedBatch(p, [a, b], cached=[0, 1], new=[3, 1], device=torch.device("cpu"))
    assert view.positions.tolist() == [[0, 1, 2], [0, 0, 1]]
    k = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 2, 3, 3).contiguous()
    view.append(1, k, k)
    assert p.k[1, 0, a.slots(0, 3), 0].tolist() == [0, 1, 2]
    assert p.k[1, 0, b.slots(1, 2), 0].tolist() == [5]      # only the real (last) query of row b is written
