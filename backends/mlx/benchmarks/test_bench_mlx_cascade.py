"""Cascade (shared-prefix) decode on MLX's CPU device against the same backend without it, interleaved rounds.

Run: ``python -m pytest backends/mlx/benchmarks/test_bench_mlx_cascade.py -m benchmark --benchmark-only -s``
(with ``OPENBLAS_NUM_THREADS=1`` on a small shared machine). The shapes of
the NumPy and torch cascade benchmarks: 32 sequences share a 2,048-token
prompt and own 128 tokens each; 32 query heads over 8 KV heads, head_dim
128, block 16. A batch with no sharing checks that rows in no group lose
nothing.
"""

import statistics
import time

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not importable", exc_type=ImportError)

from pagedkv_core import CacheConfig, build_cascade  # noqa: E402
from pagedkv_mlx.backend import MlxBackend  # noqa: E402

B, PROMPT, OWN, HQ, HKV, D, BS = 32, 2048, 128, 32, 8, 128, 16
ROUNDS = 7


def _batch(dtype: str, shared: bool):
    backend = MlxBackend()
    own_blocks, prompt_blocks = OWN // BS, PROMPT // BS
    num_blocks = (1 if shared else B) * prompt_blocks + B * own_blocks
    storage = backend.create_storage(CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, num_blocks=num_blocks,
                                                 block_size=BS, dtype=dtype), "cpu")
    rng = np.random.default_rng(0)
    slots = np.arange(num_blocks * BS)
    kv = rng.standard_normal((slots.size, HKV, D)).astype(np.float32)
    storage.write(0, slots, kv, kv[::-1].copy())
    ids = iter(rng.permutation(num_blocks).tolist())
    common = [next(ids) for _ in range(prompt_blocks)] if shared else []
    tables = np.array([(common if shared else [next(ids) for _ in range(prompt_blocks)])
                       + [next(ids) for _ in range(own_blocks)] for _ in range(B)], np.int32)
    lens = np.full(B, PROMPT + OWN, np.int32)
    q = backend.asarray(rng.standard_normal((B, HQ, D)), "cpu", dtype)
    return backend, storage, tables, lens, q


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "no-sharing"])
def test_mlx_cascade_against_plain_decode(benchmark, dtype, shared):
    backend, storage, tables, lens, q = _batch(dtype, shared)
    layout = build_cascade(tables, lens, BS)
    assert layout.num_groups == (1 if shared else 0)
    cascade = backend.attention.plan(storage, tables, lens, cascade=layout)
    plain = backend.attention.plan(storage, tables, lens)
    tol = 2e-3 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(backend.to_numpy(cascade.run(q, 0)), backend.to_numpy(plain.run(q, 0)),
                               rtol=tol, atol=tol)
    ratios = []
    for r in range(ROUNDS):  # interleaved rounds, the first side alternating: each round's ratio
        first, second = (plain, cascade) if r % 2 == 0 else (cascade, plain)
        start = time.perf_counter()
        first.run(q, 0)
        middle = time.perf_counter()
        second.run(q, 0)
        end = time.perf_counter()
        plain_s, cascade_s = (middle - start, end - middle) if r % 2 == 0 else (end - middle, middle - start)
        ratios.append(plain_s / cascade_s)
    benchmark.pedantic(cascade.run, args=(q, 0), rounds=3, iterations=1)
    speedup = statistics.median(ratios)
    benchmark.extra_info.update(speedup_median=round(speedup, 2), speedup_min=round(min(ratios), 2),
                                speedup_max=round(max(ratios), 2))
    print(f"\nmlx {dtype} {'shared prompt' if shared else 'no sharing'}: cascade {speedup:.2f}x faster than plain "
          f"decode ({ROUNDS} interleaved rounds, {min(ratios):.2f}-{max(ratios):.2f})")
    if not shared:
        assert speedup > 0.8  # rows in no group take the plain path
