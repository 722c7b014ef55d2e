"""Layer groups on a Gemma-3-like model: bytes held against the uniform cache, and decode bookkeeping.

Run: ``python -m pytest benchmarks/test_bench_hybrid.py -m benchmark --benchmark-only -s``
(``pagedkv bench`` runs it too). The workload and the floor are described in
:mod:`hybrid_memory`: 32 sequences of 8,192 tokens (prefilled in chunks of
1,024, then 128 decode steps), 5 sliding (window 1,024) : 1 full layers.
"""

import pytest
from hybrid_memory import measure


@pytest.mark.benchmark
def test_gemma_like_memory_and_bookkeeping(benchmark):
    figures = benchmark.pedantic(measure, rounds=3, iterations=1)
    benchmark.extra_info.update(
        bytes_ratio_end=round(figures.ratio_end, 4), bytes_ratio_peak=round(figures.ratio_peak, 4),
        floor=round(figures.floor, 4), uniform_us_per_token=round(figures.uniform_us_per_token, 2),
        hybrid_us_per_token=round(figures.hybrid_us_per_token, 2),
        bookkeeping_ratio=round(figures.hybrid_us_per_token / figures.uniform_us_per_token, 2))
    print(f"\nbytes held: {figures.ratio_end:.3f}x the uniform cache at the end (floor {figures.floor:.3f}), "
          f"{figures.ratio_peak:.3f}x at the peak; decode bookkeeping {figures.hybrid_us_per_token:.2f} vs "
          f"{figures.uniform_us_per_token:.2f} us/token")
    assert figures.ratio_end <= figures.floor + 0.01
