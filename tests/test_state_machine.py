"""A hypothesis state machine drives every manager operation in random order.

After every step the pool's invariants must hold and the K/V bytes of every
live sequence must equal a shadow copy, which proves swap, copy-on-write,
eviction and defragmentation move data bit-exactly.

The K/V of a token is a deterministic function of the whole token prefix up
to it (as in a real model), so a prefix-cache hit must find exactly the
bytes the shadow expects.
"""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv_core import (
    AllocationRequest,
    CacheConfig,
    OutOfBlocks,
    OutOfHostBlocks,
    PagedKvCacheManager,
    SeqState,
    StreamingLLMPolicy,
)
from pagedkv_core.events import replay
from pagedkv_numpy.storage import NumpyStorage

CONFIG = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=24, block_size=4, num_host_blocks=12,
                     max_seq_len=64)
PROMPTS = [tuple(range(100, 109)), tuple(range(200, 206)), (7,) * 12]


def kv_for(history: tuple[int, ...]) -> np.ndarray:
    """K and V of the last token of ``history``, for all layers: [layers, 2, heads, dim]."""
    seed = int.from_bytes(hashlib.sha256(np.asarray(history, np.int64).tobytes()).digest()[:8], "little")
    shape = (CONFIG.num_layers, 2, CONFIG.num_kv_heads, CONFIG.head_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = PagedKvCacheManager(NumpyStorage(CONFIG), eviction_policy=None)
        self.events: list = []
        self.m.subscribe(self.events.append)
        self.history: dict[str, list[int]] = {}  # every token id ever appended
        self.expected: dict[str, list[np.ndarray]] = {}  # K/V per cached position
        self.next_id = 0

    # -- helpers ----------------------------------------------------------------

    def _running(self) -> list[str]:
        return [r for r in self.m.request_ids() if self.m.get_handle(r).state is SeqState.RUNNING]

    def _swapped(self) -> list[str]:
        return [r for r in self.m.request_ids() if self.m.get_handle(r).state is SeqState.SWAPPED]

    def _write_new(self, rid: str, first: int) -> None:
        """Write K/V for positions ``first..num_tokens-1`` of ``rid`` and extend the shadow."""
        handle = self.m.get_handle(rid)
        table, n = handle.block_table, handle.num_tokens
        history = self.history[rid]
        offset = len(history) - n  # tokens cut out by window trimming
        values = [kv_for(tuple(history[:offset + p + 1])) for p in range(first, n)]
        if values:
            slots = np.array([table.slot(p) for p in range(first, n)])
            stacked = np.stack(values)  # [tokens, layers, 2, heads, dim]
            for layer in range(CONFIG.num_layers):
                self.m.storage.write(layer, slots, stacked[:, layer, 0], stacked[:, layer, 1])
        self.expected[rid] = self.expected[rid][:first] + values

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    # -- rules ------------------------------------------------------------------

    @rule(prompt=st.sampled_from(PROMPTS), suffix=st.lists(st.integers(0, 5), max_size=9))
    def allocate(self, prompt, suffix):
        rid = self._new_id()
        tokens = prompt + tuple(suffix)
        req = AllocationRequest(rid, token_ids=tokens)
        if not self.m.can_allocate(req):
            return
        handle = self.m.allocate(req)
        self.history[rid] = list(tokens)
        self.expected[rid] = []
        cached = handle.num_cached_tokens
        # cached positions must already hold exactly the expected bytes
        self.expected[rid] = [kv_for(tokens[:p + 1]) for p in range(cached)]
        self._write_new(rid, cached)

    @precondition(lambda self: self._running())
    @rule(data=st.data(), count=st.integers(1, 6))
    def extend(self, data, count):
        running = self._running()
        rids = data.draw(st.lists(st.sampled_from(running), min_size=1, max_size=len(running), unique=True))
        tokens = [[data.draw(st.integers(0, 5)) for _ in range(count)] for _ in rids]
        before = {r: self.m.get_handle(r).num_tokens for r in rids}
        try:
            self.m.extend_batch(rids, [count] * len(rids), tokens)
        except OutOfBlocks:
            return
        for rid, toks in zip(rids, tokens):
            self.history[rid] += toks
            self._write_new(rid, before[rid])

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def trim(self, data):
        rid = data.draw(st.sampled_from(self._running()))
        n = data.draw(st.integers(0, self.m.get_handle(rid).num_tokens))
        self.m.trim(rid, n)
        if n:
            del self.history[rid][-n:]
            del self.expected[rid][-n:]

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(self._running()))
        dst = self._new_id()
        self.m.fork(src, dst)
        self.history[dst] = list(self.history[src])
        self.expected[dst] = list(self.expected[src])

    @precondition(lambda self: self.m.request_ids())
    @rule(data=st.data())
    def deallocate(self, data):
        rid = data.draw(st.sampled_from(self.m.request_ids()))
        self.m.deallocate(rid)
        del self.history[rid], self.expected[rid]

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def swap_out(self, data):
        rid = data.draw(st.sampled_from(self._running()))
        try:
            self.m.swap_out(rid)
        except OutOfHostBlocks:
            pass

    @precondition(lambda self: self._swapped())
    @rule(data=st.data())
    def swap_in(self, data):
        rid = data.draw(st.sampled_from(self._swapped()))
        try:
            self.m.swap_in(rid)
        except OutOfBlocks:
            pass

    @rule(blocks=st.integers(1, 8))
    def evict(self, blocks):
        result = self.m.evict(blocks)
        for rid in result.dropped:
            del self.history[rid], self.expected[rid]

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def streaming_trim(self, data):
        rid = data.draw(st.sampled_from(self._running()))
        removed_blocks = list(StreamingLLMPolicy(CONFIG.block_size, 4, 6).cut(self.m.get_handle(rid).num_tokens))
        self.m.trim_window(rid, StreamingLLMPolicy(CONFIG.block_size, 4, 6))
        bs = CONFIG.block_size
        cut = {p for b in removed_blocks for p in range(b * bs, (b + 1) * bs)}
        self.expected[rid] = [kv for p, kv in enumerate(self.expected[rid]) if p not in cut]

    @rule()
    def defragment(self):
        self.m.defragment()

    @rule()
    def gc(self):
        self.m.gc()

    # -- checks -----------------------------------------------------------------

    @invariant()
    def invariants_hold(self):
        self.m.check_invariants()

    @invariant()
    def events_replay_to_the_cached_hashes(self):
        assert replay(self.events) == set(self.m.pool.cached)

    @invariant()
    def data_matches_the_shadow(self):
        for rid in self._running():
            table = self.m.get_handle(rid).block_table
            assert table.num_tokens == len(self.expected[rid])
            if not table.num_tokens:
                continue
            want = np.stack(self.expected[rid])
            for layer in range(CONFIG.num_layers):
                k, v = self.m.storage.gather(layer, np.asarray(table.block_ids), table.num_tokens)
                np.testing.assert_array_equal(k, want[:, layer, 0], err_msg=f"{rid} K layer {layer}")
                np.testing.assert_array_equal(v, want[:, layer, 1], err_msg=f"{rid} V layer {layer}")


ManagerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestManagerMachine = ManagerMachine.TestCase
