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

from pagedkv_core.errors import ShapeMismatch  # noqa: E402
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


# -- chunked-local attention and attention sinks -----------------------------------------------------------------


def assert_oracle(actual, expected: np.ndarray, dtype: str, what: str) -> None:
    """Against the float64 oracle within the conformance suite's per-dtype tolerance."""
    from pagedkv_conformance.tolerances import DEFAULT_TOLERANCES

    atol, rtol = DEFAULT_TOLERANCES[dtype]
    got = actual if isinstance(actual, np.ndarray) else actual.float().numpy()
    np.testing.assert_allclose(got.astype(np.float64), expected, atol=atol, rtol=rtol, err_msg=what)


# make_config's block size is 8: chunks smaller than a block, one block, not dividing it, several blocks
CHUNKS = {
    "chunk 3 (< block)": {"chunk_size": 3},
    "chunk 8 (= block)": {"chunk_size": 8},
    "chunk 12 (does not divide)": {"chunk_size": 12},
    "chunk 16 (two blocks)": {"chunk_size": 16},
    "chunk 5, window 3": {"chunk_size": 5, "sliding_window": 3},
    "chunk 12, window 9, cap": {"chunk_size": 12, "sliding_window": 9, "soft_cap": 1.5, "scale": 0.3},
}
SINKS = {  # per query head of 4: large positive and negative logits, and ordinary ones
    "large": np.array([30.0, -30.0, 1e4, -1e4]),
    "ordinary": np.array([0.5, -1.0, 2.0, 0.0]),
}


def _sink_values(name: str, heads: int = 4) -> np.ndarray:
    return np.resize(SINKS[name], heads).astype(np.float32)


@pytest.mark.parametrize("feature", list(CHUNKS))
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_chunked(backend, dtype, tile, feature):
    rng = np.random.default_rng(130)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8, 24, 25], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    kw = CHUNKS[feature]
    plan = _attention(TILES[tile]).plan(batch.storage, batch.block_tables, batch.seq_lens, **kw)
    assert isinstance(plan, torch_decode.TorchDecodePlan)
    out = plan.run(q, 1)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_oracle(out, oracle(batch, q_np, 1, **kw), dtype, f"decode {dtype} {tile} {feature}")


def test_chunked_decode_reads_only_the_blocks_of_its_chunk(backend):
    """Rows are rebased at their chunk's first block: a 40-token sequence with chunk 16 reads blocks 4 and 5 only."""
    rng = np.random.default_rng(131)
    batch = make_batch(backend, make_config(blocks=40), rng, [40, 17])
    plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens, chunk_size=16)
    (group,) = plan.groups
    ids = sorted(int(i) for tile in group.tiles for i in tile.ids)
    want = sorted([int(b) for b in batch.block_tables[0, 4:5]] + [int(batch.block_tables[1, 2])])
    assert group.width == 1 and ids == want


PREFILL_CHUNKED = {  # (seq_lens, query_lens, params): queries over cached prefixes cross chunk boundaries
    "ragged over prefixes": ([17, 0, 40, 9], [5, 0, 40, 1], {"chunk_size": 8}),
    "prefix crossing chunks": ([37], [20], {"chunk_size": 5}),
    "chunk 3": ([37, 20], [30, 7], {"chunk_size": 3}),
    "chunk 12 (does not divide)": ([37, 20], [30, 20], {"chunk_size": 12}),
    "one sequence, chunk-aligned": ([32], [32], {"chunk_size": 16}),
    "not causal": ([17, 40, 9], [5, 40, 9], {"chunk_size": 12, "causal": False}),
    "not causal, chunk 8": ([23], [23], {"chunk_size": 8, "causal": False}),
    "chunk, window, cap": ([37, 30], [30, 4], {"chunk_size": 12, "sliding_window": 9, "soft_cap": 2.0}),
    "chunk, window, not causal": ([17, 30], [3, 30], {"chunk_size": 7, "sliding_window": 4, "causal": False}),
}


@pytest.mark.parametrize("case", list(PREFILL_CHUNKED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunked(backend, dtype, case):
    rng = np.random.default_rng(132)
    lens, qlens, kw = PREFILL_CHUNKED[case]
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, lens, qlens)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    out = TorchAttention("torch").prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens,
                                         batch.query_start_loc, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_oracle(out, oracle(batch, q_np, 0, **kw), dtype, f"prefill {dtype} {case}")


def test_chunked_prefill_gathers_each_chunk_once(backend):
    """A 40-query prompt with chunk 16 runs as three segments whose keys are their own chunk's."""
    rng = np.random.default_rng(133)
    batch = make_batch(backend, make_config(blocks=40), rng, [40], [40])
    plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        chunk_size=16)
    keys = sum(g.count * g.keys for g in plan.groups)
    assert keys <= 40 + 8  # each key gathered about once (a padded group rounds to blocks), not 40 x 40 / 2
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    assert_oracle(plan.run(q, 0), oracle(batch, q_np, 0, chunk_size=16), "float32", "chunk segments")


def test_chunked_prefill_groups(backend, monkeypatch):
    """A small mask budget splits a chunked batch into groups of padded segments."""
    monkeypatch.setattr(torch_prefill, "GROUP_ELEMS", 400)
    rng = np.random.default_rng(134)
    batch = make_batch(backend, make_config(blocks=40), rng, [17, 0, 40, 9, 30], [5, 0, 40, 1, 12])
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    for kw in ({"chunk_size": 6}, {"chunk_size": 10, "soft_cap": 2.0}, {"chunk_size": 9, "causal": False}):
        plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens,
                                            batch.query_start_loc, **kw)
        assert len(plan.groups) >= 3
        assert_oracle(plan.run(q, 1), oracle(batch, q_np, 1, **kw), "float32", f"chunked groups {kw}")


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("feature", ["plain", "chunk 5, window 3", "chunk 12, window 9, cap"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_sinks(backend, dtype, feature, sinks):
    rng = np.random.default_rng(135)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    kw = CHUNKS.get(feature, {})
    s = _sink_values(sinks)
    out = TorchAttention("torch", tile_bytes=3 * BLOCK_BYTES).decode(q, batch.storage, 1, batch.block_tables,
                                                                      batch.seq_lens, sinks=s, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_oracle(out, oracle(batch, q_np, 1, sinks=s, **kw), dtype, f"decode sinks {dtype} {feature} {sinks}")


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("case", ["ragged over prefixes", "chunk, window, cap", "not causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_sinks(backend, dtype, case, sinks):
    rng = np.random.default_rng(136)
    lens, qlens, kw = PREFILL_CHUNKED[case]
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, lens, qlens)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    s = _sink_values(sinks)
    out = TorchAttention("torch").prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens,
                                         batch.query_start_loc, sinks=s, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_oracle(out, oracle(batch, q_np, 0, sinks=s, **kw), dtype, f"prefill sinks {dtype} {case} {sinks}")


@pytest.mark.parametrize("kv_heads, q_heads", [(2, 2), (1, 8), (2, 6)], ids=["mha", "gqa8", "gqa3"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_sinks_with_gqa(backend, kv_heads, q_heads, prefill):
    """Each query head has its own sink, also inside one KV head's group."""
    rng = np.random.default_rng(137)
    config = make_config(kv_heads=kv_heads, head_dim=40, block_size=4, blocks=64)
    batch = make_batch(backend, config, rng, [33, 2, 61], [9, 2, 61] if prefill else None)
    q, q_np = random_query(backend, batch, rng, q_heads, "float32")
    s = rng.uniform(-4, 4, q_heads)  # float64 NumPy: cast by the plan
    plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        chunk_size=6)
    assert_oracle(plan.run(q, 0, sinks=s), oracle(batch, q_np, 0, sinks=s, chunk_size=6), "float32", "gqa sinks")


@pytest.mark.parametrize("sink_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sinks_may_be_tensors_of_any_float_dtype(backend, sink_dtype):
    rng = np.random.default_rng(138)
    batch = make_batch(backend, make_config("bfloat16"), rng, [12, 30], [4, 30])
    q, q_np = random_query(backend, batch, rng, 4, "bfloat16")
    s = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=sink_dtype)
    out = TorchAttention("torch").prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens,
                                         batch.query_start_loc, sinks=s)
    assert_oracle(out, oracle(batch, q_np, 0, sinks=s.double().numpy()), "bfloat16", f"{sink_dtype} sinks")


def test_sinks_change_every_output_of_their_head_only(backend):
    """One head's sink rescales that head's rows, and never the other heads'."""
    rng = np.random.default_rng(139)
    batch = make_batch(backend, make_config(), rng, [20, 9])
    q, _ = random_query(backend, batch, rng, 4, "float32")
    plan = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens)
    plain = plan.run(q, 0)
    s = np.array([-1e4, -1e4, 2.0, -1e4], np.float32)
    got = plan.run(q, 0, sinks=s)
    assert torch.equal(got[:, [0, 1, 3]], plain[:, [0, 1, 3]])  # exp(-1e4) is exactly zero in float32
    assert (got[:, 2].abs() < plain[:, 2].abs()).all()


def test_backend_declares_chunked_local_and_sinks(backend):
    for device in [d for d in backend.devices() if backend.probe(d).available]:
        kernels = backend.capabilities(device).kernels
        assert {"chunked_local", "sinks"} <= set(kernels), device


def test_tensor_parallel_passes_chunks_and_each_rank_its_sinks(backend, monkeypatch):
    """Rank 1 of 2 gets heads 4..7 of the full sinks; ``chunk_size`` reaches the wrapped plan."""
    from pagedkv_torch import tensor_parallel
    from pagedkv_torch.tensor_parallel import HeadShard, TensorParallelAttention, TensorParallelPlan

    rng = np.random.default_rng(140)
    batch = make_batch(backend, make_config(kv_heads=2), rng, [12, 30])
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    s = np.array([0.5, -1.0, 2.0, 3.0, -4.0, 1.0, 0.0, 7.0], np.float32)  # all 8 heads of the model
    inner = TorchAttention("torch").plan(batch.storage, batch.block_tables, batch.seq_lens, chunk_size=5)

    def gather(parts, out, group=None):  # rank 0 and rank 1 computed the same local heads here
        for part in parts:
            part.copy_(out)

    monkeypatch.setattr(tensor_parallel.dist, "all_gather", gather)
    out = TensorParallelPlan(inner, HeadShard(1, 2, 8, 4), None).run(q, 0, sinks=s)
    want = oracle(batch, q_np, 0, chunk_size=5, sinks=s[4:])
    assert_oracle(out[:, 4:], want, "float32", "rank 1's heads with its sinks")
    with pytest.raises(ShapeMismatch):  # a local-heads slice is refused: it could be any rank's
        TensorParallelPlan(inner, HeadShard(1, 2, 8, 4), None).run(q, 0, sinks=s[4:])
    tp = TensorParallelAttention(TorchAttention("torch"), HeadShard(0, 1, 4, 2))
    one = tp.decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens, chunk_size=5, sinks=s[:4])
    assert_oracle(one, oracle(batch, q_np, 0, chunk_size=5, sinks=s[:4]), "float32", "world size 1")
