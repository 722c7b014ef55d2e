"""The block pool: exact free-queue order, lazy eviction of cached blocks, O(1) removal from the middle."""

import pytest

from pagedkv_core import BlockPool, OutOfBlocks


def test_fresh_pool_hands_out_ascending_ids():
    pool = BlockPool(6, 4)
    assert pool.allocate(3) == [0, 1, 2]
    assert list(pool.free_queue()) == [3, 4, 5]


def test_freed_blocks_go_to_the_tail_in_the_order_given():
    pool = BlockPool(6, 4)
    blocks = pool.allocate(4)
    pool.free([blocks[3], blocks[1]])
    assert list(pool.free_queue()) == [4, 5, 3, 1]
    assert pool.allocate(3) == [4, 5, 3]


def test_cached_free_block_stays_findable_until_reused():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(3)
    pool.register(a, "h-a")
    pool.register(b, "h-b")
    pool.free([b, a])  # b freed first: it is evicted first
    assert pool.lookup("h-a") == a and pool.lookup("h-b") == b
    assert list(pool.free_cached) == [b, a]
    assert pool.allocate(1) == [b]  # reusing b's space forgets its hash
    assert pool.lookup("h-b") is None and pool.lookup("h-a") == a
    assert pool.evicted_cached == 1


def test_hit_removes_a_block_from_the_middle_of_the_queue():
    pool = BlockPool(5, 4)
    blocks = pool.allocate(5)
    pool.register(blocks[2], "mid")
    pool.free(blocks)
    assert list(pool.free_queue()) == [0, 1, 2, 3, 4]
    pool.incref(pool.lookup("mid"))
    assert list(pool.free_queue()) == [0, 1, 3, 4]
    assert pool.ref[2] == 1 and pool.num_free == 4


def test_shared_block_returns_to_the_queue_only_with_its_last_reference():
    pool = BlockPool(2, 4)
    (a,) = pool.allocate(1)
    pool.incref(a)
    assert pool.free([a]) == 0 and pool.num_free == 1
    assert pool.free([a]) == 1 and pool.num_free == 2
    assert pool.block_ops == 4  # allocate, incref, two releases


def test_out_of_blocks_reports_numbers_and_changes_nothing():
    pool = BlockPool(3, 4)
    pool.allocate(2)
    with pytest.raises(OutOfBlocks) as err:
        pool.allocate(2)
    assert (err.value.needed, err.value.available) == (2, 1)
    assert list(pool.free_queue()) == [2]


def test_max_cached_forgets_least_recently_freed_first():
    pool = BlockPool(4, 4, max_cached=2)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks[:2]):
        pool.register(b, f"h{i}")
    pool.free(blocks[:2])
    assert pool.register(blocks[2], "h2")  # forgets h0 (freed first)
    assert pool.lookup("h0") is None and pool.lookup("h1") == blocks[1]


def test_ttl_expires_old_free_cached_blocks():
    now = [0.0]
    pool = BlockPool(2, 4, clock=lambda: now[0])
    a, b = pool.allocate(2)
    pool.register(a, "a")
    pool.register(b, "b")
    pool.free([a])
    now[0] = 10.0
    pool.free([b])
    assert pool.expire_cached(5.0) == 1
    assert pool.lookup("a") is None and pool.lookup("b") == b
