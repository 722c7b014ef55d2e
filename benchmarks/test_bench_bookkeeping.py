"""Bookkeeping benchmark: the manager's cost per decode token on a seeded continuous-batching trace.

Run: ``make bench PYTEST_FLAGS=benchmarks/test_bench_bookkeeping.py`` (or
``python -m pytest benchmarks/test_bench_bookkeeping.py -m benchmark --benchmark-only -s``).
"""

import pytest
from bookkeeping_trace import make_requests, run_trace

REQUESTS = make_requests(2000)


@pytest.mark.benchmark
@pytest.mark.parametrize("hash_algorithm", ["sha256", "builtin"])
def test_bookkeeping_trace(benchmark, hash_algorithm):
    result = benchmark.pedantic(run_trace, args=(REQUESTS,), kwargs={"hash_algorithm": hash_algorithm},
                                rounds=3, iterations=1)
    benchmark.extra_info.update(
        us_per_decode_token=round(result.us_per_decode_token, 3),
        decode_tokens=result.decode_tokens,
        block_ops_per_second=round(result.block_ops_per_second),
        prefix_hit_rate=round(result.hit_rate, 4),
        preemptions=result.preemptions,
        mean_waste=round(float(result.mean_waste), 5),
        max_partial_blocks_per_seq=round(result.max_partial_blocks_per_seq, 3),
    )
    print(f"\n{hash_algorithm}: {result.wall_seconds:.2f} s wall, {result.us_per_decode_token:.2f} us/decode token, "
          f"{result.block_ops_per_second:,.0f} block ops/s, hit rate {result.hit_rate:.1%}, "
          f"{result.preemptions} preemptions, waste {result.mean_waste:.4%}, "
          f"worst partial blocks/seq {result.max_partial_blocks_per_seq:.2f}")
    assert result.max_partial_blocks_per_seq <= 1.0  # waste: at most one partly filled block per sequence
    assert result.hit_rate > 0.2
