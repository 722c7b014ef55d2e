"""Prefix-cache events: every change to the findable hashes is reported, in order, from every path."""

import random

from kvhelpers import request
from pagedkv_core import PrefixCacheConfig
from pagedkv_core.contract.hookspecs import hookimpl
from pagedkv_core.events import AllCleared, BlockRemoved, BlockStored, replay
from pagedkv_core.plugins import BackendRegistry


def test_allocation_stores_chained_blocks(manager):
    events = []
    manager.subscribe(events.append)
    manager.allocate(request("a", tokens=range(9)))
    assert [type(e) for e in events] == [BlockStored, BlockStored]
    assert events[0].parent_hash is None and events[1].parent_hash == events[0].block_hash
    assert events[0].token_count == 4 and events[0].tier == "device"


def test_reuse_of_a_cached_block_removes_it(manager):
    events = []
    manager.allocate(request("a", tokens=range(9)))
    manager.deallocate("a")
    manager.subscribe(events.append)
    manager.allocate(request("filler", n=64))
    assert sum(isinstance(e, BlockRemoved) for e in events) == 2


def test_unsubscribe_stops_delivery(manager):
    events = []
    unsubscribe = manager.subscribe(events.append)
    unsubscribe()
    manager.allocate(request("a", tokens=range(9)))
    assert events == []


def test_clearing_the_cache_is_one_event(manager):
    events = []
    manager.subscribe(events.append)
    manager.allocate(request("a", tokens=range(9)))
    manager.gc(all_prefixes=True)
    assert isinstance(events[-1], AllCleared) and manager.stats().cached_blocks == 0
    manager.check_invariants()


def test_plugins_receive_events_through_the_hook(make_manager):
    seen = []

    class Router:
        @hookimpl
        def pagedkv_cache_event(self, event, manager):
            seen.append((event, manager))

    registry = BackendRegistry(load_entry_points=False)
    registry.register(Router())
    from pagedkv_core import PagedKvCacheManager

    base = make_manager()
    m = PagedKvCacheManager(base.storage, event_hook=registry.plugin_manager.hook)
    m.allocate(request("a", tokens=range(5)))
    assert [type(e) for e, _ in seen] == [BlockStored] and seen[0][1] is m


def test_replaying_the_stream_reconstructs_the_cached_hashes(make_manager, clock):
    m = make_manager(num_blocks=32, num_host_blocks=16, prefix_cache=PrefixCacheConfig(ttl_seconds=50, max_prefixes=20))
    events = []
    m.subscribe(events.append)
    rng = random.Random(7)
    prompts = [tuple(range(100, 112)), tuple(range(200, 208)), (5,) * 10]
    live = []
    for i in range(600):
        op = rng.random()
        try:
            if op < 0.3 or not live:
                rid = f"r{i}"
                m.allocate(request(rid, tokens=rng.choice(prompts) + tuple(rng.randrange(4) for _ in range(rng.randrange(6)))))
                live.append(rid)
            elif op < 0.55:
                rid = rng.choice(live)
                m.extend(rid, 3, [rng.randrange(4) for _ in range(3)])
            elif op < 0.62:
                m.trim(rng.choice(live), rng.randrange(3))
            elif op < 0.68:
                m.swap_out(rng.choice(live))
            elif op < 0.74:
                m.swap_in(rng.choice(live))
            elif op < 0.78:
                m.defragment()
            elif op < 0.81:
                clock.advance(rng.choice([1, 30]))
                m.gc()
            elif op < 0.83:
                m.evict(3)
                live = [r for r in live if m.has_sequence(r)]
            elif op < 0.84:
                m.gc(all_prefixes=True)
            else:
                m.deallocate(live.pop(rng.randrange(len(live))))
        except Exception as exc:  # refusals (out of blocks, swapped, ...) are part of the workload
            assert exc.__class__.__module__ == "pagedkv_core.errors", exc
        assert replay(events) == set(m.pool.cached)
    assert len(events) > 100
    m.check_invariants()
