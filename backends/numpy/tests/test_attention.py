"""NumPy paged attention against the float64 oracle, and its refusals of bad input.

Every batch is built the way an engine builds one: blocks handed out in
shuffled order, table padding filled with ids that must never be read (-1 or
past the pool), and the slots after ``seq_len`` in a sequence's last block
holding data that must stay hidden. K/V go in through ``NumpyStorage.write``.
The conformance suite sweeps the full cross product later; this file keeps a
readable subset that covers every code path (tiles, groups, windows, dtypes).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pagedkv_conformance.oracle import reference_attention
from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.attention import AttentionBase, AttentionParams, BatchIndex, check_batch, check_index_bounds
from pagedkv_core.errors import (
    DeviceMismatch,
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    OutOfBounds,
    ShapeMismatch,
)
from pagedkv_numpy import attention as attention_module
from pagedkv_numpy.attention import NumpyAttention, attend_contiguous
from pagedkv_numpy.storage import NumpyStorage

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "int8": 1e-5}
DTYPES = list(TOLERANCE)


@dataclass(frozen=True)
class Shape:
    """A batch shape: ``lens`` are seq_lens; ``qlens`` the prefill queries per sequence (None: decode)."""

    block_size: int
    head_dim: int
    kv_heads: int
    q_heads: int
    lens: tuple[int, ...]
    qlens: tuple[int, ...] | None = None


@dataclass
class Batch:
    storage: NumpyStorage
    tables: np.ndarray  # int32 [batch, max_blocks]
    seq_lens: np.ndarray  # int32 [batch]
    qsl: np.ndarray | None  # int32 [batch + 1], None for decode
    q: np.ndarray  # [num_queries, q_heads, head_dim]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def ragged(batch: int, block_size: int, rng: np.random.Generator, longest: int = 60) -> tuple[int, ...]:
    """Lengths that include 1, exactly a block and a block + 1, then random ones."""
    edge = [1, block_size, block_size + 1, 2 * block_size + 3]
    lens = edge[:batch] + list(rng.integers(1, longest + 1, size=max(0, batch - len(edge))))
    return tuple(int(x) for x in rng.permutation(lens))


def make_batch(rng: np.random.Generator, dtype: str, shape: Shape, *, num_layers: int = 1,
               q_dtype: str | None = None) -> Batch:
    """Shuffled block tables, K/V written through ``storage.write`` for every layer, and a random q."""
    bs = shape.block_size
    need = [-(-n // bs) for n in shape.lens]
    spare = 3
    num_blocks = sum(need) + spare
    config = CacheConfig(num_layers=num_layers, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                         num_blocks=num_blocks, block_size=bs, dtype=dtype)
    storage = NumpyStorage(config)
    ids = iter(rng.permutation(num_blocks)[:sum(need)])
    tables = np.empty((len(need), max(need, default=0) + 1), np.int32)
    for row, n in enumerate(need):
        tables[row] = -1 if row % 2 else num_blocks + 7  # padding that must never be read
        tables[row, :n] = [next(ids) for _ in range(n)]
    slots = np.concatenate([tables[row, np.arange(n * bs) // bs] * bs + np.arange(n * bs) % bs
                            for row, n in enumerate(need)] + [np.zeros(0, np.int64)])
    write_dtype = np.float32 if dtype == "int8" else np.dtype(dtype)
    for layer in range(num_layers):
        k, v = (rng.standard_normal((slots.size, shape.kv_heads, shape.head_dim)).astype(write_dtype)
                for _ in range(2))
        storage.write(layer, slots, k, v)
    seq_lens = np.array(shape.lens, np.int32)
    if shape.qlens is None:
        qsl, num_queries = None, len(shape.lens)
    else:
        qsl = np.concatenate([[0], np.cumsum(shape.qlens)]).astype(np.int32)
        num_queries = int(qsl[-1])
    q_dtype = q_dtype or ("float32" if dtype == "int8" else dtype)
    q = rng.standard_normal((num_queries, shape.q_heads, shape.head_dim)).astype(q_dtype)
    return Batch(storage, tables, seq_lens, qsl, q)


def oracle(batch: Batch, layer: int = 0, q: np.ndarray | None = None, **kwargs) -> np.ndarray:
    k_pool, v_pool = batch.storage.to_numpy(layer)
    return reference_attention(batch.q if q is None else q, k_pool, v_pool, batch.tables, batch.seq_lens,
                               batch.qsl, **kwargs)


def check_against_oracle(batch: Batch, dtype: str, layer: int = 0, **kwargs) -> np.ndarray:
    out = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, batch.qsl, **kwargs).run(batch.q, layer)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out.astype(np.float64), oracle(batch, layer, **kwargs), atol=tol, rtol=tol)
    return out


# -- decode and prefill against the oracle ---------------------------------------------------------

DECODE_SHAPES = {
    "b1-bs16-d128-mha": (1, Shape(16, 128, 2, 2, ())),
    "b3-bs1-d64-gqa4": (3, Shape(1, 64, 2, 8, ())),
    "b8-bs8-d80-gqa8": (8, Shape(8, 80, 2, 16, ())),
    "b5-bs16-d256-gqa4": (5, Shape(16, 256, 2, 8, ())),
    "b33-bs32-d96-mqa": (33, Shape(32, 96, 1, 4, ())),
    "b12-bs16-d128-gqa4": (12, Shape(16, 128, 4, 16, ())),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DECODE_SHAPES))
def test_decode_matches_oracle(rng, name: str, dtype: str) -> None:
    batch_size, shape = DECODE_SHAPES[name]
    shape = replace(shape, lens=ragged(batch_size, shape.block_size, rng))
    check_against_oracle(make_batch(rng, dtype, shape), dtype)


PREFILL_SHAPES = {
    "full-b1-bs16-d64-gqa4": Shape(16, 64, 2, 8, (41,), (41,)),
    "chunked-b4-bs8-d80-mha": Shape(8, 80, 2, 2, (1, 8, 9, 30), (1, 3, 9, 7)),
    "empty-seqs-b4-bs32-d128-mqa": Shape(32, 128, 1, 4, (0, 33, 20, 5), (0, 10, 20, 0)),
    "chunked-b5-bs1-d96-gqa8": Shape(1, 96, 1, 8, (3, 12, 1, 7, 25), (2, 4, 1, 7, 6)),
    "b2-bs16-d256-gqa4": Shape(16, 256, 2, 8, (17, 32), (17, 5)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(PREFILL_SHAPES))
def test_prefill_matches_oracle(rng, name: str, dtype: str) -> None:
    check_against_oracle(make_batch(rng, dtype, PREFILL_SHAPES[name]), dtype)


WINDOW_CAP = {
    "window1": dict(sliding_window=1),
    "window5": dict(sliding_window=5),
    "window-beyond-seq": dict(sliding_window=1000),
    "softcap2": dict(soft_cap=2.0),
    "window7-softcap1.5": dict(sliding_window=7, soft_cap=1.5),
}
MODES = {
    "decode": Shape(8, 64, 2, 8, (1, 8, 9, 30, 44, 17)),
    "prefill": Shape(8, 64, 2, 8, (1, 8, 9, 30, 44, 17), (1, 2, 9, 12, 20, 0)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(WINDOW_CAP))
def test_sliding_window_and_soft_cap(rng, name: str, mode: str) -> None:
    check_against_oracle(make_batch(rng, "float32", MODES[mode]), "float32", **WINDOW_CAP[name])


@pytest.mark.parametrize("window", [None, 6], ids=["no-window", "window6"])
def test_non_causal_prefill(rng, window: int | None) -> None:
    batch = make_batch(rng, "float64", MODES["prefill"])
    check_against_oracle(batch, "float64", causal=False, sliding_window=window)


def test_custom_scale(rng) -> None:
    check_against_oracle(make_batch(rng, "float64", MODES["prefill"]), "float64", scale=0.3)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("window", [None, 11], ids=["no-window", "window11"])
def test_many_tiles_and_groups(rng, monkeypatch, mode: str, window: int | None) -> None:
    """Tiny tiles and groups force every tiling path: row/column tiles, ragged groups, key tiles."""
    monkeypatch.setattr(attention_module, "TILE_BYTES", 2 * 8 * 2 * 32 * 4)  # two blocks per tile
    monkeypatch.setattr(attention_module, "GROUP_SLOTS", 64)
    monkeypatch.setattr(attention_module, "Q_TILE", 5)
    monkeypatch.setattr(attention_module, "K_TILE", 12)
    lens = (70, 3, 41, 8, 9, 55, 1, 24)
    qlens = None if mode == "decode" else (30, 3, 1, 8, 0, 21, 1, 13)
    batch = make_batch(rng, "float32", Shape(8, 32, 2, 4, lens, qlens))
    check_against_oracle(batch, "float32", sliding_window=window, soft_cap=3.0)


@pytest.mark.parametrize("mode", list(MODES))
def test_default_tiles_at_model_shapes(rng, mode: str) -> None:
    """Real head counts and lengths past one tile, with the shipped tile sizes (no monkeypatching)."""
    if mode == "decode":  # 64 KiB blocks, 33 rows: row tiles of 32 and 1 sequences, one block column each
        shape = Shape(16, 128, 8, 32, ragged(33, 16, rng, longest=90))
    else:  # 130 queries over 600 tokens: three query tiles, two key tiles, a window across them
        shape = Shape(16, 64, 1, 2, (600, 3), (130, 2))
    window = None if mode == "decode" else 300
    check_against_oracle(make_batch(rng, "float32", shape), "float32", sliding_window=window)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 20), (False, None), (False, 7)],
                         ids=["causal", "causal-window20", "non-causal", "non-causal-window7"])
def test_prefill_schedule_skips_hidden_tiles_and_misses_nothing(monkeypatch, causal: bool, window) -> None:
    """Rebuild visibility from the tile schedule: exactly the visible pairs, and no tile that hides all."""
    monkeypatch.setattr(attention_module, "Q_TILE", 16)
    monkeypatch.setattr(attention_module, "K_TILE", 16)
    n, seq_len, key_start = 70, 100, 8
    params = attention_module.AttentionParams.make(64, causal=causal, sliding_window=window)
    seen = np.zeros((n, seq_len - key_start), bool)
    for tile in attention_module._schedule(n, seq_len, key_start, params):
        for i0, i1, a, b, hidden in tile.queries:
            assert tile.j0 <= a < b <= tile.j1
            visible = np.ones((i1 - i0, b - a), bool) if hidden is None else ~hidden
            assert visible.any()
            assert not seen[i0:i1, a:b].any()  # each pair is computed once
            seen[i0:i1, a:b] = visible
    t = np.arange(seq_len - n, seq_len)[:, None]
    p = np.arange(key_start, seq_len)[None, :]
    expected = (p <= t) if causal or window else np.ones_like(seen)
    if window is not None:
        expected = expected & (p > t - window)
    np.testing.assert_array_equal(seen, expected)


def test_plan_reused_across_layers(rng) -> None:
    batch = make_batch(rng, "float32", MODES["prefill"], num_layers=3)
    plan = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, batch.qsl, sliding_window=9)
    outs = [plan.run(batch.q, layer) for layer in range(3)]
    for layer, out in enumerate(outs):
        np.testing.assert_allclose(out, oracle(batch, layer, sliding_window=9), atol=1e-5, rtol=1e-5)
    assert not np.allclose(outs[0], outs[1])  # each layer reads its own pools
    np.testing.assert_array_equal(plan.run(batch.q, 0), outs[0])  # scratch reuse leaves no trace


def test_plan_accepts_other_head_counts(rng) -> None:
    """The plan's scratch depends on num_q_heads, which only ``run`` learns; it adapts."""
    batch = make_batch(rng, "float32", MODES["decode"])
    plan = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens)
    for heads in (8, 2, 16):
        q = rng.standard_normal((len(batch.seq_lens), heads, 64)).astype(np.float32)
        np.testing.assert_allclose(plan.run(q, 0), oracle(batch, q=q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_dtype", ["float16", "float32"])
def test_int8_pool_takes_float16_or_float32_queries(rng, q_dtype: str) -> None:
    batch = make_batch(rng, "int8", MODES["decode"], q_dtype=q_dtype)
    out = NumpyAttention().decode(batch.q, batch.storage, 0, batch.tables, batch.seq_lens)
    assert out.dtype == np.dtype(q_dtype)
    tol = TOLERANCE["float16" if q_dtype == "float16" else "int8"]
    np.testing.assert_allclose(out.astype(np.float64), oracle(batch), atol=tol, rtol=tol)


def test_one_call_forms_match_plan(rng) -> None:
    attention = NumpyAttention()
    dec = make_batch(rng, "float64", MODES["decode"])
    np.testing.assert_array_equal(
        attention.decode(dec.q, dec.storage, 0, dec.tables, dec.seq_lens, soft_cap=4.0),
        attention.plan(dec.storage, dec.tables, dec.seq_lens, soft_cap=4.0).run(dec.q, 0))
    pre = make_batch(rng, "float64", MODES["prefill"])
    np.testing.assert_array_equal(
        attention.prefill(pre.q, pre.storage, 0, pre.tables, pre.seq_lens, pre.qsl, sliding_window=4),
        attention.plan(pre.storage, pre.tables, pre.seq_lens, pre.qsl, sliding_window=4).run(pre.q, 0))


def test_prefill_of_one_query_each_equals_decode(rng) -> None:
    """A prefill batch of single queries takes the batched decode path and must agree with decode."""
    batch = make_batch(rng, "float64", MODES["decode"])
    attention = NumpyAttention()
    qsl = np.arange(len(batch.seq_lens) + 1)
    as_prefill = attention.prefill(batch.q, batch.storage, 0, batch.tables, batch.seq_lens, qsl)
    as_decode = attention.decode(batch.q, batch.storage, 0, batch.tables, batch.seq_lens)
    np.testing.assert_allclose(as_prefill, as_decode, atol=1e-12, rtol=0)


def test_index_arguments_as_lists(rng) -> None:
    batch = make_batch(rng, "float64", MODES["prefill"])
    attention = NumpyAttention()
    from_lists = attention.prefill(batch.q, batch.storage, 0, batch.tables.tolist(), batch.seq_lens.tolist(),
                                   batch.qsl.tolist())
    from_int64 = attention.prefill(batch.q, batch.storage, 0, batch.tables.astype(np.int64),
                                   batch.seq_lens.astype(np.uint32), batch.qsl.astype(np.int64))
    np.testing.assert_array_equal(from_lists, from_int64)
    np.testing.assert_allclose(from_lists, oracle(batch), atol=1e-10, rtol=1e-10)


def test_attention_never_writes_the_pools(rng) -> None:
    batch = make_batch(rng, "int8", MODES["prefill"])
    before = [a.copy() for a in (batch.storage.k, batch.storage.v, batch.storage.k_scale, batch.storage.v_scale)]
    NumpyAttention().prefill(batch.q, batch.storage, 0, batch.tables, batch.seq_lens, batch.qsl)
    after = (batch.storage.k, batch.storage.v, batch.storage.k_scale, batch.storage.v_scale)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("kwargs", [{}, {"sliding_window": 9, "soft_cap": 2.5}, {"causal": False}],
                         ids=["causal", "window9-softcap", "non-causal"])
def test_attend_contiguous_matches_oracle(rng, dtype: str, kwargs: dict) -> None:
    """The unpaged kernel (the benchmark's prefill peer) against the oracle over a trivial table."""
    seq_len, n, heads, kv_heads, d = 37, 23, 8, 2, 64
    k, v = (rng.standard_normal((seq_len, kv_heads, d)).astype(dtype) for _ in range(2))
    q = rng.standard_normal((n, heads, d)).astype(dtype)
    out = attend_contiguous(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference_attention(q, k[:, None], v[:, None], np.arange(seq_len)[None], [seq_len], [0, n], **kwargs)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_attend_contiguous_rejects_bad_shapes(rng) -> None:
    k = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ShapeMismatch):
        attend_contiguous(np.zeros((5, 4, 8), np.float32), k, k)  # more queries than keys
    with pytest.raises(ShapeMismatch):
        attend_contiguous(np.zeros((2, 3, 8), np.float32), k, k)  # 3 heads over 2 KV heads


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def small(rng) -> Batch:
    return make_batch(rng, "float32", Shape(8, 64, 2, 8, (5, 17, 9), (2, 3, 9)))


def test_wrong_q_shape(small: Batch) -> None:
    plan = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl)
    for bad in (small.q[:-1], small.q[:, :, :32], small.q[:, :3], small.q[0]):
        with pytest.raises(ShapeMismatch):
            plan.run(np.ascontiguousarray(bad), 0)


def test_q_dtype_mismatch(small: Batch, rng) -> None:
    plan = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl)
    with pytest.raises(DTypeMismatch):
        plan.run(small.q.astype(np.float64), 0)
    int8 = make_batch(rng, "int8", MODES["decode"])
    with pytest.raises(DTypeMismatch):
        NumpyAttention().decode(int8.q.astype(np.float64), int8.storage, 0, int8.tables, int8.seq_lens)


def test_q_must_be_a_numpy_array(small: Batch) -> None:
    plan = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl)
    with pytest.raises(DeviceMismatch, match="numpy.ndarray"):
        plan.run(small.q.tolist(), 0)


def test_storage_must_be_numpy(small: Batch) -> None:
    class Foreign:
        config = small.storage.config
        device = "cuda:0"

    with pytest.raises(DeviceMismatch, match="NumpyStorage"):
        NumpyAttention().plan(Foreign(), small.tables, small.seq_lens, small.qsl)


@pytest.mark.parametrize("layer", [-1, 1, 1.0], ids=["negative", "past-the-end", "float"])
def test_layer_out_of_range(small: Batch, layer) -> None:
    plan = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl)
    with pytest.raises(InvalidArgument, match="layer"):
        plan.run(small.q, layer)


@pytest.mark.parametrize("bad_id", [-1, 10**6], ids=["negative", "past-the-pool"])
def test_block_id_out_of_range(small: Batch, bad_id: int) -> None:
    tables = small.tables.copy()
    tables[1, 2] = bad_id  # block 2 holds tokens 16..17 of the 17-token sequence
    with pytest.raises(InvalidBlock) as info:
        NumpyAttention().prefill(small.q, small.storage, 0, tables, small.seq_lens, small.qsl)
    assert info.value.block_id == bad_id and info.value.num_blocks == small.storage.config.num_blocks
    with pytest.raises(InvalidBlock):
        NumpyAttention().decode(small.q[:3], small.storage, 0, tables, small.seq_lens)


def test_negative_seq_len(small: Batch) -> None:
    with pytest.raises(InvalidArgument, match="seq_lens"):
        NumpyAttention().plan(small.storage, small.tables, [5, -1, 9], small.qsl)


def test_seq_len_beyond_table(small: Batch) -> None:
    too_long = small.tables.shape[1] * small.storage.config.block_size + 1
    with pytest.raises(OutOfBounds):
        NumpyAttention().plan(small.storage, small.tables, [5, too_long, 9], small.qsl)


def test_decode_needs_a_token(small: Batch) -> None:
    with pytest.raises(InvalidArgument):
        NumpyAttention().plan(small.storage, small.tables, [5, 0, 9])


@pytest.mark.parametrize("qsl, error", [
    ([0, 2, 5], ShapeMismatch),  # wrong length
    ([1, 3, 6, 15], InvalidArgument),  # does not start at 0
    ([0, 4, 3, 12], InvalidArgument),  # decreasing
    ([0, 6, 9, 18], InvalidArgument),  # 6 queries for 5 cached tokens
], ids=["wrong-length", "not-from-zero", "decreasing", "more-queries-than-tokens"])
def test_inconsistent_query_start_loc(small: Batch, qsl, error) -> None:
    with pytest.raises(error):
        NumpyAttention().plan(small.storage, small.tables, small.seq_lens, qsl)


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"sliding_window": 0}, {"soft_cap": -1.0}],
                         ids=["zero-scale", "zero-window", "negative-softcap"])
def test_bad_scalar_parameters(small: Batch, kwargs: dict) -> None:
    with pytest.raises(InvalidArgument):
        NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl, **kwargs)


def test_non_integer_index_arrays(small: Batch) -> None:
    with pytest.raises(InvalidArgument, match="integers"):
        NumpyAttention().plan(small.storage, small.tables.astype(np.float32), small.seq_lens, small.qsl)


# -- plan_index: a hand-made BatchIndex at the lowest kernel entry (issue #15, item 10) ---------------------


def _index(batch: Batch, tables=None, lens=None, dtype=np.int64) -> BatchIndex:
    """The batch as an engine would hand it to ``plan_index``: built by hand, no ``check_batch``."""
    tables = np.asarray(batch.tables if tables is None else tables, dtype)
    lens = np.asarray(batch.seq_lens if lens is None else lens, dtype)
    qsl = np.arange(lens.size + 1, dtype=dtype) if batch.qsl is None else np.asarray(batch.qsl, dtype)
    return BatchIndex(tables, lens, qsl, np.diff(qsl), batch.qsl is None)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32], ids=["int64", "int32"])
def test_plan_index_matches_plan(small: Batch, decode: bool, dtype) -> None:
    batch = replace(small, qsl=None, q=small.q[:3]) if decode else small
    params = AttentionParams.make(64, sliding_window=7, soft_cap=5.0)
    got = NumpyAttention().plan_index(batch.storage, _index(batch, dtype=dtype), params).run(batch.q, 0)
    want = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, batch.qsl, sliding_window=7,
                                 soft_cap=5.0).run(batch.q, 0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad_id", [100, 10**6, -1, 2**32 + 3], ids=["100", "1e6", "-1", "past-int32"])
def test_plan_index_refuses_out_of_range_ids(small: Batch, bad_id: int) -> None:
    tables = small.tables.astype(np.int64)
    tables[1, 2] = bad_id  # block 2 holds tokens 16..17 of the 17-token sequence
    with pytest.raises(InvalidBlock, match=r"block_tables\[1, 2\]") as info:
        NumpyAttention().plan_index(small.storage, _index(small, tables), AttentionParams.make(64))
    assert info.value.block_id == bad_id


@pytest.mark.parametrize("change, error", [
    (lambda t, lens, qsl, ql: (t, [5, 10**6, 9], qsl, ql), OutOfBounds),
    (lambda t, lens, qsl, ql: (t, [5, -1, 9], qsl, ql), InvalidArgument),
    (lambda t, lens, qsl, ql: (t[:2], lens, qsl, ql), ShapeMismatch),
    (lambda t, lens, qsl, ql: (t, lens, qsl, ql[::-1]), InvalidArgument),
    (lambda t, lens, qsl, ql: (t, lens, qsl[::-1].copy(), ql), InvalidArgument),
    (lambda t, lens, qsl, ql: (t.tolist(), lens, qsl, ql), DTypeMismatch),
    (lambda t, lens, qsl, ql: (t, lens.astype(np.float64), qsl, ql), DTypeMismatch),
], ids=["seq-len-past-table", "negative-seq-len", "table-rows", "query-lens-disagree", "qsl-decreasing",
        "list-not-array", "float-lens"])
def test_plan_index_refuses_inconsistent_indexes(small: Batch, change, error) -> None:
    i = _index(small)
    tables, lens, qsl, qlens = change(i.block_tables, i.seq_lens, i.query_start_loc, i.query_lens)
    with pytest.raises(error):
        NumpyAttention().plan_index(small.storage, BatchIndex(tables, np.asarray(lens), qsl, qlens, False),
                                    AttentionParams.make(64))


def test_a_decode_index_has_one_query_per_sequence(small: Batch) -> None:
    i = _index(small)
    with pytest.raises(InvalidArgument, match="one query per sequence"):
        check_index_bounds(BatchIndex(i.block_tables, i.seq_lens, i.query_start_loc, i.query_lens, True),
                           small.storage.config)


def test_plan_index_checks_storage_and_params(small: Batch) -> None:
    class Foreign:
        config = small.storage.config
        device = "cuda:0"

    with pytest.raises(DeviceMismatch, match="NumpyStorage"):
        NumpyAttention().plan_index(Foreign(), _index(small), AttentionParams.make(64))
    with pytest.raises(InvalidArgument, match="AttentionParams"):
        NumpyAttention().plan_index(small.storage, _index(small), {"scale": 0.1})
    with pytest.raises(InvalidArgument, match="BatchIndex"):
        NumpyAttention().plan_index(small.storage, (small.tables, small.seq_lens), AttentionParams.make(64))


@pytest.mark.parametrize("kwargs", [{"scale": -1.0}, {"scale": float("nan")}, {"scale": 0.1, "sliding_window": 0},
                                    {"scale": 0.1, "sliding_window": True}, {"scale": 0.1, "soft_cap": float("inf")}],
                         ids=["negative-scale", "nan-scale", "zero-window", "bool-window", "infinite-cap"])
def test_hand_made_params_are_validated_on_construction(kwargs: dict) -> None:
    with pytest.raises(InvalidArgument):
        AttentionParams(**kwargs)


def test_the_plan_owns_its_index(small: Batch) -> None:
    """Writes into the caller's arrays after planning cannot smuggle an unchecked id into the kernel."""
    index = _index(small)
    plan = NumpyAttention().plan_index(small.storage, index, AttentionParams.make(64))
    want = plan.run(small.q, 0)
    index.block_tables[:] = 10**6
    index.seq_lens[:] = 0
    np.testing.assert_array_equal(plan.run(small.q, 0), want)


# -- AttentionBase: subclasses written to plan_index, or (as before it existed) to plan -----------------------


class _PlanOnly(AttentionBase):
    """A third-party attention written before plan_index: it overrides plan and delegates to numpy's."""

    def __init__(self) -> None:
        self.calls = 0

    def plan(self, storage, block_tables, seq_lens, query_start_loc=None, **kwargs):
        self.calls += 1
        return NumpyAttention().plan(storage, block_tables, seq_lens, query_start_loc, **kwargs)


def test_a_plan_only_subclass_inherits_a_bounds_checked_plan_index(small: Batch) -> None:
    attention = _PlanOnly()
    params = AttentionParams.make(64, causal=False, scale=0.2)
    got = attention.plan_index(small.storage, _index(small), params).run(small.q, 0)
    want = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl, causal=False,
                                 scale=0.2).run(small.q, 0)
    np.testing.assert_array_equal(got, want)
    tables = small.tables.astype(np.int64)
    tables[0, 0] = 10**6
    with pytest.raises(InvalidBlock):
        attention.plan_index(small.storage, _index(small, tables), params)
    assert attention.calls == 1  # refused before the subclass's plan saw the index


def test_a_subclass_must_implement_plan_index_or_plan() -> None:
    class Neither(AttentionBase):
        pass

    with pytest.raises(TypeError, match="plan_index"):
        Neither()


def test_plan_then_plan_index_checks_a_batch_once_but_never_trusts_a_changed_index(small: Batch) -> None:
    config = small.storage.config
    index = check_batch(config, small.tables, small.seq_lens, small.qsl)
    assert check_index_bounds(index, config) is index  # plan() -> plan_index(): one check
    assert not index.block_tables.flags.writeable  # the checked arrays are the check's own, read-only copies
    bad = index.block_tables.copy()
    bad[1, 0] = 10**6
    with pytest.raises(InvalidBlock):  # dataclasses.replace keeps the record, but not the arrays it vouches for
        check_index_bounds(replace(index, block_tables=bad), config)
    with pytest.raises(InvalidBlock):  # the same index on a smaller pool
        check_index_bounds(index, replace(config, num_blocks=2))
    index.block_tables.flags.writeable = True  # a writable array may have changed since: checked again
    index.block_tables[1, 0] = 10**6
    with pytest.raises(InvalidBlock):
        NumpyAttention().plan_index(small.storage, index, AttentionParams.make(64))


def test_check_batch_copies_what_the_caller_could_change(small: Batch) -> None:
    tables = small.tables.astype(np.int64)  # int64 already: check_batch must still copy it
    index = check_batch(small.storage.config, tables, small.seq_lens, small.qsl)
    assert not np.shares_memory(index.block_tables, tables)
    tables[:] = 10**6
    assert check_index_bounds(index, small.storage.config) is index


# -- chunked-local attention and attention sinks (issue #17) -------------------------------------------------

FEATURES = {
    "chunk1": dict(chunk_size=1),
    "chunk3-lt-block": dict(chunk_size=3),
    "chunk8-eq-block": dict(chunk_size=8),
    "chunk13-not-dividing": dict(chunk_size=13),
    "chunk5-window4": dict(chunk_size=5, sliding_window=4),
    "chunk13-window20-softcap": dict(chunk_size=13, sliding_window=20, soft_cap=2.0),
    "sinks": dict(sinks="moderate"),
    "sinks-softcap": dict(sinks="moderate", soft_cap=1.5),
    "sinks-large": dict(sinks="large"),
    "sinks-chunk6-window9": dict(sinks="moderate", chunk_size=6, sliding_window=9),
}


def sink_logits(kind: str, heads: int, rng: np.random.Generator) -> np.ndarray:
    """``moderate``: about the size of the scores; ``large``: +-60 by head (the sink takes all or nothing)."""
    if kind == "moderate":
        return rng.uniform(-3, 3, heads).astype(np.float32)
    return (np.where(np.arange(heads) % 2, -1.0, 1.0) * rng.uniform(50, 70, heads)).astype(np.float32)


def check_features(batch: Batch, dtype: str, rng: np.random.Generator, sinks: str | None = None,
                   layer: int = 0, **kwargs) -> np.ndarray:
    """Plan with ``kwargs``, run with sinks of the given kind, and compare with the oracle."""
    logits = None if sinks is None else sink_logits(sinks, batch.q.shape[1], rng)
    plan = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, batch.qsl, **kwargs)
    out = plan.run(batch.q, layer, sinks=logits)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out.astype(np.float64), oracle(batch, layer, sinks=logits, **kwargs), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(FEATURES))
def test_chunk_and_sinks_match_oracle(rng, name: str, mode: str) -> None:
    check_features(make_batch(rng, "float32", MODES[mode]), "float32", rng, **FEATURES[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_chunk_and_sinks_on_every_dtype(rng, dtype: str, mode: str) -> None:
    batch = make_batch(rng, dtype, MODES[mode])
    check_features(batch, dtype, rng, sinks="moderate", chunk_size=7, sliding_window=10, soft_cap=3.0)


@pytest.mark.parametrize("window", [None, 3], ids=["no-window", "window3"])
@pytest.mark.parametrize("chunk", [4, 7])
def test_non_causal_prefill_with_chunks_and_sinks(rng, chunk: int, window: int | None) -> None:
    """Non-causal, a query sees its whole chunk (later keys too), unless a window also applies."""
    batch = make_batch(rng, "float64", MODES["prefill"])
    check_features(batch, "float64", rng, sinks="moderate", causal=False, chunk_size=chunk, sliding_window=window)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk", [3, 16, 29])
def test_chunks_and_sinks_over_many_tiles_and_groups(rng, monkeypatch, mode: str, chunk: int) -> None:
    """Tiny tiles: query tiles cut at chunk boundaries, key tiles, decode row groups over rebased tables."""
    monkeypatch.setattr(attention_module, "TILE_BYTES", 2 * 8 * 2 * 32 * 4)
    monkeypatch.setattr(attention_module, "GROUP_SLOTS", 64)
    monkeypatch.setattr(attention_module, "Q_TILE", 5)
    monkeypatch.setattr(attention_module, "K_TILE", 12)
    lens = (70, 3, 41, 8, 9, 55, 1, 24)
    qlens = None if mode == "decode" else (30, 3, 1, 8, 0, 21, 1, 13)
    batch = make_batch(rng, "float32", Shape(8, 32, 2, 4, lens, qlens))
    check_features(batch, "float32", rng, sinks="moderate", chunk_size=chunk, sliding_window=19, soft_cap=3.0)


@pytest.mark.parametrize("causal, window, chunk", [(True, None, 5), (True, 20, 16), (True, 3, 7), (False, None, 9),
                                                   (False, 7, 9), (True, None, 64)],
                         ids=["causal-chunk5", "window20-chunk16", "window3-chunk7", "non-causal-chunk9",
                              "non-causal-window7-chunk9", "chunk-past-all"])
def test_prefill_schedule_with_chunks_sees_exactly_each_chunk(monkeypatch, causal: bool, window, chunk: int) -> None:
    """Rebuild visibility from the tile schedule: every visible pair once, nothing across a chunk boundary."""
    monkeypatch.setattr(attention_module, "Q_TILE", 16)
    monkeypatch.setattr(attention_module, "K_TILE", 16)
    n, seq_len = 70, 100
    params = AttentionParams.make(64, causal=causal, sliding_window=window, chunk_size=chunk)
    key_start = int(attention_module._first_visible(np.int64(seq_len - n), params)) // 8 * 8
    seen = np.zeros((n, seq_len - key_start), bool)
    for tile in attention_module._schedule(n, seq_len, key_start, params):
        for i0, i1, a, b, hidden in tile.queries:
            t0 = seq_len - n + i0
            assert t0 // chunk == (seq_len - n + i1 - 1) // chunk  # a query tile lies in one chunk
            visible = np.ones((i1 - i0, b - a), bool) if hidden is None else ~hidden
            assert visible.any() and not seen[i0:i1, a:b].any()
            seen[i0:i1, a:b] = visible
    t = np.arange(seq_len - n, seq_len)[:, None]
    p = np.arange(key_start, seq_len)[None, :]
    expected = (p <= t) if causal or window else np.ones_like(seen)
    if window is not None:
        expected = expected & (p > t - window)
    np.testing.assert_array_equal(seen, expected & (p // chunk == t // chunk))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk, window", [(5, None), (16, None), (13, 4)], ids=["chunk5", "chunk16", "chunk13-w4"])
def test_blocks_before_the_chunk_are_never_read(rng, mode: str, chunk: int, window) -> None:
    """NaN in every block wholly before a query's chunk: a kernel that read and masked them would return NaN.

    (A masked score becomes -inf, but its value still enters the weighted
    sum as 0 * NaN.) Decode skips each row's blocks before its chunk;
    prefill skips those before its first query's chunk. Block 0 stays
    clean: decode tiles pad short rows with it (read, then masked).
    """
    qlens = None if mode == "decode" else (1, 2, 9, 12, 20, 5)
    shape = Shape(8, 64, 2, 4, (1, 8, 9, 30, 44, 57), qlens)
    batch = make_batch(rng, "float32", shape)
    bs, params = 8, AttentionParams.make(64, sliding_window=window, chunk_size=chunk)
    qlens = np.ones(len(shape.lens), np.int64) if shape.qlens is None else np.asarray(shape.qlens)
    poisoned = 0
    for row, (n, count) in enumerate(zip(shape.lens, qlens)):
        if count == 0:
            continue
        first_block = int(attention_module._first_visible(np.int64(n - count), params)) // bs
        for block in batch.tables[row, :first_block]:
            if block == 0:
                continue
            slots = np.arange(int(block) * bs, int(block) * bs + bs)
            nan = np.full((bs, 2, 64), np.nan, np.float32)
            batch.storage.write(0, slots, nan, nan)
            poisoned += 1
    assert poisoned >= 3
    out = check_features(batch, "float32", rng, sinks="moderate", chunk_size=chunk, sliding_window=window)
    assert np.isfinite(out).all()


def test_decode_tiles_hold_only_the_chunks_blocks(rng) -> None:
    """The planned decode tiles list, per row, exactly the blocks from the one holding its chunk's start."""
    batch = make_batch(rng, "float32", Shape(4, 64, 2, 4, (3, 12, 26, 41)))
    plan = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, chunk_size=10)
    read: dict[int, list[int]] = {}
    for group in plan._decode:
        assert group.width <= 4  # a chunk of 10 spans at most 4 blocks of 4
        for tile in group.tiles:
            for r, ids in zip(range(tile.r0, tile.r1), tile.ids):
                read.setdefault(int(group.rows[r]), []).extend(int(i) for i in ids)
    for row, n in enumerate(batch.seq_lens):
        t = int(n) - 1
        first, last = t // 10 * 10 // 4, t // 4
        want = [int(b) for b in batch.tables[row, first:last + 1]]
        # block 0 also pads a row shorter than the tile's columns (read, then masked)
        assert sorted(i for i in read[row] if i) == sorted(i for i in want if i), row


@pytest.mark.parametrize("sink_dtype", ["float16", "float32", "float64"])
def test_sinks_of_any_float_dtype(rng, sink_dtype: str) -> None:
    batch = make_batch(rng, "float32", MODES["decode"])
    logits = sink_logits("moderate", batch.q.shape[1], rng).astype(sink_dtype)
    out = NumpyAttention().decode(batch.q, batch.storage, 0, batch.tables, batch.seq_lens, sinks=logits)
    np.testing.assert_allclose(out, oracle(batch, sinks=logits.astype(np.float64)), atol=1e-5, rtol=1e-5)


def test_one_call_forms_take_chunk_size_and_sinks(rng) -> None:
    attention = NumpyAttention()
    pre = make_batch(rng, "float64", MODES["prefill"])
    logits = sink_logits("moderate", pre.q.shape[1], rng)
    np.testing.assert_array_equal(
        attention.prefill(pre.q, pre.storage, 0, pre.tables, pre.seq_lens, pre.qsl, chunk_size=6, sinks=logits),
        attention.plan(pre.storage, pre.tables, pre.seq_lens, pre.qsl, chunk_size=6).run(pre.q, 0, sinks=logits))


def test_sinks_are_per_layer_on_one_plan(rng) -> None:
    batch = make_batch(rng, "float32", MODES["prefill"], num_layers=2)
    plan = NumpyAttention().plan(batch.storage, batch.tables, batch.seq_lens, batch.qsl, chunk_size=9)
    for layer in range(2):
        logits = sink_logits("moderate", batch.q.shape[1], rng)
        np.testing.assert_allclose(plan.run(batch.q, layer, sinks=logits),
                                   oracle(batch, layer, chunk_size=9, sinks=logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"chunk_size": 5, "sliding_window": 9, "soft_cap": 2.5},
                                    {"causal": False, "chunk_size": 8}],
                         ids=["sinks", "chunk5-window9-softcap", "non-causal-chunk8"])
def test_attend_contiguous_with_chunks_and_sinks(rng, kwargs: dict) -> None:
    seq_len, n, heads, kv_heads, d = 37, 23, 8, 2, 64
    k, v = (rng.standard_normal((seq_len, kv_heads, d)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    logits = sink_logits("moderate", heads, rng)
    out = attend_contiguous(q, k, v, sinks=logits, **kwargs)
    ref = reference_attention(q, k[:, None], v[:, None], np.arange(seq_len)[None], [seq_len], [0, n], sinks=logits,
                              **kwargs)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sinks, error", [
    (np.zeros(7, np.float32), ShapeMismatch),
    (np.zeros(2, np.float32), ShapeMismatch),  # one per KV head is not enough
    (np.zeros((1, 8), np.float32), ShapeMismatch),
    (np.full((), 1.0, np.float32), ShapeMismatch),
    (np.array([0, 1, 2, np.nan, 0, 0, 0, 0], np.float32), InvalidArgument),
    (np.array([0, 1, 2, 0, 0, 0, 0, np.inf], np.float32), InvalidArgument),
    (np.array([-np.inf, 1, 2, 0, 0, 0, 0, 0], np.float64), InvalidArgument),
    (np.array([1e300, 1, 2, 0, 0, 0, 0, 0], np.float64), InvalidArgument),  # past float32, the pool's compute dtype
    (np.zeros(8, np.int32), DTypeMismatch),
    ([0.0] * 8, DeviceMismatch),
], ids=["too-many", "per-kv-head", "2d", "scalar", "nan", "inf", "minus-inf", "float64-overflow", "ints", "list"])
def test_bad_sinks_are_refused(small: Batch, sinks, error) -> None:
    plan = NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl)
    with pytest.raises(error):
        plan.run(small.q, 0, sinks=sinks)


@pytest.mark.parametrize("chunk", [0, -3, True, 2.5, "4"], ids=["zero", "negative", "bool", "float", "str"])
def test_bad_chunk_sizes_are_refused(small: Batch, chunk) -> None:
    with pytest.raises(InvalidArgument, match="chunk_size"):
        NumpyAttention().plan(small.storage, small.tables, small.seq_lens, small.qsl, chunk_size=chunk)
    with pytest.raises(InvalidArgument, match="chunk_size"):
        AttentionParams(0.1, chunk_size=chunk)


def test_numpy_capabilities_list_both_features() -> None:
    from pagedkv_numpy.backend import NumpyBackend

    kernels = NumpyBackend().capabilities("cpu").kernels
    assert "chunked_local" in kernels and "sinks" in kernels
