"""Cascade (shared-prefix) decode against the same backend without it, measured in interleaved rounds.

Run: ``python -m pytest backends/numpy/benchmarks/test_bench_cascade.py -m benchmark --benchmark-only -s``
(set ``OPENBLAS_NUM_THREADS=1`` on a small shared machine: a multi-threaded
BLAS waiting on busy cores makes every figure noisy). 32 sequences share a
2,048-token prompt and own 128 tokens each; 32 query heads over 8 KV heads,
head_dim 128, block 16. A batch with no sharing checks that rows in no
group lose nothing.
"""

import statistics
import time

import numpy as np
import pytest

from pagedkv_core import CacheConfig, build_cascade
from pagedkv_numpy.backend import NumpyBackend

B, PROMPT, OWN, HQ, HKV, D, BS = 32, 2048, 128, 32, 8, 128, 16


def _batch(dtype: str, shared: bool):
    backend = NumpyBackend()
    own_blocks, prompt_blocks = OWN // BS, PROMPT // BS
    num_blocks = (1 if shared else B) * prompt_blocks + B * own_blocks
    storage = backend.create_storage(CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, num_blocks=num_blocks,
                                                 block_size=BS, dtype=dtype), "cpu")
    rng = np.random.default_rng(0)
    slots = np.arange(num_blocks * BS)
    kv = rng.standard_normal((slots.size, HKV, D)).astype(dtype)
    storage.write(0, slots, kv, kv[::-1].copy())
    ids = iter(range(num_blocks))
    common = [next(ids) for _ in range(prompt_blocks)] if shared else []
    tables = np.array([(common if shared else [next(ids) for _ in range(prompt_blocks)])
                       + [next(ids) for _ in range(own_blocks)] for _ in range(B)], np.int32)
    lens = np.full(B, PROMPT + OWN, np.int32)
    q = rng.standard_normal((B, HQ, D)).astype(dtype)
    return backend, storage, tables, lens, q


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "no-sharing"])
def test_cascade_against_plain_decode(benchmark, dtype, shared):
    backend, storage, tables, lens, q = _batch(dtype, shared)
    layout = build_cascade(tables, lens, BS)
    assert layout.num_groups == (1 if shared else 0)
    cascade = backend.attention.plan(storage, tables, lens, cascade=layout)
    plain = backend.attention.plan(storage, tables, lens)
    np.testing.assert_allclose(cascade.run(q, 0).astype(np.float64), plain.run(q, 0).astype(np.float64),
                               rtol=2e-3, atol=2e-3)
    ratios = []
    for _ in range(7):  # interleaved rounds: the ratio of each round, so machine noise cancels
        start = time.perf_counter()
        plain.run(q, 0)
        middle = time.perf_counter()
        cascade.run(q, 0)
        ratios.append((middle - start) / (time.perf_counter() - middle))
    benchmark.pedantic(cascade.run, args=(q, 0), rounds=5, iterations=1)
    speedup = statistics.median(ratios)
    benchmark.extra_info.update(speedup_median=round(speedup, 2), speedup_min=round(min(ratios), 2),
                                speedup_max=round(max(ratios), 2))
    print(f"\n{dtype} {'shared prompt' if shared else 'no sharing'}: cascade {speedup:.2f}x faster than plain "
          f"decode (7 interleaved rounds, {min(ratios):.2f}-{max(ratios):.2f})")
    if not shared:
        assert speedup > 0.8  # rows in no group take the plain path
