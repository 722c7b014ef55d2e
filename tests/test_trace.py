"""The bookkeeping trace (benchmarks/) on a small scale: it must run clean and exercise preemption and hits."""

from bookkeeping_trace import make_requests, run_trace


def test_small_trace_runs_clean():
    result = run_trace(make_requests(150, seed=1), num_blocks=512, max_running=32)
    assert result.decode_tokens > 10_000
    assert 0.2 < result.hit_rate < 1.0
    assert result.preemptions > 0
    assert result.max_partial_blocks_per_seq <= 1.0
