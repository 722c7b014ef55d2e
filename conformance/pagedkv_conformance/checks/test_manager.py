"""Manager scenarios end to end through the backend: copy-on-write, prefix hits, swap, StreamingLLM, int8."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import assert_close, input_dtype, make_config, make_query, make_storage, slots_for
from pagedkv_conformance.oracle import reference_attention
from pagedkv_conformance.tolerances import tolerance
from pagedkv_core import AllocationRequest, PagedKvCacheManager, StreamingLLMPolicy
from pagedkv_core.dtypes import is_quantized

pytestmark = pytest.mark.pagedkv_area("manager")

BLOCK = 4


class Scenario:
    """A manager over the target's storage, K/V for token positions drawn once, written on demand."""

    def __init__(self, target, dtype, num_blocks=32, num_host_blocks=16):
        self.target, self.dtype = target, dtype
        self.storage = make_storage(target, make_config(dtype, num_blocks=num_blocks, block_size=BLOCK,
                                                        head_dim=64, num_host_blocks=num_host_blocks))
        self.manager = PagedKvCacheManager(self.storage)
        rng = np.random.default_rng(11)
        self.kv = rng.standard_normal((2, 2, 64, 2, 64)).astype(np.float32)  # [layer, k/v, position, head, dim]
        self.q, self.q64 = make_query(target, rng, 1, 4, 64, dtype)

    def write(self, rid: str, first: int) -> None:
        """Write the K/V of positions ``first..num_tokens-1`` (the same values for the same position)."""
        table = self.manager.get_handle(rid).block_table
        slots = np.array([table.slot(p) for p in range(first, table.num_tokens)])
        kind = input_dtype(self.dtype)
        for layer in range(2):
            k = self.kv[layer, 0, first:table.num_tokens]
            v = self.kv[layer, 1, first:table.num_tokens]
            self.storage.write(layer, slots, self.target.backend.asarray(k, self.target.device, kind),
                               self.target.backend.asarray(v, self.target.device, kind))

    def decode(self, rid: str, layer: int = 1):
        meta = self.manager.batch_metadata([rid])
        return self.target.backend.to_numpy(
            self.target.backend.attention.decode(self.q, self.storage, layer, meta.block_tables, meta.seq_lens))

    def gather(self, rid: str, layer: int = 1):
        table = self.manager.get_handle(rid).block_table
        k, v = self.storage.gather(layer, np.asarray(table.block_ids, np.int32), table.num_tokens)
        return self.target.backend.to_numpy(k), self.target.backend.to_numpy(v)


def test_fork_then_copy_on_write_keeps_the_parents_data(target, dtype):
    s = Scenario(target, dtype)
    s.manager.allocate(AllocationRequest("parent", initial_tokens=6))
    s.write("parent", 0)
    before_kv, before_out = s.gather("parent"), s.decode("parent")
    s.manager.fork("parent", "child")
    s.manager.append_slots(["child"])
    s.kv[:, :, 6] = 7.0  # the child's new token differs from anything the parent has
    s.write("child", 6)
    assert s.manager.stats().cow_copies == 1
    for got, want in zip(s.gather("parent"), before_kv):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(s.decode("parent"), before_out)
    child_k, _ = s.gather("child")
    if is_quantized(dtype):  # the child's write requantized its own copy of the block to a larger scale
        np.testing.assert_allclose(child_k[:6], before_kv[0], atol=7.0 / 127)
    else:
        np.testing.assert_array_equal(child_k[:6], before_kv[0])


def test_prefix_hit_gives_the_same_output_as_a_cold_run(target, dtype):
    s = Scenario(target, dtype)
    prompt = tuple(range(30))
    cold = s.manager.allocate(AllocationRequest("cold", token_ids=prompt))
    assert cold.num_cached_tokens == 0
    s.write("cold", 0)
    cold_out = s.decode("cold")
    s.manager.deallocate("cold")
    warm = s.manager.allocate(AllocationRequest("warm", token_ids=prompt))
    assert warm.num_cached_tokens == 28
    s.write("warm", warm.num_cached_tokens)
    np.testing.assert_array_equal(s.decode("warm"), cold_out)
    assert s.manager.stats().prefix_hits == 28


def test_swap_out_and_in_gives_identical_attention(target, dtype):
    s = Scenario(target, dtype)
    s.manager.allocate(AllocationRequest("a", initial_tokens=23))
    s.write("a", 0)
    before = s.decode("a")
    s.manager.swap_out("a")
    s.manager.allocate(AllocationRequest("other", initial_tokens=60))
    s.write("other", 0)  # reuse the freed blocks with other data
    s.manager.swap_in("a")
    np.testing.assert_array_equal(s.decode("a"), before)
    s.manager.check_invariants()


def test_streaming_llm_keeps_sinks_and_window(target, dtype):
    s = Scenario(target, dtype)
    s.manager.allocate(AllocationRequest("long", initial_tokens=40))
    s.write("long", 0)
    full_k, full_v = s.gather("long")
    removed = s.manager.trim_window("long", StreamingLLMPolicy(BLOCK, sink_tokens=4, window_tokens=8))
    assert removed == 28
    k, v = s.gather("long")
    kept = list(range(4)) + list(range(32, 40))
    np.testing.assert_array_equal(k, full_k[kept])
    np.testing.assert_array_equal(v, full_v[kept])
    meta = s.manager.batch_metadata(["long"])
    k_pool, v_pool = s.storage.to_numpy(1)
    want = reference_attention(s.q64, k_pool, v_pool, meta.block_tables, meta.seq_lens)
    assert_close(target, s.decode("long"), want, "decode", dtype, "attention after StreamingLLM trimming")


def test_int8_stays_within_its_declared_error(target):
    if "int8" not in target.capabilities.quantized:
        pytest.skip(f"{target.id} has no int8 storage")
    rng = np.random.default_rng(3)
    seq_lens = [21, 5]
    outputs = {}
    q = rng.standard_normal((2, 4, 64)).astype(np.float32)
    for dtype in ("float32", "int8"):
        storage = make_storage(target, make_config(dtype, num_blocks=16, block_size=BLOCK, head_dim=64))
        table = np.arange(12, dtype=np.int32).reshape(2, 6)
        table[1, 2:] = -1
        k = np.random.default_rng(4).standard_normal((26, 2, 64)).astype(np.float32)
        slots = slots_for(table, seq_lens, BLOCK)
        native = target.backend.asarray(k, target.device, "float32")
        storage.write(0, slots, native, native)
        qn = target.backend.asarray(q, target.device, "float32")
        out = target.backend.attention.decode(qn, storage, 0, table, np.asarray(seq_lens, np.int32))
        outputs[dtype] = np.asarray(target.backend.to_numpy(out), np.float64)
    atol, rtol = tolerance(target.capabilities, "int8_vs_float32", "int8")
    np.testing.assert_allclose(outputs["int8"], outputs["float32"], atol=atol, rtol=rtol)
    assert not np.array_equal(outputs["int8"], outputs["float32"]), "int8 storage did not quantize"
