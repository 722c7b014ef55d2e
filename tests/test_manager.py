"""Allocation lifecycle: allocate, extend, trim, free, fork/COW, prefix caching, and every error path."""

import numpy as np
import pytest

from kvhelpers import fill, kv_of, request, snapshot
from pagedkv_core import (
    InvalidArgument,
    OutOfBlocks,
    OutOfBounds,
    PrefixCacheConfig,
    SequenceExists,
    SequenceNotResident,
    UnknownSequence,
)


def test_allocate_reserves_whole_blocks(manager):
    handle = manager.allocate(request("a", n=9))
    table = handle.block_table
    assert table.num_blocks == 3 and table.num_tokens == 9 and table.free_slots == 3
    assert handle.is_valid() and handle.num_layers == 2 and handle.num_heads == 2 and handle.head_dim == 8
    assert manager.stats().used_blocks == 3
    manager.check_invariants()


def test_extend_fills_the_last_block_before_taking_another(manager):
    manager.allocate(request("a", n=3))
    manager.extend("a", 1)
    assert manager.get_handle("a").block_table.num_blocks == 1
    manager.extend("a", 1)
    assert manager.get_handle("a").block_table.num_blocks == 2
    manager.check_invariants()


def test_slots_follow_the_block_table(manager):
    manager.allocate(request("a", n=6))
    meta = manager.append_slots(["a"])
    table = manager.get_handle("a").block_table
    assert meta.slot_mapping.tolist() == [table.slot(6)]
    assert meta.seq_lens.tolist() == [7]


def test_trim_rolls_back_and_frees_emptied_blocks(manager):
    manager.allocate(request("a", n=9))
    manager.trim("a", 5)
    table = manager.get_handle("a").block_table
    assert table.num_tokens == 4 and table.num_blocks == 1
    assert manager.stats().used_blocks == 1
    manager.check_invariants()


def test_deallocate_returns_every_block(manager):
    handle = manager.allocate(request("a", n=20))
    manager.deallocate("a")
    assert not handle.is_valid()
    assert manager.stats().free_blocks == 16
    manager.check_invariants()


@pytest.mark.parametrize("call, error", [
    (lambda m: m.allocate(request("a", n=1)), SequenceExists),
    (lambda m: m.allocate(request("b", n=33 * 4)), OutOfBounds),
    (lambda m: m.allocate(request("b", n=14 * 4)), OutOfBlocks),
    (lambda m: m.extend("a", 14 * 4), OutOfBlocks),
    (lambda m: m.extend("zzz", 1), UnknownSequence),
    (lambda m: m.extend("a", -1), InvalidArgument),
    (lambda m: m.extend("a", 2, [1]), InvalidArgument),
    (lambda m: m.extend_batch(["a", "a"], [1, 1]), InvalidArgument),
    (lambda m: m.extend_batch(["a", "zzz"], [1, 1]), UnknownSequence),
    (lambda m: m.trim("a", 11), OutOfBounds),
    (lambda m: m.trim("a", -1), OutOfBounds),
    (lambda m: m.deallocate("zzz"), UnknownSequence),
    (lambda m: m.fork("a", "a"), SequenceExists),
    (lambda m: m.fork("zzz"), UnknownSequence),
    (lambda m: m.share_prefix("a", "b2", 0), OutOfBounds),
    (lambda m: m.share_prefix("a", "b2", 11), OutOfBounds),
    (lambda m: m.swap_in("a"), SequenceNotResident),
    (lambda m: m.batch_metadata(["a"], [11]), InvalidArgument),
    (lambda m: m.batch_metadata(["a"], [1, 2]), InvalidArgument),
], ids=["dup-id", "longer-than-a-row", "pool-too-small", "extend-too-far", "extend-unknown", "extend-negative",
        "token-count-mismatch", "dup-in-batch", "batch-with-unknown", "trim-too-much", "trim-negative",
        "free-unknown", "fork-onto-itself", "fork-unknown", "share-nothing", "share-too-much",
        "swap-in-running", "more-queries-than-tokens", "query-lens-shape"])
def test_errors_change_nothing(make_manager, call, error):
    m = make_manager(max_seq_len=128)
    m.allocate(request("a", tokens=range(10)))
    fill(m, ["a"], [10])
    before = snapshot(m)
    with pytest.raises(error):
        call(m)
    assert snapshot(m) == before
    m.check_invariants()


def test_out_of_blocks_carries_the_numbers(manager):
    manager.allocate(request("a", n=40))
    with pytest.raises(OutOfBlocks) as err:
        manager.allocate(request("b", n=40))
    assert (err.value.needed, err.value.available) == (10, 6)
    assert manager.stats().allocation_failures == 1


def test_batch_extend_is_all_or_nothing(manager):
    manager.allocate(request("a", n=4))
    manager.allocate(request("b", n=4))
    before = snapshot(manager)
    with pytest.raises(OutOfBlocks):
        manager.extend_batch(["a", "b"], [4, 60])
    assert snapshot(manager) == before


def test_fork_shares_blocks_and_copies_on_first_write(manager):
    manager.allocate(request("a", n=6))
    fill(manager, ["a"], [6])
    parent_before = kv_of(manager, "a")
    child = manager.fork("a", "b")
    assert child.block_table.block_ids == manager.get_handle("a").block_table.block_ids
    assert manager.stats().used_blocks == 2
    meta = manager.append_slots(["b"])
    fill(manager, ["b"], [1], seed=7)
    a_blocks = manager.get_handle("a").block_table.block_ids
    b_blocks = child.block_table.block_ids
    assert a_blocks[0] == b_blocks[0] and a_blocks[1] != b_blocks[1]  # full block shared, last one copied
    assert manager.stats().cow_copies == 1
    assert meta.slot_mapping.tolist() == [b_blocks[1] * 4 + 2]
    for got, want in zip(kv_of(manager, "a"), parent_before):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(kv_of(manager, "b"), parent_before):
        np.testing.assert_array_equal(got[:6], want)  # the child kept the shared tokens
    manager.check_invariants()


def test_fork_of_a_full_last_block_needs_no_copy(manager):
    manager.allocate(request("a", n=8))
    manager.fork("a", "b")
    manager.append_slots(["a", "b"])
    assert manager.stats().cow_copies == 0
    manager.check_invariants()


def test_clone_handle_names_the_fork(manager):
    handle = manager.allocate(request("a", n=3))
    clone = handle.clone_handle()
    assert clone.request_id.startswith("a#fork") and clone.num_tokens == 3


def test_prefix_hit_reuses_full_blocks_and_counts_hit_rate(manager):
    first = manager.allocate(request("a", tokens=range(10)))
    second = manager.allocate(request("b", tokens=list(range(8)) + [99, 98, 97]))
    assert second.num_cached_tokens == 8
    assert second.block_table.block_ids[:2] == first.block_table.block_ids[:2]
    stats = manager.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (21, 8)
    assert stats.cache_hit_rate == pytest.approx(8 / 21)
    manager.check_invariants()


def test_prefix_survives_deallocation_until_space_is_needed(manager):
    manager.allocate(request("a", tokens=range(8)))
    manager.deallocate("a")
    assert manager.allocate(request("b", tokens=range(9))).num_cached_tokens == 8
    manager.deallocate("b")
    manager.allocate(request("filler", n=16 * 4))  # takes every block, cached ones last
    manager.deallocate("filler")
    assert manager.allocate(request("c", tokens=range(9))).num_cached_tokens == 0


def test_full_prompt_hit_still_computes_the_last_token(manager):
    manager.allocate(request("a", tokens=range(8)))
    assert manager.allocate(request("b", tokens=range(8))).num_cached_tokens == 4


def test_tenant_salt_isolates_caches(manager):
    manager.allocate(request("a", tokens=range(9), cache_salt="tenant-1"))
    assert manager.allocate(request("b", tokens=range(9), cache_salt="tenant-2")).num_cached_tokens == 0
    assert manager.allocate(request("c", tokens=range(9), cache_salt="tenant-1")).num_cached_tokens == 8


def test_decode_tokens_extend_the_prefix_cache(manager):
    manager.allocate(request("a", tokens=range(3)))
    manager.append_slots(["a"], [3])
    manager.append_slots(["a"], [4])
    assert manager.allocate(request("b", tokens=range(6))).num_cached_tokens == 4


def test_decode_without_token_ids_stops_caching(manager):
    manager.allocate(request("a", tokens=range(3)))
    manager.append_slots(["a"])
    assert manager.allocate(request("b", tokens=range(6))).num_cached_tokens == 0


def test_min_prefix_length_ignores_short_hits(make_manager):
    m = make_manager(prefix_cache=PrefixCacheConfig(min_prefix_length=8))
    m.allocate(request("a", tokens=range(12)))
    assert m.allocate(request("b", tokens=list(range(4)) + [50] * 8)).num_cached_tokens == 0
    assert m.allocate(request("c", tokens=range(12))).num_cached_tokens == 8


def test_builtin_hash_gives_the_same_hits(make_manager):
    m = make_manager(prefix_cache=PrefixCacheConfig(hash_algorithm="builtin"))
    m.allocate(request("a", tokens=range(12)))
    assert m.allocate(request("b", tokens=range(12))).num_cached_tokens == 8


def test_prefix_caching_can_be_disabled_and_enabled(make_manager):
    m = make_manager(prefix_cache=None)
    m.allocate(request("a", tokens=range(9)))
    assert m.allocate(request("b", tokens=range(9))).num_cached_tokens == 0
    m.enable_prefix_caching(PrefixCacheConfig())
    m.allocate(request("c", tokens=range(9)))
    assert m.allocate(request("d", tokens=range(9))).num_cached_tokens == 8
    m.enable_prefix_caching(PrefixCacheConfig(enabled=False))
    assert m.allocate(request("e", tokens=range(9))).num_cached_tokens == 0


def test_trim_into_a_cached_block_unregisters_it(manager):
    manager.allocate(request("a", tokens=range(8)))
    manager.trim("a", 2)
    manager.append_slots(["a"], [77])
    assert manager.allocate(request("b", tokens=range(9))).num_cached_tokens == 4


def test_trim_of_a_shared_block_copies_on_next_write(manager):
    manager.allocate(request("a", tokens=range(8)))
    manager.allocate(request("b", tokens=range(9)))
    manager.trim("b", 3)  # b now ends inside the block it shares with a
    manager.append_slots(["b"], [5])
    assert manager.stats().cow_copies == 1
    assert manager.allocate(request("c", tokens=range(9))).num_cached_tokens == 8
    manager.check_invariants()


def test_share_prefix_into_a_new_and_an_empty_sequence(manager):
    manager.allocate(request("a", tokens=range(10)))
    manager.share_prefix("a", "b", 6)
    manager.allocate(request("c", n=0))
    manager.share_prefix("a", "c", 8)
    assert manager.get_handle("b").block_table.block_ids == manager.get_handle("a").block_table.block_ids[:2]
    assert manager.get_handle("c").num_tokens == 8
    with pytest.raises(SequenceExists):
        manager.share_prefix("a", "b", 4)  # b is not empty
    manager.append_slots(["b"], [6])
    assert manager.stats().cow_copies == 1
    manager.check_invariants()


def test_handles_and_stats(manager):
    manager.allocate(request("a", n=5))
    manager.fork("a", "b")
    assert [r for r, _ in manager.list_handles()] == ["a", "b"]
    stats = manager.get_handle("a").stats()
    assert stats.blocks_allocated == 2 and stats.tokens_stored == 5 and stats.shared_blocks == 2
    assert stats.utilization == pytest.approx(5 / 8)
    assert manager.get_handle("zzz") is None
    assert manager.get_handle("a").cache_id == "cpu/a"


def test_can_allocate_matches_allocate(manager):
    manager.allocate(request("a", tokens=range(40)))
    assert manager.can_allocate(request("b", tokens=range(40)))  # 9 of 10 blocks are hits
    assert not manager.can_allocate(request("c", tokens=[7] * 40))
    assert not manager.can_allocate(request("a", n=1))
    assert not manager.can_allocate(request("d", n=10_000))


def test_allocator_interface_tracks_outside_blocks(manager):
    allocator = manager.allocator
    blocks = allocator.allocate_blocks(3)
    assert allocator.free_block_count() == 13 and allocator.total_block_count() == 16
    assert allocator.block_size == 4
    manager.check_invariants()
    from pagedkv_core import InvalidBlock
    with pytest.raises(InvalidBlock):
        allocator.free_blocks([blocks[0], blocks[0]])
    allocator.free_blocks(blocks)
    assert allocator.free_block_count() == 16
    manager.check_invariants()


def test_allocate_batch_admits_all_or_nothing(manager):
    manager.allocate(request("warm", tokens=range(9)))
    manager.deallocate("warm")  # its two full blocks stay cached in the free queue
    handles = manager.allocate_batch([request("a", tokens=range(9)), request("b", n=20)])
    assert [h.num_cached_tokens for h in handles] == [8, 0]
    manager.check_invariants()
    before = snapshot(manager)
    with pytest.raises(OutOfBlocks):
        manager.allocate_batch([request("c", n=8), request("d", n=40)])
    with pytest.raises(SequenceExists):
        manager.allocate_batch([request("e", n=1), request("a", n=1)])
    with pytest.raises(InvalidArgument):
        manager.allocate_batch([request("f", n=1), request("f", n=1)])
    assert snapshot(manager) == before


def test_allocate_batch_pins_hits_before_taking_new_blocks(make_manager):
    m = make_manager(num_blocks=3)
    m.allocate(request("warm", tokens=range(5)))  # block 0 holds the cached prefix
    m.deallocate("warm")
    m.allocate(request("y", n=8))
    m.deallocate("y")
    assert list(m.pool.free_queue())[0] == 0 and m.pool.block_hash[0] is not None
    # allocated one by one, "new" would take block 0 from the head of the queue and evict the prefix
    handles = m.allocate_batch([request("new", n=4), request("hit", tokens=range(5))])
    assert handles[1].num_cached_tokens == 4
    m.check_invariants()
