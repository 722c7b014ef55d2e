"""Torch-op paged attention (the CPU kernel) against the float64 oracle.

Batches are built the way an engine builds them: shuffled blocks, table
padding that must never be read, and stale tokens after ``seq_len`` in a
sequence's last block (every slot of the pool holds random data). The tile
settings force each code path of the decode kernel: the whole batch in one
tile, one block per tile, and tiles of a few rows that short rows drop out of.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_torch import torch_decode, torch_prefill  # noqa: E402
from pagedkv_torch.attention import TorchAttention  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "int8"]
BLOCK_BYTES = 8 * 2 * 32 * 4  # float32 bytes of one block of K in make_config()
TILES = {"one tile": None, "one block per tile": 1, "3 rows x 1 block": 3 * BLOCK_BYTES}
FEATURES = {
    "plain": {},
    "window": {"sliding_window": 7},
    "soft cap": {"soft_cap": 2.0},
    "window and cap": {"sliding_window": 20, "soft_cap": 1.5, "scale": 0.3},
}


def _attention(tile):
    return TorchAttention("torch") if tile is None else TorchAttention("torch", tile_bytes=tile)


def _q_dtype(dtype):
    return "float32" if dtype == "int8" else dtype


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(backend, dtype, tile, feature):
    rng = np.random.default_rng(30)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    kw = FEATURES[feature]
    out = _attention(TILES[tile]).decode(q, batch.storage, 1, batch.block_tables, batch.seq_lens, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 1, **kw), dtype,
                 f"decode {dtype} {tile} {feature}")


@pytest.mark.parametrize("kv_heads, q_heads, block_size, head_dim", [
    (2, 2, 8, 32), (1, 8, 16, 64), (4, 8, 4, 40),
], ids=["mha", "mqa-bs16-d64", "gqa2-bs4-d40"])
def test_decode_shapes(backend, kv_heads, q_heads, block_size, head_dim):
    rng = np.random.default_rng(31)
    config = make_config(kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, blocks=64)
    batch = make_batch(backend, config, rng, [33, 2, 61])
    q, q_np = random_query(backend, batch, rng, q_heads, "float32")
    out = TorchAttention("torch").decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens)
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), "float32", "decode shapes")


@pytest.mark.parametrize("q_dtype", ["float16", "bfloat16"])
def test_int8_pool_takes_half_precision_queries(backend, q_dtype):
    rng = np.random.default_rng(32)
    batch = make_batch(backend, make_config("int8"), rng, [20, 9])
    q, q_np = random_query(backend, batch, rng, 4, q_dtype)
    out = TorchAttention("torch").decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens)
    assert out.dtype == q.dtype
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), q_dtype, "int8 pool")


PREFILL = {
    "ragged, empty and cached prefix": ([17, 0, 40, 9], [5, 0, 40, 1], {}),
    "one full causal sequence": ([37], [37], {}),
    "one sequence over a prefix": ([37], [10], {}),
    "not causal": ([17, 0, 40, 9], [5, 0, 40, 1], {"causal": False}),
    "one sequence, not causal": ([23], [23], {"causal": False}),
    "window": ([17, 30, 9], [17, 4, 9], {"sliding_window": 6}),
    "soft cap": ([17, 0, 40, 9], [5, 0, 40, 1], {"soft_cap": 2.0}),
    "soft cap, one causal sequence": ([37], [37], {"soft_cap": 1.0, "scale": 0.25}),
    "soft cap, one sequence, not causal": ([23], [23], {"soft_cap": 3.0, "causal": False}),
    "window and cap, not causal": ([17, 30], [3, 30], {"sliding_window": 9, "soft_cap": 2.0, "causal": False}),
}


@pytest.mark.parametrize("case", list(PREFILL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(backend, dtype, case):
    rng = np.random.default_rng(33)
    lens, qlens, kw = PREFILL[case]
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, lens, qlens)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    out = TorchAttention("torch").prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens,
                                         batch.query_start_loc, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0, **kw), dtype,
                 f"prefill {dtype} {case}")


def test_rows_split_into_groups(backend, monkeypatch):
    """A small score budget cuts the batch into several groups of rows (longest first)."""
    monkeypatch.setattr(torch_decode, "GROUP_SLOTS", 48)
    rng = np.random.default_rng(36)
    batch = make_batch(backend, make_config(blocks=40), rng, [17, 5, 40, 1, 8, 33], pad_value=-1)
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    plan = TorchAttention("torch", tile_bytes=2 * BLOCK_BYTES).plan(batch.storage, batch.block_tables,
                                                                    batch.seq_lens, sliding_window=12)
    assert len(plan.groups) > 2
    assert_close(backend.to_numpy(plan.run(q, 0)).astype(np.float64), oracle(batch, q_np, 0, sliding_window=12),
                 "float32", "grouped rows")


def test_prefill_groups(backend, monkeypatch):
    """A small mask budget splits a ragged batch into several padded groups."""
    monkeypatch.setattr(torch_prefill, "GROUP_ELEMS", 600)
    rng = np.random.default_rng(37)
    batch = make_batch(backend, make_config(blocks=40), rng, [17, 0, 40, 9, 30], [5, 0, 40, 1, 12])
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    for kw in ({}, {"soft_cap": 2.0}):
        plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens,
                                            batch.query_start_loc, **kw)
        assert len(plan.groups) >= 3
        assert_close(backend.to_numpy(plan.run(q, 1)).astype(np.float64), oracle(batch, q_np, 1, **kw),
                     "float32", f"prefill groups {kw}")


def test_one_plan_serves_every_layer(backend):
    rng = np.random.default_rng(34)
    batch = make_batch(backend, make_config("float16"), rng, [12, 30], [4, 30])
    plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        sliding_window=10)
    for layer in (1, 0, 1):
        q, q_np = random_query(backend, batch, rng, 2, "float16")
        kept = q.clone()
        out = plan.run(q, layer)
        assert torch.equal(q, kept)
        assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, layer, sliding_window=10),
                     "float16", f"layer {layer}")


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_queries_that_require_grad(backend, decode):
    """Attention is inference-only: it runs without autograd even on a query that tracks gradients."""
    rng = np.random.default_rng(38)
    batch = make_batch(backend, make_config(), rng, [12, 30], None if decode else [12, 3])
    q, q_np = random_query(backend, batch, rng, 2, "float32")
    q.requires_grad_(True)
    attention = TorchAttention("torch")
    out = (attention.decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens) if decode else
           attention.prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens, batch.query_start_loc))
    assert not out.requires_grad
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), "float32", "grad query")


def test_index_arrays_may_be_tensors(backend):
    rng = np.random.default_rng(35)
    batch = make_batch(backend, make_config(), rng, [12, 30])
    q, q_np = random_query(backend, batch, rng, 2, "float32")
    out = TorchAttention("torch").decode(q, batch.storage, 0, torch.from_numpy(batch.block_tables),
                                         torch.from_numpy(batch.seq_lens))
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), "float32", "tensor indices")


def test_native_kernel_is_built_in_ci():
    """The extension is optional for users; CI has a compiler, so a build that skipped it is a failure there."""
    import os
    import shutil

    from pagedkv_torch.native_decode import native_unavailable_reason

    if not os.environ.get("CI") or shutil.which("cc") is None:
        pytest.skip("checked in CI only, where a C compiler is installed")
    assert native_unavailable_reason() is None


def test_auto_kernel_on_cpu_is_native_when_built(backend):
    from pagedkv_torch.native_decode import native_unavailable_reason

    storage = backend.create_storage(make_config(), "cpu")
    assert backend.attention.kernel_for(storage) == ("native" if native_unavailable_reason(storage) is None else "torch")


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_plan_index_with_a_hand_made_index_matches_plan(backend, kernel, prefill):
    from pagedkv_core.contract.attention import AttentionParams, BatchIndex
    from pagedkv_torch.native_decode import native_unavailable_reason

    if kernel == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    rng = np.random.default_rng(90)
    batch = make_batch(backend, make_config("bfloat16"), rng, [12, 30, 1], [3, 7, 1] if prefill else None,
                       pad_value=10**6)
    q, _ = random_query(backend, batch, rng, 4, "bfloat16")
    lens = batch.seq_lens.astype(np.int64)
    qsl = np.arange(lens.size + 1) if batch.query_start_loc is None else batch.query_start_loc.astype(np.int64)
    index = BatchIndex(batch.block_tables.astype(np.int64), lens, qsl, np.diff(qsl), not prefill)
    attention = TorchAttention(kernel)
    got = attention.plan_index(batch.storage, index, AttentionParams.make(32, sliding_window=10)).run(q, 1)
    want = attention.plan(batch.storage, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                          sliding_window=10).run(q, 1)
    assert torch.equal(got, want)


def test_tensor_parallel_plan_index_delegates_to_the_wrapped_attention(backend):
    from pagedkv_core.contract.attention import AttentionParams, BatchIndex
    from pagedkv_core.errors import InvalidBlock
    from pagedkv_torch.tensor_parallel import HeadShard, TensorParallelAttention

    rng = np.random.default_rng(91)
    batch = make_batch(backend, make_config(), rng, [12, 30])
    q, _ = random_query(backend, batch, rng, 4, "float32")
    lens = batch.seq_lens.astype(np.int64)
    index = BatchIndex(batch.block_tables.astype(np.int64), lens, np.arange(3), np.ones(2, np.int64), True)
    tp = TensorParallelAttention(TorchAttention("torch"), HeadShard(0, 1, 4, 2))
    params = AttentionParams.make(32)
    assert torch.equal(tp.plan_index(batch.storage, index, params).run(q, 0),
                       tp.plan(batch.storage, batch.block_tables, batch.seq_lens).run(q, 0))
    index.block_tables[1, 0] = 10**6
    with pytest.raises(InvalidBlock):
        tp.plan_index(batch.storage, index, params)

    class ProtocolOnly:  # the Attention protocol without plan_index: the index is checked, then given to plan
        def plan(self, *args, **kwargs):
            return TorchAttention("torch").plan(*args, **kwargs)

    wrapped = TensorParallelAttention(ProtocolOnly(), HeadShard(0, 1, 4, 2))
    with pytest.raises(InvalidBlock):
        wrapped.plan_index(batch.storage, index, params)
    index.block_tables[1, 0] = batch.block_tables[1, 0]
    assert torch.equal(wrapped.plan_index(batch.storage, index, params).run(q, 0),
                       tp.plan(batch.storage, batch.block_tables, batch.seq_lens).run(q, 0))
