"""What paging costs in NumPy: paged attention against the same attention over contiguous K/V.

Shapes of issue 3: decode of 8 sequences x 2,048 tokens and prefill of 1 x
2,048 causal; 32 query heads over 8 KV heads, head dim 128, float32, block
size 16, blocks handed out in shuffled order. Each paged benchmark checks its
output against its contiguous peer before timing it. ``conftest.py`` prints
the ratios (paged / contiguous, on the minimum of each) and the fraction of
the copy bandwidth measured here at the end of the run. On a shared machine
the two peers' separate timings can fall in differently loaded moments, so
the ``paired`` benchmarks also time them round by round, alternating which
goes first, and report the median of the per-round ratios.

Run: ``pytest backends/numpy/benchmarks --benchmark-enable -m benchmark``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pagedkv_core.config import CacheConfig
from pagedkv_numpy.attention import NumpyAttention, attend_contiguous
from pagedkv_numpy.storage import NumpyStorage

BATCH, SEQ, PREFILL_SEQ = 8, 2048, 2048
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
COPY_BYTES = 256 << 20  # far beyond the last-level cache


def contiguous_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The unpaged peer of decode: the same grouped matmul over ``k, v [batch, seq, kv_heads, head_dim]``.

    ``q [batch, num_q_heads, head_dim]``; every sequence sees all ``seq``
    keys. Query heads are grouped per KV head; K/V are never repeated.
    """
    batch, num_q_heads, d = q.shape
    h = k.shape[2]
    qg = q.reshape(batch, h, num_q_heads // h, d) * np.float32(d ** -0.5)
    s = np.matmul(qg, k.transpose(0, 2, 3, 1))  # [batch, h, group, seq]
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    out = np.matmul(s, v.transpose(0, 2, 1, 3))  # [batch, h, group, d]
    out /= s.sum(axis=-1, keepdims=True)
    return out.reshape(batch, num_q_heads, d)


def paged_copy(k: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> tuple[NumpyStorage, np.ndarray]:
    """``k, v [batch, seq, kv_heads, head_dim]`` written into a pool whose blocks are handed out shuffled."""
    batch, seq = k.shape[:2]
    per_seq = seq // BLOCK
    config = CacheConfig(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=batch * per_seq,
                         block_size=BLOCK, dtype="float32")
    storage = NumpyStorage(config)
    tables = rng.permutation(batch * per_seq).astype(np.int32).reshape(batch, per_seq)
    pos = np.arange(seq)
    slots = (tables[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1)
    storage.write(0, slots, k.reshape(-1, KV_HEADS, HEAD_DIM), v.reshape(-1, KV_HEADS, HEAD_DIM))
    return storage, tables


@pytest.fixture(scope="module")
def decode_case():
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((BATCH, SEQ, KV_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((BATCH, Q_HEADS, HEAD_DIM), dtype=np.float32)
    storage, tables = paged_copy(k, v, rng)
    return q, k, v, storage, tables


@pytest.fixture(scope="module")
def prefill_case():
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((1, PREFILL_SEQ, KV_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((PREFILL_SEQ, Q_HEADS, HEAD_DIM), dtype=np.float32)
    storage, tables = paged_copy(k, v, rng)
    return q, k[0], v[0], storage, tables


def record(benchmark, bench_results: dict, name: str, **info) -> None:
    stats = benchmark.stats.stats
    bench_results[name] = {"min": stats.min, "median": stats.median, **info}
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="bandwidth")
def test_copy_bandwidth(benchmark, bench_results) -> None:
    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.zeros_like(src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=10, warmup_rounds=1)
    assert np.array_equal(dst[:: 1 << 16], src[:: 1 << 16])
    record(benchmark, bench_results, "copy", bytes_moved=2 * src.nbytes)


@pytest.mark.benchmark(group="decode 8x2048")
def test_decode_contiguous(benchmark, bench_results, decode_case) -> None:
    q, k, v, _, _ = decode_case
    out = benchmark(contiguous_decode, q, k, v)
    assert out.shape == q.shape and np.isfinite(out).all()
    record(benchmark, bench_results, "decode contiguous", kv_bytes=k.nbytes + v.nbytes)


@pytest.mark.benchmark(group="decode 8x2048")
def test_decode_paged(benchmark, bench_results, decode_case) -> None:
    q, k, v, storage, tables = decode_case
    plan = NumpyAttention().plan(storage, tables, np.full(BATCH, SEQ, np.int32))
    out = benchmark(plan.run, q, 0)
    np.testing.assert_allclose(out, contiguous_decode(q, k, v), atol=1e-5, rtol=1e-5)
    record(benchmark, bench_results, "decode paged", kv_bytes=k.nbytes + v.nbytes)


@pytest.mark.benchmark(group="decode 8x2048")
def test_decode_naive_gather(benchmark, bench_results, decode_case) -> None:
    """For contrast: gather every block into contiguous arrays first, then the contiguous formulation."""
    q, k, v, storage, tables = decode_case
    pools = [pool.reshape(pool.shape[0], -1) for pool in storage.pools(0)]

    def naive() -> np.ndarray:
        k_all, v_all = (np.take(pool, tables, axis=0, mode="clip").reshape(k.shape) for pool in pools)
        return contiguous_decode(q, k_all, v_all)

    np.testing.assert_allclose(benchmark(naive), contiguous_decode(q, k, v), atol=1e-5, rtol=1e-5)
    record(benchmark, bench_results, "decode naive gather", kv_bytes=k.nbytes + v.nbytes)


@pytest.mark.benchmark(group="decode 8x2048")
def test_decode_plan(benchmark, bench_results, decode_case) -> None:
    """The once-per-step cost (validation, sort, tiles), shared by every layer."""
    q, _, _, storage, tables = decode_case
    seq_lens = np.full(BATCH, SEQ, np.int32)
    plan = benchmark(NumpyAttention().plan, storage, tables, seq_lens)
    assert plan.run(q, 0).shape == q.shape
    record(benchmark, bench_results, "decode plan")


@pytest.mark.benchmark(group="prefill 1x2048 causal")
def test_prefill_contiguous(benchmark, bench_results, prefill_case) -> None:
    q, k, v, _, _ = prefill_case
    out = benchmark.pedantic(attend_contiguous, args=(q, k, v), rounds=10, warmup_rounds=1)
    assert out.shape == q.shape and np.isfinite(out).all()
    record(benchmark, bench_results, "prefill contiguous")


@pytest.mark.benchmark(group="prefill 1x2048 causal")
def test_prefill_paged(benchmark, bench_results, prefill_case) -> None:
    """The one-call form: planning (schedule, masks) is inside the timing, as it is for the peer."""
    q, k, v, storage, tables = prefill_case
    args = (q, storage, 0, tables, [PREFILL_SEQ], [0, PREFILL_SEQ])
    out = benchmark.pedantic(NumpyAttention().prefill, args=args, rounds=10, warmup_rounds=1)
    np.testing.assert_allclose(out, attend_contiguous(q, k, v), atol=1e-5, rtol=1e-5)
    record(benchmark, bench_results, "prefill paged")


def paired_ratio(benchmark, paged, contiguous, rounds: int) -> tuple[float, float, float]:
    """Time ``paged()`` and ``contiguous()`` back to back each round, alternating the order.

    Returns the median per-round ratio paged / contiguous and each one's minimum (seconds).
    """
    times: dict[str, list[float]] = {"paged": [], "contiguous": []}
    order = [("paged", paged), ("contiguous", contiguous)]

    def one_round() -> None:
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        order.reverse()

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
    paged_s, contiguous_s = np.array(times["paged"][1:]), np.array(times["contiguous"][1:])
    return float(np.median(paged_s / contiguous_s)), float(paged_s.min()), float(contiguous_s.min())


@pytest.mark.benchmark(group="paired")
def test_decode_paired(benchmark, bench_results, decode_case) -> None:
    q, k, v, storage, tables = decode_case
    plan = NumpyAttention().plan(storage, tables, np.full(BATCH, SEQ, np.int32))
    ratio, paged_min, contiguous_min = paired_ratio(
        benchmark, lambda: plan.run(q, 0), lambda: contiguous_decode(q, k, v), rounds=30)
    assert ratio > 0 and paged_min > 0 and contiguous_min > 0
    record(benchmark, bench_results, "decode paired", ratio=ratio)


@pytest.mark.benchmark(group="paired")
def test_prefill_paired(benchmark, bench_results, prefill_case) -> None:
    q, k, v, storage, tables = prefill_case
    attention = NumpyAttention()
    ratio, paged_min, contiguous_min = paired_ratio(
        benchmark, lambda: attention.prefill(q, storage, 0, tables, [PREFILL_SEQ], [0, PREFILL_SEQ]),
        lambda: attend_contiguous(q, k, v), rounds=8)
    assert ratio > 0 and paged_min > 0 and contiguous_min > 0
    record(benchmark, bench_results, "prefill paired", ratio=ratio)
