"""Layer groups: configuration, layout, and the hybrid manager's bookkeeping (no kernels)."""

from __future__ import annotations

import dataclasses

import pytest

from pagedkv_core import (
    AllocationRequest,
    CacheConfig,
    HybridCacheManager,
    InvalidArgument,
    LayerGroup,
    OutOfBlocks,
    OutOfBounds,
    PrefixCacheConfig,
    SequenceExists,
    UnknownSequence,
)

BS = 4


def _config(groups, num_layers, num_blocks=256, **kw) -> CacheConfig:
    return CacheConfig(num_layers=num_layers, num_kv_heads=1, head_dim=4, num_blocks=num_blocks, block_size=BS,
                       layer_groups=groups, **kw)


def _gemma_like(num_blocks=256, window=8, **kw) -> HybridCacheManager:
    groups = (LayerGroup.full([5]), LayerGroup.sliding(window, [0, 1, 2, 3, 4]))  # cache group 0 is the full one
    return HybridCacheManager.create(_config(groups, 6, num_blocks, **kw))


def _snapshot(m: HybridCacheManager):
    """Everything a failed call must leave as it was."""
    seqs = {(g.cache_group.index, s.request_id): (list(s.blocks), s.num_tokens, s.live_from, list(s.hashes))
            for g in m.groups for s in g.sequences}
    tables = [g.sequences.tables.tables.copy().tolist() for g in m.groups]
    return (list(m.pool.ref), list(m.pool.free_queue()), dict(m.pool.cached), seqs, tables,
            [dict(s.owner) for s in m.states])


# -- configuration -------------------------------------------------------------------


def test_groups_must_cover_every_layer_once():
    with pytest.raises(InvalidArgument, match="exactly once"):
        _config((LayerGroup.full([0, 1]),), 3)
    with pytest.raises(InvalidArgument, match="exactly once"):
        _config((LayerGroup.full([0, 1]), LayerGroup.sliding(4, [1, 2])), 3)
    with pytest.raises(InvalidArgument, match="KV blocks"):
        _config((LayerGroup.state((4,), "float32", [0], slots=2),), 1)


@pytest.mark.parametrize("make", [
    lambda: LayerGroup.sliding(0, [0]),
    lambda: LayerGroup.chunked_local(-1, [0]),
    lambda: LayerGroup("sliding", (0,)),
    lambda: LayerGroup("full", (0,), window=4),
    lambda: LayerGroup("diagonal", (0,)),
    lambda: LayerGroup.full([]),
    lambda: LayerGroup.full([0, 0]),
    lambda: LayerGroup.state((0,), "float32", [0], slots=1),
    lambda: LayerGroup.state((4,), "complex", [0], slots=1),
    lambda: LayerGroup.state((4,), "float32", [0], slots=0),
], ids=["window0", "chunk<0", "no-window", "full-with-window", "kind", "empty", "twice", "shape", "dtype", "slots"])
def test_bad_groups_raise_typed_errors(make):
    with pytest.raises(InvalidArgument):
        make()


def test_layout_cuts_groups_into_equal_cache_groups_of_one_pool():
    config = _config((LayerGroup.full([2, 5]), LayerGroup.sliding(8, [0, 1, 3, 4, 6, 7])), 8)
    layout = config.layout
    assert layout.slots == 2
    assert [(g.kind, g.layers) for g in layout.cache_groups] == [
        ("full", (2, 5)), ("sliding", (0, 1)), ("sliding", (3, 4)), ("sliding", (6, 7))]
    group, slot = layout.locate(5)
    assert (group.index, slot) == (0, 1)
    assert config.storage_config().num_layers == 2 and config.storage_config().layer_groups is None
    # a block holds one cache group's slots: a quarter of a uniform cache's block
    uniform = dataclasses.replace(config, layer_groups=None)
    assert config.bytes_per_block * 4 == uniform.bytes_per_block
    with pytest.raises(InvalidArgument):
        layout.locate(8)


def test_storage_refuses_a_hybrid_config_and_the_manager_a_mismatched_storage():
    from pagedkv_numpy.backend import NumpyBackend

    config = _config((LayerGroup.full([1]), LayerGroup.sliding(8, [0])), 2)
    with pytest.raises(InvalidArgument, match="storage_config"):
        NumpyBackend().create_storage(config, "cpu")
    other = NumpyBackend().create_storage(dataclasses.replace(config.storage_config(), num_blocks=8), "cpu")
    with pytest.raises(InvalidArgument, match="storage_config"):
        HybridCacheManager(other, config)


# -- releasing what falls out of reach -----------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 4, 8, 9])
def test_sliding_groups_hold_only_their_window(window):
    m = _gemma_like(window=window)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(30))))
    for t in range(40):
        m.append_slots(["a"], [t])
        n = m.num_tokens("a")
        # released before the step: blocks before the reach of the query at n - 1, except the last block
        reach_blocks = (n - 1) // BS - min(max(0, n - window) // BS, (n - 2) // BS) + 1
        for g in range(1, 6):
            assert m.blocks_held(g) <= reach_blocks
        assert m.blocks_held(0) == -(-n // BS)
        m.check_invariants()


def test_chunked_groups_release_the_previous_chunk():
    config = _config((LayerGroup.full([0]), LayerGroup.chunked_local(8, [1])), 2)
    m = HybridCacheManager.create(config)
    m.allocate(AllocationRequest("a", initial_tokens=5))
    held = []
    for _ in range(20):
        m.append_slots(["a"])
        held.append(m.blocks_held(1))
    assert max(held) <= 8 // BS + 1
    assert m.blocks_held(0) == -(-25 // BS)
    m.check_invariants()


def test_a_full_only_layout_never_releases():
    m = HybridCacheManager.create(_config((LayerGroup.full([0, 1]),), 2))
    m.allocate(AllocationRequest("a", initial_tokens=9))
    for _ in range(10):
        m.append_slots(["a"])
    assert m.blocks_held(0) == -(-19 // BS)


# -- prefix hits across groups ----------------------------------------------------------


def test_a_sliding_group_needs_only_the_window_for_a_hit():
    m = _gemma_like(num_blocks=64, window=8)
    prompt = tuple(range(24))
    m.allocate(AllocationRequest("a", token_ids=prompt))
    generated = tuple(range(1000, 1020))
    for t in generated:
        m.append_slots(["a"], [t])
    # reuse every free block so released sliding blocks lose their contents
    filler = m.pool.num_free // 6 - 1
    m.allocate(AllocationRequest("filler", initial_tokens=filler * BS))
    text = prompt + generated
    sliding = m.groups[1].prefix.hasher
    first_block = sliding.chain(prompt[:BS], sliding.root(None))[0]
    assert m.pool.lookup(first_block) is None  # a chain lookup from the start would find nothing
    explanation = m.explain_prefix(text + (5,))
    assert explanation.hit_tokens == 44  # everything but the last token of text+(5,) rounds down to 11 blocks
    assert all(g.hit_tokens == 44 for g in explanation.groups)
    admitted = m.allocate(AllocationRequest("b", token_ids=text + (5,)))
    assert admitted.cached_tokens == 44
    m.check_invariants()


def test_a_missing_window_block_lowers_the_common_hit_and_is_explained():
    m = _gemma_like(num_blocks=128, window=8)
    prompt = tuple(range(40))
    m.allocate(AllocationRequest("a", token_ids=prompt))
    m.append_slots(["a"], [7])  # releases the sliding groups' early blocks: still cached, free
    m.deallocate("a")
    group = m.groups[3]
    victim_hash = group.prefix.hasher.chain(prompt[:36], group.prefix.hasher.root(None))[6]  # block 6 of group 3
    block = m.pool.lookup(victim_hash)
    assert block is not None
    m.pool.unregister(block)
    explanation = m.explain_prefix(prompt)
    # a hit of h blocks needs blocks h-2..h-1 (window 8, block 4); block 6 missing rules out h = 7, 8
    assert explanation.hit_tokens == 36
    explanation = m.explain_prefix(prompt[:32] + (1,))
    assert explanation.hit_tokens == 24
    by_group = {g.group: g for g in explanation.groups}
    assert by_group[3].hit_tokens == 24 and "block 6" in by_group[3].reason
    assert by_group[0].hit_tokens == 32 and by_group[1].hit_tokens == 32
    assert "block 6" in str(explanation)
    assert [g.group for g in explanation.limiting_groups] == [3]
    assert m.allocate(AllocationRequest("b", token_ids=prompt[:32] + (1,))).cached_tokens == 24
    m.check_invariants()


def test_state_groups_explain_why_there_is_no_hit():
    groups = (LayerGroup.full([0]), LayerGroup.state((3, 2), "float32", [1], slots=2))
    m = HybridCacheManager.create(_config(groups, 2))
    prompt = tuple(range(20))
    first = m.allocate(AllocationRequest("a", token_ids=prompt))
    assert first.state_slots == (0,)
    explanation = m.explain_prefix(prompt)
    assert explanation.hit_tokens == 0
    assert "checkpoint" in explanation.groups[-1].reason and explanation.groups[0].hit_tokens == 16
    second = m.allocate(AllocationRequest("b", token_ids=prompt))
    assert second.cached_tokens == 0 and second.state_slots == (1,)
    assert m.state_slot("b", 1) == 1
    before = _snapshot(m)
    with pytest.raises(OutOfBlocks, match="state slots"):
        m.allocate(AllocationRequest("c", initial_tokens=3))
    with pytest.raises(OutOfBlocks, match="state slots"):
        m.fork("a")
    assert _snapshot(m) == before
    m.deallocate("a")
    assert m.allocate(AllocationRequest("c", initial_tokens=3)).state_slots == (0,)
    with pytest.raises(InvalidArgument):
        m.state_slot("c", 0)
    with pytest.raises(UnknownSequence):
        m.state_slot("a", 1)
    m.check_invariants()


def test_prefix_caching_off_and_min_length():
    m = _gemma_like(prefix_cache=None)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(20))))
    assert m.allocate(AllocationRequest("b", token_ids=tuple(range(20)))).cached_tokens == 0
    assert "off" in m.explain_prefix(range(20)).groups[0].reason
    m = _gemma_like(prefix_cache=PrefixCacheConfig(min_prefix_length=32))
    m.allocate(AllocationRequest("a", token_ids=tuple(range(20))))
    assert m.allocate(AllocationRequest("b", token_ids=tuple(range(20)))).cached_tokens == 0


# -- all or nothing ------------------------------------------------------------------------


def test_failed_calls_change_nothing():
    m = _gemma_like(num_blocks=40, window=8)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(16))))
    m.append_slots(["a"], [1])
    before = _snapshot(m)
    with pytest.raises(OutOfBlocks):
        m.allocate(AllocationRequest("big", initial_tokens=40))
    with pytest.raises(SequenceExists):
        m.allocate(AllocationRequest("a", initial_tokens=1))
    with pytest.raises(OutOfBounds):
        m.allocate(AllocationRequest("wide", initial_tokens=10_000))
    with pytest.raises(OutOfBlocks):
        m.extend_batch(["a"], [100])
    with pytest.raises(UnknownSequence):
        m.append_slots(["a", "nobody"])
    with pytest.raises(InvalidArgument):
        m.append_slots(["a", "a"])
    with pytest.raises(InvalidArgument):
        m.append_slots(["a"], [1, 2])
    with pytest.raises(OutOfBounds):
        m.trim("a", 100)
    with pytest.raises(InvalidArgument, match="released"):
        m.trim("a", 10)  # the sliding groups released blocks a query at 7 would read
    with pytest.raises(InvalidArgument):
        m.batch_metadata(["a"], [17])
    assert _snapshot(m) == before
    assert not m.can_allocate(AllocationRequest("big", initial_tokens=40))
    assert m.can_allocate(AllocationRequest("small", initial_tokens=4))


def test_a_step_that_fits_only_thanks_to_released_blocks_succeeds():
    m = _gemma_like(num_blocks=1 + 6 * 3, window=4)  # the null block, then 18 blocks
    m.allocate(AllocationRequest("a", initial_tokens=12))  # 3 blocks in each of 6 groups: the pool is full
    assert m.pool.num_free == 0
    m.append_slots(["a"])  # a new block per group: the sliding groups first release their oldest ones
    m.check_invariants()
    before = _snapshot(m)
    with pytest.raises(OutOfBlocks):
        m.extend_batch(["a"], [8])  # the full group cannot grow: the sliding releases are not made either
    assert _snapshot(m) == before


def test_fork_shares_blocks_and_copies_on_write_in_every_group():
    m = _gemma_like(window=8)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(30))))
    m.append_slots(["a"], [1])
    child = m.fork("a")
    assert child in m and m.num_tokens(child) == 31
    m.append_slots(["a", child], [2, 3])
    for group in m.groups:
        a, c = group.sequences.find("a"), group.sequences.find(child)
        assert a.blocks[:-1] == c.blocks[:-1] and a.blocks[-1] != c.blocks[-1]
    with pytest.raises(SequenceExists):
        m.fork("a", child)
    m.deallocate("a")
    m.deallocate(child)
    assert m.num_used_blocks == 0
    m.check_invariants()


def test_the_tokens_of_the_last_step_can_always_be_rolled_back():
    m = _gemma_like(window=6)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(10))))
    for t in range(10):
        m.append_slots(["a"], [t])
    m.extend_batch(["a"], [5])  # a speculative step: four drafts and the bonus token
    m.trim("a", 5)
    assert all(g.sequences.find("a").num_tokens == 20 for g in m.groups)
    m.check_invariants()
    with pytest.raises(InvalidArgument, match="released"):
        m.trim("a", 4)


@pytest.mark.parametrize("groups", [
    (LayerGroup.full([0]), LayerGroup.sliding(6, [1])),
    (LayerGroup.full([0]), LayerGroup.chunked_local(8, [1])),
    (LayerGroup.sliding(5, [0]), LayerGroup.chunked_local(12, [1])),
], ids=["sliding", "chunked", "both"])
def test_rollback_limit_is_exactly_how_far_trim_goes(groups):
    m = HybridCacheManager.create(_config(groups, 2))
    m.allocate(AllocationRequest("a", initial_tokens=3))
    assert m.rollback_limit("a") == 0
    for _ in range(40):
        m.append_slots(["a"])
        limit = m.rollback_limit("a")
        n = m.num_tokens("a")
        assert limit <= n
        if limit > 0:
            with pytest.raises(InvalidArgument, match="released"):
                m.trim("a", n - limit + 1)
    m.trim("a", m.num_tokens("a") - m.rollback_limit("a"))
    assert m.num_tokens("a") == m.rollback_limit("a")
    m.check_invariants()


def test_groups_that_all_release_are_not_bounded_by_the_pool():
    config = _config((LayerGroup.sliding(8, [0, 1]),), 2, num_blocks=16)
    m = HybridCacheManager.create(config)
    m.allocate(AllocationRequest("a", initial_tokens=1))
    for _ in range(200):
        m.extend_batch(["a"], [1])
    assert m.num_tokens("a") == 201 and m.num_used_blocks <= 8 // BS + 2
    assert m.has_sequence("a") and not m.has_sequence("b")
    bounded = _config((LayerGroup.full([0]), LayerGroup.sliding(8, [1])), 2, num_blocks=16)
    assert bounded.max_blocks_per_seq == 16


def test_a_step_can_keep_what_its_queries_still_read():
    """A prompt admitted and extended by drafts before its first forward: its queries start at 0."""
    m = _gemma_like(window=8)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(29))))
    m.extend_batch(["a"], [4], release=False)
    meta = m.batch_metadata(["a"], [33])  # every position is still held: the whole step can be computed
    assert meta.groups[1].slot_mapping.size == 33
    m.extend_batch(["a"], [1])  # the next step releases as usual
    assert m.blocks_held(1) <= 8 // BS + 2
    with pytest.raises(InvalidArgument):
        m.batch_metadata(["a"], [34])
    m.check_invariants()


def test_stats_count_requests_not_groups():
    m = _gemma_like(window=8)
    prompt = tuple(range(18))  # the last block is partly filled: a fork shares it
    m.allocate(AllocationRequest("a", token_ids=prompt))
    m.allocate(AllocationRequest("b", token_ids=prompt))
    child = m.fork("a")
    m.append_slots(["a", child], [1, 2])  # the shared partly filled block is copied in each of 6 groups
    stats = m.stats()
    assert stats.sequences == 3 and stats.allocation_count == 2 and stats.forks == 1
    assert stats.prefix_queries == 36 and stats.prefix_hits == 16 and stats.cache_hit_rate == 16 / 36
    assert stats.cow_copies == 6 and m.counters["cow_copies"] == 6
    assert stats.used_blocks == m.num_used_blocks == sum(stats.blocks_per_group)  # groups hold disjoint blocks
    assert child == "a#fork1"
    with pytest.raises(OutOfBlocks):
        m.allocate(AllocationRequest("huge", initial_tokens=BS * 200))
    assert m.stats().allocation_failures == 1
