"""Data movement through the storage: swap, compression, defragmentation, fragmentation figures."""

import numpy as np
import pytest

from kvhelpers import fill, kv_of, request, snapshot
from pagedkv_core import OutOfBlocks, OutOfHostBlocks, SeqState, SequenceNotResident, UnsupportedOperation


def test_swap_out_and_in_is_bit_exact(manager):
    manager.allocate(request("a", tokens=range(10)))
    fill(manager, ["a"], [10])
    before = kv_of(manager, "a")
    manager.swap_out("a")
    handle = manager.get_handle("a")
    assert handle.state is SeqState.SWAPPED
    stats = manager.stats()
    assert (stats.used_blocks, stats.host_blocks_used, stats.swapped_caches) == (0, 3, 1)
    manager.allocate(request("other", n=40))  # reuse the freed device blocks
    fill(manager, ["other"], [40], seed=3)
    manager.deallocate("other")
    manager.swap_in("a")
    for got, want in zip(kv_of(manager, "a"), before):
        np.testing.assert_array_equal(got, want)
    assert manager.stats().host_blocks_used == 0
    manager.check_invariants()


def test_swap_in_re_registers_prefix_hashes(manager):
    manager.allocate(request("a", tokens=range(9)))
    manager.swap_out("a")
    manager.allocate(request("filler", n=64))
    manager.deallocate("filler")  # the device copies of a's blocks are gone
    manager.swap_in("a")
    assert manager.allocate(request("b", tokens=range(9))).num_cached_tokens == 8


def test_swap_errors_change_nothing(make_manager):
    m = make_manager(num_host_blocks=2)
    m.allocate(request("a", n=10))
    before = snapshot(m)
    with pytest.raises(OutOfHostBlocks) as err:
        m.swap_out("a")
    assert (err.value.needed, err.value.available) == (3, 2)
    assert snapshot(m) == before
    m.allocate(request("b", n=4))
    m.swap_out("b")
    with pytest.raises(SequenceNotResident):
        m.swap_out("b")
    with pytest.raises(SequenceNotResident):
        m.extend("b", 1)
    m.allocate(request("c", n=13 * 4))  # the pool is now full
    before = snapshot(m)
    with pytest.raises(OutOfBlocks):
        m.swap_in("b")
    assert snapshot(m) == before
    m.check_invariants()


def test_deallocating_a_swapped_sequence_frees_its_host_blocks(manager):
    manager.allocate(request("a", n=10))
    manager.swap_out("a")
    manager.deallocate("a")
    assert manager.stats().host_blocks_used == 0
    manager.check_invariants()


def test_compress_cache_quantizes_to_int8_on_the_host(manager):
    manager.allocate(request("a", n=10))
    fill(manager, ["a"], [10])
    before = kv_of(manager, "a")
    manager.compress_cache("a")
    stats = manager.compression_stats()
    assert stats.compressed_caches == 1
    assert stats.avg_compression_ratio == pytest.approx((4 * 2 * 8 + 2 * 4) / (4 * 2 * 8 * 4))
    assert stats.memory_saved_bytes > 0
    manager.swap_in("a")
    for got, want in zip(kv_of(manager, "a"), before):
        scale = np.abs(want).max() / 127
        np.testing.assert_allclose(got, want, atol=scale * 0.51)
    assert manager.compression_stats().compressed_caches == 0


def test_compress_cache_refuses_an_unreachable_ratio(manager):
    manager.allocate(request("a", n=4))
    before = snapshot(manager)
    with pytest.raises(UnsupportedOperation):
        manager.compress_cache("a", compression_ratio=0.1)
    assert snapshot(manager) == before


def test_compress_cache_of_an_int8_pool_is_unsupported(make_manager):
    m = make_manager(dtype="int8")
    m.allocate(request("a", n=4))
    with pytest.raises(UnsupportedOperation):
        m.compress_cache("a")


def test_defragment_compacts_and_keeps_data(manager):
    for i in range(6):
        manager.allocate(request(f"s{i}", n=8))
        fill(manager, [f"s{i}"], [8], seed=i)
    for i in (0, 2, 4):
        manager.deallocate(f"s{i}")
    before = {r: kv_of(manager, r) for r in ("s1", "s3", "s5")}
    frag = manager.fragmentation_stats()
    assert frag.holes == 6 and frag.used_blocks == 6
    result = manager.defragment()
    assert result.moved_blocks == 4 and result.holes_before == 6 and result.holes_after == 0
    used = sorted(b for r in before for b in manager.get_handle(r).block_table.block_ids)
    assert used == list(range(6))
    assert list(manager.pool.free_queue()) == list(range(6, 16))
    for rid, kv in before.items():
        for got, want in zip(kv_of(manager, rid), kv):
            np.testing.assert_array_equal(got, want)
    assert manager.fragmentation_stats().holes == 0
    manager.check_invariants()


def test_defragment_keeps_cached_free_blocks_findable(manager):
    manager.allocate(request("pad", n=8))
    manager.allocate(request("a", tokens=range(9)))
    manager.deallocate("pad")
    manager.deallocate("a")
    manager.defragment()
    assert manager.allocate(request("b", tokens=range(9))).num_cached_tokens == 8
    manager.check_invariants()


def test_fragmentation_stats_counts_waste_and_runs(manager):
    manager.allocate(request("a", n=5))  # 3 slots wasted
    manager.allocate(request("b", n=4))
    manager.allocate(request("c", n=1))  # 3 slots wasted
    manager.deallocate("b")
    frag = manager.fragmentation_stats()
    assert frag.wasted_token_slots == 6
    assert frag.holes == 1
    assert frag.largest_free_run == 12
    assert frag.fragmentation_ratio == pytest.approx(1 - 12 / 13)
    assert frag.avg_tokens_per_block == pytest.approx((4 + 1 + 1) / 3)


def test_defragment_leaves_allocator_blocks_in_place(manager):
    manager.allocate(request("a", n=8))
    scratch = manager.allocator.allocate_blocks(2)  # blocks 2, 3
    manager.allocate(request("b", n=8))  # blocks 4, 5
    manager.deallocate("a")
    manager.defragment()
    assert manager.get_handle("b").block_table.block_ids == (0, 1)
    assert all(manager.pool.ref[b] == 1 for b in scratch)
    manager.check_invariants()
    manager.allocator.free_blocks(scratch)
    manager.check_invariants()
