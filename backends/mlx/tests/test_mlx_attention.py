"""Paged attention of both kernels against the float64 oracle, on every dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from mlx_helpers import DTYPES, KERNELS, TOLERANCE, fill, import_mlx, make_config, oracle, random_tables

mx = import_mlx()

from pagedkv_mlx import kernel_host, kernel_mlx  # noqa: E402
from pagedkv_mlx.attention import MlxAttention  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One attention scenario: pool shape, batch and parameters."""

    heads: int
    q_heads: int
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None = None  # None: decode
    block_size: int = 4
    kwargs: dict = field(default_factory=dict)


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
}

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


def run_case(backend, rng, kernel: str, dtype: str, case: Case, *, q_dtype: str | None = None, layer: int = 1):
    storage = filled_storage(backend, dtype, case.heads, case.block_size)
    tables = random_tables(rng, case.seq_lens, storage.config)
    seq_lens = np.array(case.seq_lens, np.int32)
    qsl = None if case.q_lens is None else np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    n = len(case.seq_lens) if qsl is None else int(qsl[-1])
    q_dtype = q_dtype or ("float32" if dtype == "int8" else dtype)
    q = backend.asarray(rng.standard_normal((n, case.q_heads, storage.config.head_dim)), "cpu", q_dtype)
    plan = MlxAttention(kernel).plan(storage, tables, seq_lens, qsl, **case.kwargs)
    out = plan.run(q, layer)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = oracle(backend, q, storage, layer, tables, seq_lens, qsl, **case.kwargs)
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
    for name in ("decode-gqa", "decode-window", "prefill-chunked-ragged", "prefill-window-softcap"):
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
