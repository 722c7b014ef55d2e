"""Paged attention of both kernels against the float64 oracle, on every dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from mlx_helpers import DTYPES, KERNELS, TOLERANCE, fill, import_mlx, make_config, oracle, random_tables

from pagedkv_core import errors
from pagedkv_core.contract.attention import AttentionParams, check_batch

mx = import_mlx()

from pagedkv_mlx import kernel_host, kernel_mlx  # noqa: E402
from pagedkv_mlx.attention import MlxAttention  # noqa: E402
from pagedkv_mlx.layout import BatchLayout, first_visible  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One attention scenario: pool shape, batch and parameters."""

    heads: int
    q_heads: int
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None = None  # None: decode
    block_size: int = 4
    kwargs: dict = field(default_factory=dict)
    sinks: str | None = None  # "moderate" or "large" (see sink_logits); None: no sinks


CASES = {
    "decode-gqa": Case(2, 8, (13, 1, 29, 8)),
    "decode-mqa": Case(1, 4, (13, 1, 29, 8)),
    "decode-mha-bs1": Case(2, 2, (7, 1, 12), block_size=1),
    "decode-window": Case(2, 8, (13, 1, 29, 8), kwargs={"sliding_window": 5}),
    "decode-softcap": Case(2, 4, (13, 1, 29, 8), kwargs={"soft_cap": 1.5, "scale": 1.0}),
    "decode-window-softcap": Case(2, 4, (17, 3, 29), kwargs={"sliding_window": 6, "soft_cap": 2.0}),
    "prefill-chunked-ragged": Case(2, 8, (20, 9, 0, 31), (6, 9, 0, 1)),
    "prefill-mqa-bs8": Case(1, 4, (20, 9, 31), (6, 9, 17), block_size=8),
    "prefill-window-softcap": Case(2, 4, (20, 9, 0, 31), (6, 9, 0, 12),
                                   kwargs={"sliding_window": 4, "soft_cap": 2.0, "scale": 0.8}),
    "prefill-noncausal": Case(2, 8, (20, 9, 31), (6, 9, 5), kwargs={"causal": False}),
    "prefill-noncausal-window": Case(2, 4, (20, 9, 31), (6, 9, 5), kwargs={"causal": False, "sliding_window": 3}),
    # chunked-local attention (chunks smaller than, equal to, not dividing the block of 4) and sinks
    "decode-chunk3": Case(2, 8, (13, 1, 29, 8), kwargs={"chunk_size": 3}),
    "decode-chunk4-window3": Case(2, 4, (13, 1, 29, 8), kwargs={"chunk_size": 4, "sliding_window": 3}),
    "decode-chunk6-sinks": Case(2, 8, (13, 1, 29, 8), kwargs={"chunk_size": 6}, sinks="moderate"),
    "decode-sinks-large-softcap": Case(2, 4, (17, 3, 29), kwargs={"soft_cap": 2.0}, sinks="large"),
    "prefill-chunk5-prefix": Case(2, 8, (20, 9, 0, 31), (13, 9, 0, 17), kwargs={"chunk_size": 5}),
    "prefill-chunk7-window-softcap-sinks": Case(2, 4, (20, 9, 0, 31), (6, 9, 0, 12), sinks="moderate",
                                                kwargs={"chunk_size": 7, "sliding_window": 4, "soft_cap": 2.0}),
    "prefill-sinks-large": Case(1, 4, (20, 9, 31), (6, 9, 17), block_size=8, sinks="large"),
    "prefill-noncausal-chunk6-sinks": Case(2, 4, (20, 9, 31), (6, 9, 5), kwargs={"causal": False, "chunk_size": 6},
                                           sinks="moderate"),
}


def sink_logits(kind: str, heads: int, rng: np.random.Generator) -> np.ndarray:
    """``moderate``: about the size of the scores; ``large``: +-60 by head (the sink takes all or nothing)."""
    if kind == "moderate":
        return rng.uniform(-3, 3, heads).astype(np.float32)
    return (np.where(np.arange(heads) % 2, -1.0, 1.0) * rng.uniform(50, 70, heads)).astype(np.float32)

_STORAGES: dict[tuple, object] = {}


def filled_storage(backend, dtype: str, heads: int, block_size: int):
    """A storage of random values per (dtype, heads, block size), shared by the module (attention never writes)."""
    key = (dtype, heads, block_size)
    if key not in _STORAGES:
        config = make_config(dtype, heads=heads, block_size=block_size, num_blocks=64)
        storage = backend.create_storage(config, "cpu")
        fill(storage, np.random.default_rng(len(_STORAGES)))
        _STORAGES[key] = storage
    return _STORAGES[key]


def run_case(backend, rng, kernel: str, dtype: str, case: Case, *, q_dtype: str | None = None, layer: int = 1,
             sinks_as=None):
    """Plan and run ``case`` with ``kernel``, and compare with the oracle.

    ``sinks_as(logits)``: how the float32 NumPy sink logits reach ``run``
    (default: as they are); the oracle gets the values handed over.
    """
    storage = filled_storage(backend, dtype, case.heads, case.block_size)
    tables = random_tables(rng, case.seq_lens, storage.config)
    seq_lens = np.array(case.seq_lens, np.int32)
    qsl = None if case.q_lens is None else np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    n = len(case.seq_lens) if qsl is None else int(qsl[-1])
    q_dtype = q_dtype or ("float32" if dtype == "int8" else dtype)
    q = backend.asarray(rng.standard_normal((n, case.q_heads, storage.config.head_dim)), "cpu", q_dtype)
    logits = None if case.sinks is None else sink_logits(case.sinks, case.q_heads, rng)
    if logits is not None and sinks_as is not None:
        logits = sinks_as(logits)
    plan = MlxAttention(kernel).plan(storage, tables, seq_lens, qsl, **case.kwargs)
    out = plan.run(q, layer, sinks=logits)
    assert out.shape == q.shape and out.dtype == q.dtype
    host_sinks = None if logits is None else backend.to_numpy(logits).astype(np.float64)
    expected = oracle(backend, q, storage, layer, tables, seq_lens, qsl, sinks=host_sinks, **case.kwargs)
    atol, rtol = TOLERANCE[q_dtype if dtype == "int8" else dtype]  # int8: the output's rounding dominates
    np.testing.assert_allclose(backend.to_numpy(out), expected, atol=atol, rtol=rtol,
                               err_msg=f"kernel={kernel} dtype={dtype} case={case}")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_oracle(backend, rng, kernel, dtype, case):
    run_case(backend, rng, kernel, dtype, CASES[case])


@pytest.mark.parametrize("q_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_pool_takes_any_float_query(backend, rng, kernel, q_dtype):
    run_case(backend, rng, kernel, "int8", CASES["prefill-window-softcap"], q_dtype=q_dtype)
    run_case(backend, rng, kernel, "int8", CASES["decode-gqa"], q_dtype=q_dtype)


@pytest.mark.parametrize("kernel", KERNELS)
def test_small_tiles_and_groups(backend, rng, kernel, monkeypatch):
    """Tiny tile budgets force many decode tiles, row groups and query tiles: same results."""
    monkeypatch.setattr(kernel_host, "TILE_BYTES", 200)
    monkeypatch.setattr(kernel_host, "SCORE_ELEMS", 300)
    monkeypatch.setattr(kernel_mlx, "TILE_SLOTS", 40)
    for name in ("decode-gqa", "decode-window", "prefill-chunked-ragged", "prefill-window-softcap", "decode-chunk3",
                 "decode-chunk6-sinks", "prefill-chunk5-prefix", "prefill-chunk7-window-softcap-sinks",
                 "prefill-noncausal-chunk6-sinks"):
        run_case(backend, rng, kernel, "float32", CASES[name])


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_plan_serves_every_layer(backend, rng, kernel):
    storage = filled_storage(backend, "float32", 2, 4)
    seq_lens = np.array([11, 30], np.int32)
    tables = random_tables(rng, seq_lens, storage.config)
    plan = MlxAttention(kernel).plan(storage, tables, seq_lens)
    q = backend.asarray(rng.standard_normal((2, 4, 8)), "cpu", "float32")
    for layer in range(storage.config.num_layers):
        expected = oracle(backend, q, storage, layer, tables, seq_lens)
        np.testing.assert_allclose(backend.to_numpy(plan.run(q, layer)), expected, atol=2e-5, rtol=2e-5)
    assert not np.allclose(backend.to_numpy(plan.run(q, 0)), backend.to_numpy(plan.run(q, 1)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_native_index_arrays(backend, rng, kernel):
    """Block tables, lengths and query offsets may come as MLX arrays."""
    storage = filled_storage(backend, "float32", 2, 4)
    seq_lens = np.array([14, 5], np.int32)
    tables = random_tables(rng, seq_lens, storage.config)
    qsl = np.array([0, 3, 8], np.int32)
    q = backend.asarray(rng.standard_normal((8, 2, 8)), "cpu", "float32")
    plan = MlxAttention(kernel).plan(storage, mx.array(tables), mx.array(seq_lens), mx.array(qsl))
    expected = oracle(backend, q, storage, 0, tables, seq_lens, qsl)
    np.testing.assert_allclose(backend.to_numpy(plan.run(q, 0)), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_queries(backend, kernel):
    """Prefill where every sequence has zero queries, and an empty decode batch: empty outputs."""
    storage = filled_storage(backend, "float16", 2, 4)
    attention = MlxAttention(kernel)
    q = backend.asarray(np.zeros((0, 4, 8)), "cpu", "float16")
    plan = attention.plan(storage, np.array([[3, 4], [5, 6]]), np.array([0, 5]), np.array([0, 0, 0]))
    out = plan.run(q, 0)
    assert out.shape == (0, 4, 8) and out.dtype == mx.float16
    out = attention.decode(q, storage, 1, np.zeros((0, 2), np.int32), np.zeros(0, np.int32))
    assert out.shape == (0, 4, 8) and out.dtype == mx.float16


def test_backend_attention_picks_host_kernel_on_cpu(backend, rng):
    storage = filled_storage(backend, "float32", 2, 4)
    plan = backend.attention.plan(storage, np.array([[1, 2]]), np.array([6]))
    assert plan.kernel_name == "host"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["decode-window-softcap", "prefill-chunked-ragged"])
def test_plan_index_with_a_hand_made_index_matches_plan(backend, rng, kernel, name):
    from pagedkv_core.contract.attention import AttentionParams, BatchIndex

    case = CASES[name]
    storage = filled_storage(backend, "float16", case.heads, case.block_size)
    tables = random_tables(rng, case.seq_lens, storage.config)
    padded = np.where(tables < 0, 10**6, tables)  # padding past a sequence's blocks: never read, whatever it is
    lens = np.asarray(case.seq_lens, np.int64)
    qsl = np.arange(lens.size + 1) if case.q_lens is None else np.concatenate([[0], np.cumsum(case.q_lens)])
    q = backend.asarray(rng.standard_normal((int(qsl[-1]), case.q_heads, 8)), "cpu", "float16")
    index = BatchIndex(padded.astype(np.int64), lens, qsl, np.diff(qsl), case.q_lens is None)
    attention = MlxAttention(kernel)
    got = attention.plan_index(storage, index, AttentionParams.make(8, **case.kwargs)).run(q, 1)
    want = attention.plan(storage, tables, lens, None if case.q_lens is None else qsl, **case.kwargs).run(q, 1)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))


# -- chunked-local attention and sinks (issue #17) ----------------------------------------------------------


@pytest.mark.parametrize("q_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_pool_with_chunks_and_sinks(backend, rng, kernel, q_dtype):
    run_case(backend, rng, kernel, "int8", CASES["prefill-chunk7-window-softcap-sinks"], q_dtype=q_dtype)
    run_case(backend, rng, kernel, "int8", CASES["decode-chunk6-sinks"], q_dtype=q_dtype)


@pytest.mark.parametrize("sink_dtype", ["float16", "bfloat16", "float32", "numpy-float64", "numpy-float16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_sinks_as_mlx_or_numpy_arrays_of_any_float_dtype(backend, rng, kernel, sink_dtype):
    if sink_dtype.startswith("numpy-"):
        convert = lambda logits: logits.astype(sink_dtype.removeprefix("numpy-"))  # noqa: E731
    else:
        convert = lambda logits: backend.asarray(logits, "cpu", sink_dtype)  # noqa: E731
    for dtype in ("float32", "bfloat16"):
        run_case(backend, rng, kernel, dtype, CASES["decode-chunk6-sinks"], sinks_as=convert)
        run_case(backend, rng, kernel, dtype, CASES["prefill-noncausal-chunk6-sinks"], sinks_as=convert)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("exact", [True, False], ids=["sinks-exact-in-dtype", "sinks-not-exact"])
def test_graph_kernel_uses_the_fused_sinks_only_when_exact(backend, rng, monkeypatch, dtype, exact):
    """The fused kernel takes sinks in q's dtype: used when no logit rounds there, else the float32 grouped path."""
    calls = []
    grouped = kernel_mlx.GraphKernel._grouped
    monkeypatch.setattr(kernel_mlx.GraphKernel, "_grouped", lambda self, *a: calls.append(1) or grouped(self, *a))
    rounded = lambda logits: backend.to_numpy(backend.asarray(logits, "cpu", dtype))  # noqa: E731
    convert = rounded if exact else (lambda logits: logits + np.float32(1 / 3))
    run_case(backend, rng, "mlx", dtype, CASES["decode-chunk6-sinks"], sinks_as=convert)
    assert bool(calls) == (not exact and dtype != "float32" or not kernel_mlx.fused_takes_sinks())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_kernel_without_fused_sinks(backend, rng, monkeypatch, dtype):
    """An MLX older than the fused kernel's ``sinks`` argument: the grouped path gives the same result."""
    monkeypatch.setattr(kernel_mlx, "fused_takes_sinks", lambda: False)
    for name in ("decode-chunk6-sinks", "prefill-sinks-large", "prefill-noncausal-chunk6-sinks"):
        run_case(backend, rng, "mlx", dtype, CASES[name])


@pytest.mark.parametrize("chunk, window", [(5, None), (8, None), (7, 3)], ids=["chunk5", "chunk8", "chunk7-w3"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_blocks_before_the_chunk_are_never_read(backend, rng, kernel, mode, chunk, window):
    """NaN in every block wholly before a row's first query's chunk: reading and masking them would give NaN.

    (A masked score's weight is 0, and 0 * NaN is NaN.) Block 0 stays
    clean: the layout pads short rows with it (read, then masked).
    """
    config = make_config("float32", heads=2, block_size=4, num_blocks=48)
    storage = backend.create_storage(config, "cpu")
    fill(storage, rng)
    lens = (13, 1, 29, 40)
    q_lens = (1, 1, 1, 1) if mode == "decode" else (5, 1, 12, 9)
    tables = random_tables(rng, lens, config)
    params = AttentionParams.make(8, sliding_window=window, chunk_size=chunk)
    poisoned = 0
    for row, (n, count) in enumerate(zip(lens, q_lens)):
        first_block = int(first_visible(np.int64(n - count), params)) // 4
        for block in tables[row, :first_block]:
            if block == 0:
                continue
            nan = np.full((4, 2, 8), np.nan, np.float32)
            storage.write(0, np.arange(4) + 4 * int(block), nan, nan)
            poisoned += 1
    assert poisoned >= 4
    seq_lens = np.array(lens, np.int32)
    qsl = None if mode == "decode" else np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = backend.asarray(rng.standard_normal((sum(q_lens), 4, 8)), "cpu", "float32")
    logits = sink_logits("moderate", 4, rng)
    kwargs = {"chunk_size": chunk, "sliding_window": window}
    out = backend.to_numpy(MlxAttention(kernel).plan(storage, tables, seq_lens, qsl, **kwargs).run(q, 0, sinks=logits))
    assert np.isfinite(out).all()
    expected = oracle(backend, q, storage, 0, tables, seq_lens, qsl, sinks=logits, **kwargs)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_layout_keeps_only_the_chunks_blocks(backend, rng):
    config = make_config("float32", block_size=4)
    lens = np.array([3, 12, 26, 41])
    tables = random_tables(rng, lens, config)
    layout = BatchLayout.build(check_batch(config, tables, lens), 4, AttentionParams.make(8, chunk_size=10))
    for r, b in enumerate(layout.seqs):
        t = int(lens[b]) - 1
        first, last = t // 10 * 10 // 4, t // 4
        assert layout.first_block[r] == first and layout.num_blocks[r] == last - first + 1
        np.testing.assert_array_equal(layout.ids[r, :last - first + 1], tables[b, first:last + 1])
    assert layout.width <= 4  # a chunk of 10 spans at most 4 blocks of 4


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sinks, error", [
    (np.zeros(3, np.float32), "ShapeMismatch"),
    (np.zeros(2, np.float32), "ShapeMismatch"),  # one per KV head is not enough
    (np.zeros((1, 4), np.float32), "ShapeMismatch"),
    (np.full((), 1.0, np.float32), "ShapeMismatch"),
    (np.array([0, np.nan, 1, 2], np.float32), "InvalidArgument"),
    (np.array([0, 1, np.inf, 2], np.float32), "InvalidArgument"),
    (np.array([-np.inf, 1, 0, 2], np.float64), "InvalidArgument"),
    (np.array([1e300, 1, 0, 2], np.float64), "InvalidArgument"),  # past float32, the softmax's dtype
    (np.zeros(4, np.int32), "DTypeMismatch"),
    ([0.0] * 4, "DeviceMismatch"),
    ("mx-shape", "ShapeMismatch"),
    ("mx-nan", "InvalidArgument"),
    ("mx-int", "DTypeMismatch"),
], ids=["too-few", "per-kv-head", "2d", "scalar", "nan", "inf", "minus-inf", "float64-overflow", "ints", "list",
        "mx-shape", "mx-nan", "mx-int"])
def test_bad_sinks_are_refused(backend, rng, kernel, sinks, error):
    native = {"mx-shape": mx.zeros((5,)), "mx-nan": mx.array([0.0, 1.0, float("nan"), 2.0]).astype(mx.bfloat16),
              "mx-int": mx.zeros((4,), mx.int32)}
    storage = filled_storage(backend, "float16", 2, 4)
    plan = MlxAttention(kernel).plan(storage, np.array([[1, 2], [3, 4]]), np.array([6, 3]))
    q = backend.asarray(rng.standard_normal((2, 4, 8)), "cpu", "float16")
    with pytest.raises(getattr(errors, error)):
        plan.run(q, 0, sinks=native.get(sinks, sinks) if isinstance(sinks, str) else sinks)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_call_forms_take_chunk_size_and_sinks(backend, rng, kernel):
    storage = filled_storage(backend, "float32", 2, 4)
    seq_lens = np.array([14, 5], np.int32)
    tables = random_tables(rng, seq_lens, storage.config)
    qsl = np.array([0, 9, 12], np.int32)
    q = backend.asarray(rng.standard_normal((12, 4, 8)), "cpu", "float32")
    logits = sink_logits("moderate", 4, rng)
    attention = MlxAttention(kernel)
    got = attention.prefill(q, storage, 1, tables, seq_lens, qsl, chunk_size=6, sinks=logits)
    want = attention.plan(storage, tables, seq_lens, qsl, chunk_size=6).run(q, 1, sinks=logits)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
