"""Allocator invariants through the backend: a hypothesis state machine over the manager and real storage.

Random allocate / append / fork / trim / swap / defragment / free; after
every step the pool's invariants hold and every live sequence's K/V equal
a shadow copy (so the backend's copies and swaps are bit-exact).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv_conformance.helpers import input_dtype, make_config, make_storage
from pagedkv_core import AllocationRequest, OutOfBlocks, OutOfHostBlocks, PagedKvCacheManager, SeqState
from pagedkv_core.dtypes import is_quantized

pytestmark = pytest.mark.pagedkv_area("allocator")


def machine_for(target, dtype):
    storage = make_storage(target, make_config(dtype, num_layers=1, num_kv_heads=1, head_dim=64, num_blocks=20,
                                               block_size=4, num_host_blocks=10))
    backend, device, kind = target.backend, target.device, input_dtype(dtype)
    quantized = is_quantized(dtype)

    class AllocatorMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.m = PagedKvCacheManager(storage)
            self.shadow: dict[str, np.ndarray] = {}
            self.count = 0

        def running(self):
            return [r for r in self.m.request_ids() if self.m.get_handle(r).state is SeqState.RUNNING]

        def swapped(self):
            return [r for r in self.m.request_ids() if self.m.get_handle(r).state is SeqState.SWAPPED]

        def write(self, rid, first):
            table = self.m.get_handle(rid).block_table
            n = table.num_tokens - first
            values = np.random.default_rng(self.count).standard_normal((n, 1, 64)).astype(np.float32)
            native = backend.asarray(values, device, kind)
            self.m.storage.write(0, np.array([table.slot(p) for p in range(first, table.num_tokens)]), native, native)
            k, _ = self.m.storage.gather(0, np.asarray(table.block_ids, np.int32), table.num_tokens)
            stored = np.asarray(backend.to_numpy(k))
            if quantized:  # a write may requantize the earlier tokens of its block to a larger scale
                self.shadow[rid] = stored
            else:
                self.shadow[rid] = np.concatenate([self.shadow.get(rid, stored[:0])[:first], stored[first:]])

        @rule(n=st.integers(1, 14))
        def allocate(self, n):
            self.count += 1
            rid = f"r{self.count}"
            try:
                self.m.allocate(AllocationRequest(rid, initial_tokens=n))
            except OutOfBlocks:
                return
            self.write(rid, 0)

        @precondition(lambda self: self.running())
        @rule(data=st.data())
        def append(self, data):
            rid = data.draw(st.sampled_from(self.running()))
            first = self.m.get_handle(rid).num_tokens
            try:
                self.m.append_slots([rid])
            except OutOfBlocks:
                return
            self.count += 1
            self.write(rid, first)

        @precondition(lambda self: self.running())
        @rule(data=st.data())
        def fork(self, data):
            src = data.draw(st.sampled_from(self.running()))
            self.count += 1
            self.m.fork(src, f"r{self.count}")
            self.shadow[f"r{self.count}"] = self.shadow[src].copy()

        @precondition(lambda self: self.running())
        @rule(data=st.data(), n=st.integers(0, 5))
        def trim(self, data, n):
            rid = data.draw(st.sampled_from(self.running()))
            n = min(n, self.m.get_handle(rid).num_tokens)
            self.m.trim(rid, n)
            self.shadow[rid] = self.shadow[rid][:len(self.shadow[rid]) - n]

        @precondition(lambda self: self.running())
        @rule(data=st.data())
        def swap_out(self, data):
            try:
                self.m.swap_out(data.draw(st.sampled_from(self.running())))
            except OutOfHostBlocks:
                pass

        @precondition(lambda self: self.swapped())
        @rule(data=st.data())
        def swap_in(self, data):
            try:
                self.m.swap_in(data.draw(st.sampled_from(self.swapped())))
            except OutOfBlocks:
                pass

        @precondition(lambda self: self.m.request_ids())
        @rule(data=st.data())
        def free(self, data):
            rid = data.draw(st.sampled_from(self.m.request_ids()))
            self.m.deallocate(rid)
            del self.shadow[rid]

        @rule()
        def defragment(self):
            self.m.defragment()

        @invariant()
        def invariants(self):
            self.m.check_invariants()

        @invariant()
        def data(self):
            for rid in self.running():
                table = self.m.get_handle(rid).block_table
                if table.num_tokens:
                    k, v = self.m.storage.gather(0, np.asarray(table.block_ids, np.int32), table.num_tokens)
                    np.testing.assert_array_equal(np.asarray(backend.to_numpy(k)), self.shadow[rid])
                    np.testing.assert_array_equal(np.asarray(backend.to_numpy(v)), self.shadow[rid])

    return AllocatorMachine


def test_allocator_state_machine(target, dtype):
    machine = machine_for(target, dtype)
    machine.TestCase.settings = settings(max_examples=15, stateful_step_count=25, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
