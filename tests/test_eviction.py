"""Eviction policies (exact orders), evict / evict_to_threshold, window trimming, pressure, gc."""

import pytest

from kvhelpers import request
from pagedkv_core import (
    InvalidArgument,
    LfuPolicy,
    LongestFirstPolicy,
    LruPolicy,
    MemoryPressure,
    PrefixCacheConfig,
    PressureThresholds,
    PriorityPolicy,
    SequenceInfo,
    SlidingWindowPolicy,
    StreamingLLMPolicy,
    make_policy,
)


def info(rid, tokens=8, blocks=2, freeable=2, priority=0, last=0.0, count=1, arrival=0):
    return SequenceInfo(rid, tokens, blocks, freeable, priority, last, count, arrival)


SEQS = [
    info("old", tokens=4, blocks=1, freeable=1, last=1.0, count=9, arrival=0, priority=0),
    info("long", tokens=40, blocks=10, freeable=10, last=3.0, count=5, arrival=1, priority=1),
    info("rare", tokens=8, blocks=2, freeable=2, last=2.0, count=1, arrival=2, priority=2),
    info("shared", tokens=12, blocks=3, freeable=0, last=4.0, count=3, arrival=3, priority=2),
]


@pytest.mark.parametrize("policy, order", [
    (LruPolicy(), ["old", "rare", "long", "shared"]),
    (LfuPolicy(), ["rare", "shared", "long", "old"]),
    (LongestFirstPolicy(), ["long", "shared", "rare", "old"]),
    (PriorityPolicy(), ["shared", "rare", "long", "old"]),
], ids=lambda p: getattr(p, "name", None))
def test_whole_sequence_policies_order(policy, order):
    assert [c.request_id for c in policy.select_eviction_candidates(None, SEQS)] == order


def test_candidates_stop_once_enough_blocks_would_be_freed():
    picked = LruPolicy().select_eviction_candidates(3, SEQS)
    assert [c.request_id for c in picked] == ["old", "rare"]  # 1 + 2 freeable blocks


def test_streaming_llm_keeps_sinks_and_window():
    policy = StreamingLLMPolicy(block_size=4, sink_tokens=4, window_tokens=8)
    assert list(policy.cut(40)) == list(range(1, 8))  # keep block 0 (sinks) and blocks 8, 9 (last 8 tokens)
    assert list(policy.cut(12)) == []
    assert list(policy.cut(14)) == []  # block 1 still holds tokens 6 and 7 of the window
    assert list(policy.cut(16)) == [1]


def test_sliding_window_cuts_blocks_no_query_sees():
    policy = SlidingWindowPolicy(block_size=4, window_tokens=6)
    assert list(policy.cut(20)) == [0, 1, 2]  # newest token 19 sees 14..19
    assert list(policy.cut(6)) == []


def test_make_policy_knows_every_name():
    for name in ("lru", "lfu", "longest-first", "priority"):
        assert make_policy(name).name == name
    assert make_policy("streaming-llm", 16, sink_tokens=4, window_tokens=64).name == "streaming-llm"
    assert make_policy("sliding-window", 16, window_tokens=64).name == "sliding-window"
    with pytest.raises(InvalidArgument):
        make_policy("fifo")


def test_evict_swaps_lru_victims_to_the_host(make_manager, clock):
    m = make_manager()
    for rid in ("a", "b", "c"):
        m.allocate(request(rid, n=8))
        clock.advance(1)
    m.record_access("a")
    result = m.evict(3)
    assert result.swapped == ("b", "c") and result.dropped == () and result.freed_blocks == 4
    assert m.stats().eviction_count == 2
    m.check_invariants()


def test_evict_drops_when_the_host_is_full(make_manager):
    m = make_manager(num_host_blocks=0)
    handle = m.allocate(request("a", n=8))
    result = m.evict(1)
    assert result.dropped == ("a",) and not handle.is_valid()
    m.check_invariants()


def test_evict_to_threshold(make_manager):
    m = make_manager(policy=LongestFirstPolicy(), num_host_blocks=16)
    m.allocate(request("small", n=8))
    m.allocate(request("big", n=40))
    assert m.evict_to_threshold(0.9).freed_blocks == 0
    result = m.evict_to_threshold(0.5)
    assert result.swapped == ("big",)
    assert m.pool.utilization() <= 0.5
    with pytest.raises(InvalidArgument):
        m.evict_to_threshold(1.5)


def test_streaming_eviction_trims_the_middle(make_manager):
    m = make_manager(policy=StreamingLLMPolicy(block_size=4, sink_tokens=4, window_tokens=8))
    handle = m.allocate(request("a", n=30))
    blocks = handle.block_table.block_ids
    result = m.evict(None)
    assert result.trimmed == (("a", 16),)  # blocks 1-4; block 5 holds tokens 22, 23 of the window
    assert handle.block_table.block_ids == (blocks[0],) + blocks[5:]
    assert handle.num_tokens == 14 and handle.position_offset == 16
    m.check_invariants()


def test_trim_window_on_one_sequence(manager):
    handle = manager.allocate(request("a", tokens=range(20)))
    assert manager.trim_window("a", SlidingWindowPolicy(4, window_tokens=6)) == 12
    assert handle.num_tokens == 8
    manager.append_slots(["a"], [20])  # the sequence goes on, no longer prefix-cached
    manager.check_invariants()


def test_pressure_callbacks_fire_on_each_change(make_manager):
    m = make_manager(pressure=PressureThresholds(0.25, 0.5, 0.75))
    seen = []
    m.set_pressure_callback(lambda new, old: seen.append((old.name, new.name)))
    m.allocate(request("a", n=16))  # 4/16 blocks
    m.allocate(request("b", n=32))  # 12/16
    m.deallocate("b")
    m.deallocate("a")
    assert seen == [("LOW", "MEDIUM"), ("MEDIUM", "CRITICAL"), ("CRITICAL", "MEDIUM"), ("MEDIUM", "LOW")]
    assert m.pressure_level is MemoryPressure.LOW


def test_pressure_callback_may_call_back_into_the_manager(make_manager):
    m = make_manager(pressure=PressureThresholds(0.25, 0.5, 0.75))

    def relieve(new, old):
        if new is MemoryPressure.CRITICAL:
            m.swap_out("big")

    m.set_pressure_callback(relieve)
    m.allocate(request("big", n=32))
    m.allocate(request("more", n=20))
    assert m.get_handle("big").state.value == "swapped"
    m.check_invariants()


def test_pressure_levels_from_default_thresholds():
    t = PressureThresholds()
    assert [MemoryPressure.from_utilization(u, t) for u in (0.0, 0.6, 0.8, 0.95)] == list(MemoryPressure)
    with pytest.raises(InvalidArgument):
        PressureThresholds(0.9, 0.8, 0.95)


def test_seconds_at_levels_accumulate(make_manager, clock):
    m = make_manager(pressure=PressureThresholds(0.25, 0.5, 0.75))
    clock.advance(2)
    m.allocate(request("a", n=16))
    clock.advance(3)
    seconds = m.pressure.seconds_at_levels()
    assert seconds[MemoryPressure.LOW] == 2 and seconds[MemoryPressure.MEDIUM] == 3


def test_gc_expires_prefixes_by_ttl(make_manager, clock):
    m = make_manager(prefix_cache=PrefixCacheConfig(ttl_seconds=10))
    m.allocate(request("a", tokens=range(9)))
    m.deallocate("a")
    clock.advance(11)
    stats = m.gc()
    assert stats.caches_freed == 2 and stats.memory_freed == 2 * m.config.bytes_per_block
    assert m.allocate(request("b", tokens=range(9))).num_cached_tokens == 0


def test_ttl_is_applied_at_lookup_too(make_manager, clock):
    m = make_manager(prefix_cache=PrefixCacheConfig(ttl_seconds=10))
    m.allocate(request("a", tokens=range(9)))
    m.deallocate("a")
    clock.advance(5)
    assert m.allocate(request("b", tokens=range(9))).num_cached_tokens == 8
    m.deallocate("b")
    clock.advance(11)
    assert m.allocate(request("c", tokens=range(9))).num_cached_tokens == 0


def test_max_prefixes_bounds_the_cache(make_manager):
    m = make_manager(prefix_cache=PrefixCacheConfig(max_prefixes=2))
    m.allocate(request("a", tokens=range(17)))  # 4 full blocks: only 2 can be cached
    m.deallocate("a")
    assert len(m.pool.cached) <= 2
    m.check_invariants()


def test_gc_all_prefixes_empties_the_cache(manager):
    manager.allocate(request("a", tokens=range(9)))
    manager.deallocate("a")
    assert manager.gc(all_prefixes=True).caches_freed == 2
    assert manager.stats().cached_blocks == 0
