"""A hybrid model's attention through the paged cache equals attention over its whole K/V history.

Each layer writes its K/V through the step's metadata and runs the numpy
backend's kernels with its group's mask; the float64 oracle attends over a
host copy of every token ever written (nothing released). Equal outputs prove
that released blocks were never needed and that the null block is harmless.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.oracle import reference_attention
from pagedkv_core import AllocationRequest, CacheConfig, HybridCacheManager, LayerGroup

H_KV, H_Q, D, BS = 2, 4, 8, 4


def _config(groups: tuple[LayerGroup, ...], num_layers: int, num_blocks: int = 512) -> CacheConfig:
    return CacheConfig(num_layers=num_layers, num_kv_heads=H_KV, head_dim=D, num_blocks=num_blocks, block_size=BS,
                       dtype="float64", layer_groups=groups)


class HostHistory:
    """Every token's K/V per layer and sequence, in position order: what a cache that never frees holds."""

    def __init__(self) -> None:
        self.k: dict[tuple[int, str], list[np.ndarray]] = {}
        self.v: dict[tuple[int, str], list[np.ndarray]] = {}

    def add(self, layer: int, rid: str, k: np.ndarray, v: np.ndarray) -> None:
        self.k.setdefault((layer, rid), []).extend(k)
        self.v.setdefault((layer, rid), []).extend(v)

    def contiguous(self, layer: int, rids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The histories as one paged pool with block size 1: pool, tables, lengths."""
        ks = [np.stack(self.k[(layer, r)]) for r in rids]
        vs = [np.stack(self.v[(layer, r)]) for r in rids]
        lens = np.array([len(k) for k in ks])
        k_pool = np.concatenate(ks)[:, None]
        v_pool = np.concatenate(vs)[:, None]
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        tables = np.full((len(rids), int(lens.max())), 0)
        for i, (o, n) in enumerate(zip(offsets, lens)):
            tables[i, :n] = np.arange(o, o + n)
        return k_pool, v_pool, tables, lens


def _step(manager: HybridCacheManager, backend, history: HostHistory, rids: list[str], qlens: list[int],
          rng: np.random.Generator) -> None:
    """One forward step over every layer: write the new K/V, attend, compare with the oracle."""
    meta = manager.batch_metadata(rids, qlens)
    total = sum(qlens)
    for layer in range(manager.config.num_layers):
        step = meta.for_layer(layer)
        k, v = rng.standard_normal((2, total, H_KV, D))
        q = rng.standard_normal((total, H_Q, D))
        manager.storage.write(step.storage_layer, step.metadata.slot_mapping, k, v)
        starts = np.concatenate([[0], np.cumsum(qlens)])
        for i, rid in enumerate(rids):
            history.add(layer, rid, k[starts[i]:starts[i + 1]], v[starts[i]:starts[i + 1]])
        m = step.metadata
        plan = backend.attention.plan(manager.storage, m.block_tables, m.seq_lens, m.query_start_loc,
                                      sliding_window=step.sliding_window, chunk_size=step.chunk_size)
        out = plan.run(q, step.storage_layer)
        k_pool, v_pool, tables, lens = history.contiguous(layer, rids)
        expected = reference_attention(q, k_pool, v_pool, tables, lens, m.query_start_loc,
                                       sliding_window=step.sliding_window, chunk_size=step.chunk_size)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10, err_msg=f"layer {layer}")


@pytest.mark.parametrize("groups,num_layers", [
    ((LayerGroup.full([2]), LayerGroup.sliding(6, [0, 1])), 3),
    ((LayerGroup.full([0, 3]), LayerGroup.chunked_local(8, [1, 2])), 4),
    ((LayerGroup.sliding(5, [0]), LayerGroup.chunked_local(6, [1]), LayerGroup.full([2])), 3),
], ids=["sliding", "chunked", "mixed-unaligned"])
def test_prefill_then_decode_matches_the_whole_history(groups, num_layers):
    from pagedkv_numpy.backend import NumpyBackend

    backend = NumpyBackend()
    manager = HybridCacheManager.create(_config(groups, num_layers), backend)
    rng = np.random.default_rng(0)
    history = HostHistory()
    prompts = {"a": list(range(23)), "b": list(range(100, 109)), "c": list(range(200, 203))}
    for rid, prompt in prompts.items():
        manager.allocate(AllocationRequest(rid, token_ids=tuple(prompt)))
    rids = list(prompts)
    _step(manager, backend, history, rids, [len(p) for p in prompts.values()], rng)
    held_after_prefill = manager.num_used_blocks
    for t in range(30):
        manager.append_slots(rids, [7 + t] * len(rids))
        _step(manager, backend, history, rids, [1] * len(rids), rng)
        manager.check_invariants()
    if any(g.kind != "full" for g in groups):
        assert manager.num_used_blocks < held_after_prefill + 3 * len(groups) * 30 // BS
    # a chunked prefill step of several tokens after decoding
    manager.extend_batch(rids, [5, 2, 7])
    _step(manager, backend, history, rids, [5, 2, 7], rng)
    manager.check_invariants()


def test_a_prefix_hit_serves_the_window_and_attention_stays_exact():
    from pagedkv_numpy.backend import NumpyBackend

    backend = NumpyBackend()
    groups = (LayerGroup.full([1]), LayerGroup.sliding(6, [0]))
    manager = HybridCacheManager.create(_config(groups, 2), backend)
    rng = np.random.default_rng(1)
    history = HostHistory()
    prompt = tuple(range(40))
    manager.allocate(AllocationRequest("a", token_ids=prompt))
    _step(manager, backend, history, ["a"], [40], rng)
    admitted = manager.allocate(AllocationRequest("b", token_ids=prompt + (99, 98, 97)))
    assert admitted.cached_tokens == 40
    # b's cached K/V are a's: copy them into b's history, then compute b's three new tokens
    for layer in range(2):
        history.add(layer, "b", np.stack(history.k[(layer, "a")]), np.stack(history.v[(layer, "a")]))
    _step(manager, backend, history, ["b"], [3], rng)
    manager.check_invariants()
