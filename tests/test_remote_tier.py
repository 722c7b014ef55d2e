"""The manager with a remote tier over an in-process store: hits, isolation, damage, failures, write path."""

import threading

import numpy as np
import pytest
from remote_helpers import ToyModel, config, manager, serve

from kvhelpers import snapshot
from pagedkv_core import AllocationRequest, OutOfBlocks, PrefixCacheConfig, SequenceExists
from pagedkv_core.errors import IncompatibleCache, InvalidArgument, RemoteTierError
from pagedkv_core.remote import BlockTier, LayoutFingerprint, MemoryStore

PROMPT = list(range(100, 130))  # 30 tokens: 7 full blocks of 4, the last token always computed


class FlakyStore(MemoryStore):
    """A store whose server can be switched off (every call raises, as a refused connection would)."""

    def __init__(self, clock=None) -> None:
        super().__init__(**({} if clock is None else {"clock": clock}))
        self.down = False
        self.calls = 0

    def _check(self):
        self.calls += 1
        if self.down:
            raise RemoteTierError("ConnectionError: connection refused")

    def count_leading(self, keys):
        self._check()
        return super().count_leading(keys)

    def get_many(self, keys):
        self._check()
        return super().get_many(keys)

    def put_many(self, items, ttl_seconds=None):
        self._check()
        return super().put_many(items, ttl_seconds)

    def put_if_absent(self, key, value):
        self._check()
        return super().put_if_absent(key, value)


def publish(store, cfg=None, tokens=PROMPT, **kw):
    """A first instance computes ``tokens`` and writes them to ``store``; returns its output."""
    cfg = cfg or config()
    salt = kw.pop("salt", None)
    m = manager(cfg, store, **kw)
    cached, out = serve(m, ToyModel(cfg), "first", tokens, salt=salt, backend=kw.get("backend", "numpy"))
    assert cached == 0 and m.remote.flush(5)
    m.remote.close()
    return out


@pytest.mark.parametrize("backend,dtype", [("numpy", "float32"), ("numpy", "float16"), ("numpy", "int8"),
                                           ("torch", "bfloat16"), ("torch", "float16")])
def test_second_instance_hits_and_computes_the_same_output(backend, dtype):
    pytest.importorskip(f"pagedkv_{backend}")
    store = MemoryStore()
    cfg = config(dtype)
    expected = publish(store, cfg, backend=backend)
    second = manager(cfg, store, backend=backend)
    cached, out = serve(second, ToyModel(cfg), "again", PROMPT, backend=backend)
    assert cached == 28
    assert np.array_equal(out, expected)
    s = second.remote.stats()
    assert (s.lookups, s.blocks_queried, s.hit_blocks, s.corrupt_values, s.errors) == (1, 7, 7, 0, 0)
    assert s.hit_rate == 1.0 and s.fetched_bytes > 0
    second.check_invariants()


def test_blocks_loaded_from_the_tier_join_the_local_prefix_cache():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    serve(m, ToyModel(config()), "a", PROMPT)
    before = store.round_trips
    cached, _ = serve(m, ToyModel(config()), "b", PROMPT)
    assert cached == 28 and m.remote.stats().lookups == 1  # local hits: the tier was not asked again
    assert store.round_trips == before


def test_another_tenant_gets_no_hits_and_drop_tenant_removes_only_its_blocks():
    store = MemoryStore()
    publish(store, salt="tenant-a")
    m = manager(config(), store)
    assert serve(m, ToyModel(config()), "b1", PROMPT, salt="tenant-b")[0] == 0
    assert serve(m, ToyModel(config()), "a1", PROMPT, salt="tenant-a")[0] == 28
    m.remote.flush(5)
    tier = m.remote.tier
    blocks = [k for k in store.raw() if not k.endswith(b":layout")]
    assert len(blocks) == 14 and not any(b"tenant" in k for k in blocks)
    assert tier.drop_tenant("tenant-a") == 7
    assert len([k for k in store.raw() if not k.endswith(b":layout")]) == 7
    fresh = manager(config(), store)
    assert serve(fresh, ToyModel(config()), "a2", PROMPT, salt="tenant-a")[0] == 0


def test_a_deleted_middle_block_shortens_the_hit():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    keys = m.remote.tier.keys(m.remote.tier.tagger.for_salt(None),
                              m.hasher.chain(PROMPT, m.hasher.root(None)))
    store.delete_matching(keys[3])
    cached, out = serve(m, ToyModel(config()), "a", PROMPT)
    assert cached == 12
    assert np.array_equal(out, serve(manager(config()), ToyModel(config()), "ref", PROMPT)[1])


def test_a_corrupted_value_is_a_counted_miss_with_the_right_output():
    store = MemoryStore()
    expected = publish(store)
    m = manager(config(), store)
    keys = m.remote.tier.keys(m.remote.tier.tagger.for_salt(None), m.hasher.chain(PROMPT, m.hasher.root(None)))
    damaged = bytearray(store.raw()[keys[2]])
    damaged[-5] ^= 0xFF
    store.put_many([(keys[2], bytes(damaged))])
    cached, out = serve(m, ToyModel(config()), "a", PROMPT)
    assert cached == 8 and m.remote.stats().corrupt_values == 1
    assert np.array_equal(out, expected)
    m.remote.flush(5)  # the recomputed blocks were written again, repairing the damage
    assert serve(manager(config(), store), ToyModel(config()), "b", PROMPT)[0] == 28


def test_another_model_or_layout_never_reads_the_blocks():
    store = MemoryStore()
    publish(store)
    assert serve(manager(config(), store, model_id="other"), ToyModel(config()), "a", PROMPT)[0] == 0
    shifted = config(prefix_cache=PrefixCacheConfig(hash_seed=7))
    assert serve(manager(shifted, store), ToyModel(shifted), "a", PROMPT)[0] == 0


def test_the_value_under_a_key_is_checked_against_that_key():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    tier = m.remote.tier
    keys = tier.keys(tier.tagger.for_salt(None), m.hasher.chain(PROMPT, m.hasher.root(None)))
    raw = store.raw()
    store.put_many([(keys[1], raw[keys[4]])])  # a valid value moved under another key
    assert serve(m, ToyModel(config()), "a", PROMPT)[0] == 4


def test_a_dead_server_degrades_to_misses_and_recovers_after_the_retry_interval():
    now = [0.0]
    store = FlakyStore(clock=lambda: now[0])
    publish(store)
    m = manager(config(), store, retry_interval=5.0, clock=lambda: now[0])
    store.down = True
    cached, out = serve(m, ToyModel(config()), "a", PROMPT)  # no exception: a miss
    assert cached == 0
    s = m.remote.stats()
    assert s.errors == 1 and s.hit_blocks == 0
    calls = store.calls
    serve(m, ToyModel(config()), "b", list(range(500, 530)))  # circuit open: the server is not even asked
    assert store.calls == calls and m.remote.stats().unavailable_skips >= 1
    for _i in range(3):  # decode steps keep working, commits drop their blocks
        meta = m.append_slots(["a", "b"], [1, 2])
        assert meta.batch == 2
        m.remote.commit()
    store.down = False
    now[0] = 10.0
    assert serve(m, ToyModel(config()), "c", list(range(100, 130)))[0] == 28  # local hit, no tier needed
    assert serve(m, ToyModel(config()), "d", list(range(200, 230)))[0] == 0
    m.remote.flush(5)
    assert m.remote.stats().put_blocks > 0


def test_a_failing_write_is_counted_and_retried_by_a_later_note():
    store = FlakyStore()
    m = manager(config(), store, retry_interval=0.0)
    store.down = True
    serve(m, ToyModel(config()), "a", PROMPT)
    assert m.remote.flush(5)
    s = m.remote.stats()
    assert s.dropped_blocks == 7 and s.put_blocks == 0 and s.errors >= 1
    store.down = False
    m.deallocate("a")
    other = manager(config(), store, retry_interval=0.0)
    serve(other, ToyModel(config()), "a", PROMPT)
    other.remote.flush(5)
    assert other.remote.stats().put_blocks == 7


def test_commit_writes_each_block_once_and_skips_what_the_probe_found():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    serve(m, ToyModel(config()), "a", PROMPT + [1, 2, 3, 4, 5, 6])  # 7 blocks found, 2 new full blocks
    m.remote.flush(5)
    assert m.remote.stats().put_blocks == 2
    assert m.remote.commit() == 0


def test_the_decode_step_notes_blocks_as_they_fill():
    store = MemoryStore()
    m = manager(config(), store)
    serve(m, ToyModel(config()), "a", PROMPT[:6])
    m.remote.flush(5)
    assert m.remote.stats().put_blocks == 1
    m.append_slots(["a"], [7])
    m.append_slots(["a"], [8])  # block 2 is full now
    assert m.remote.commit() == 1
    m.remote.flush(5)
    assert m.remote.stats().put_blocks == 2


def test_blocks_rolled_back_or_moved_before_commit():
    store = MemoryStore()
    m = manager(config(), store)
    m.allocate(AllocationRequest("a", token_ids=tuple(PROMPT[:12])))
    m.trim("a", 6)  # the third block is no longer cached; the first stays
    m.allocate(AllocationRequest("filler", initial_tokens=40))
    m.deallocate("filler")
    m.defragment()
    # blocks 0 and 2 (freed but still cached) are found wherever defragmentation put them;
    # block 1 is partly filled again and no longer cached
    assert m.remote.commit() == 2
    m.remote.flush(5)
    other = manager(config(), store)
    assert serve(other, ToyModel(config()), "b", PROMPT[:12])[0] == 4


def test_a_full_queue_drops_and_counts():
    store = MemoryStore()
    gate = threading.Event()
    original = store.put_many
    store.put_many = lambda items, ttl=None: (gate.wait(5), original(items, ttl))
    m = manager(config(num_blocks=128), store, max_queued_blocks=8)
    serve(m, ToyModel(config()), "a", list(range(0, 33)))  # 8 blocks: fills the queue
    serve(m, ToyModel(config()), "b", list(range(300, 333)))  # 8 more: dropped
    assert m.remote.stats().dropped_blocks == 8
    gate.set()
    assert m.remote.flush(5)
    s = m.remote.stats()
    assert s.put_blocks == 8 and s.queued_blocks == 0


def test_ranks_agree_on_the_smallest_hit():
    store = MemoryStore()
    publish(store)
    seen = []
    m = manager(config(), store, agree=lambda n: (seen.append(n), min(n, 3))[1])
    assert serve(m, ToyModel(config()), "a", PROMPT)[0] == 12
    assert seen == [7]


def test_min_prefix_length_counts_local_and_remote_blocks():
    store = MemoryStore()
    publish(store)
    strict = config(prefix_cache=PrefixCacheConfig(min_prefix_length=32))
    assert serve(manager(strict, store), ToyModel(strict), "a", PROMPT)[0] == 0
    loose = config(prefix_cache=PrefixCacheConfig(min_prefix_length=16))
    assert serve(manager(loose, store), ToyModel(loose), "a", PROMPT)[0] == 28


def test_bad_options_and_refused_admissions_change_nothing():
    store = MemoryStore()
    m = manager(config(num_blocks=8), store)
    with pytest.raises(InvalidArgument):
        m.attach_remote(m.remote.tier)
    with pytest.raises(InvalidArgument):
        manager(config(), store, max_queued_blocks=0)
    other = manager(config("float16"))
    with pytest.raises(IncompatibleCache):
        other.attach_remote(BlockTier(store, LayoutFingerprint.for_manager(m, "toy")))
    assert other.remote is None
    m.allocate(AllocationRequest("x", token_ids=tuple(range(500, 508))))
    before = snapshot(m)
    with pytest.raises(OutOfBlocks):  # the probe ran before the lock; nothing changed
        m.allocate(AllocationRequest("big", token_ids=tuple(PROMPT)))
    assert snapshot(m) == before
    trips = store.round_trips
    with pytest.raises(SequenceExists):
        m.allocate(AllocationRequest("x", token_ids=tuple(PROMPT)))
    assert snapshot(m) == before and store.round_trips == trips  # a known id asks nothing
    connector = m.remote
    connector.close()
    connector.close()  # twice is fine
    assert m.remote is None
    with pytest.raises(InvalidArgument, match="closed"):
        connector.commit()
    serve(m, ToyModel(config()), "a", PROMPT[:8])  # works without the tier


def test_a_failing_device_copy_in_commit_raises_and_leaves_the_queue_empty():
    store = MemoryStore()
    m = manager(config(), store)
    m.allocate(AllocationRequest("a", token_ids=tuple(PROMPT[:8])))
    original = m.storage.swap_out

    def broken(*args, **kw):
        raise RuntimeError("device lost")

    m.storage.swap_out = broken
    with pytest.raises(RuntimeError, match="device lost"):
        m.remote.commit()
    s = m.remote.stats()
    assert s.queued_blocks == 0 and s.dropped_blocks == 2
    m.storage.swap_out = original
    assert m.remote.flush(1)


def test_a_connector_that_only_reads_starts_no_thread():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    m.allocate(AllocationRequest("a", token_ids=tuple(PROMPT)))  # all hits: nothing to write
    assert m.remote.commit() == 0 and not m.remote._writer.is_alive()


def test_a_slow_server_never_holds_the_lock_a_decode_step_needs():
    store = MemoryStore()
    publish(store)
    in_probe, release = threading.Event(), threading.Event()
    original = store.count_leading

    def slow(keys):
        in_probe.set()
        release.wait(10)
        return original(keys)

    m = manager(config(), store)
    serve(m, ToyModel(config()), "running", list(range(700, 706)))
    store.count_leading = slow
    admitted = []
    admission = threading.Thread(target=lambda: admitted.append(serve(m, ToyModel(config()), "new", PROMPT)[0]))
    admission.start()
    assert in_probe.wait(10)
    for token in range(5):  # the admission is stuck on the server; decode steps go on
        m.append_slots(["running"], [token])
    release.set()
    admission.join(10)
    assert admitted == [28]
    m.check_invariants()


def test_blocks_prefetched_before_the_local_cache_changed_are_used_only_where_they_line_up():
    store = MemoryStore()
    publish(store)
    m = manager(config(), store)
    chain = m.hasher.chain(PROMPT, m.hasher.root(None))
    prefetched = m.remote.prefetch(m.hasher.root(None), chain[:7])
    assert (prefetched.start, len(prefetched.hashes)) == (0, 7)
    m.allocate(AllocationRequest("other", token_ids=tuple(PROMPT[:12])))  # now 2 blocks are local hits...
    m.remote.commit()
    blocks = m.pool.allocate(5)
    assert m.remote.fill(prefetched, 2, chain, blocks) == 5  # ...so the run is used from its third block
    assert m.remote.fill(prefetched, 2, chain[:2] + [b"x"] * 5, blocks) == 0  # another chain: nothing
    shifted = m.remote.prefetch(m.hasher.root(None), chain[:7])
    assert shifted.start == 3  # blocks 0-2 are local (block 2 came from the tier for "other")
    assert m.remote.fill(shifted, 1, chain, blocks) == 0  # local cache shrank below the run: unusable


def test_hashes_prefetched_under_an_old_scheme_are_not_reused():
    """A prefetch hashes outside the lock; if the scheme changed meanwhile, the admission hashes again."""
    m = manager(config())
    request = AllocationRequest("a", token_ids=tuple(PROMPT))
    old_root = m.hasher.root(None)
    old_chain = m.hasher.chain(PROMPT[:28], old_root)
    m.enable_prefix_caching(PrefixCacheConfig(hash_seed=9))
    m.prefix.remember(request, old_root, old_chain)  # what a prefetch racing the change leaves behind
    m.allocate(request)
    assert m.sequences.find("a").hashes == m.hasher.chain(PROMPT, m.hasher.root(None))
    assert not set(old_chain) & set(m.pool.cached)
