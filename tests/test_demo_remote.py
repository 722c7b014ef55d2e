"""`pagedkv demo --remote`: a second run, another process's worth of state, loads what the first computed.

The demo's self-check compares sampled requests with a float64 decode without
any cache, so a loaded block with wrong K/V would change greedy tokens and fail it.
"""

import io

import pytest

from pagedkv_core.app.demo import run_demo

pytest.importorskip("redis", reason="redis-py is not installed: pip install 'pagedkv[redis]'")



def test_a_second_run_loads_the_first_runs_prefixes_and_still_verifies(redis_server):
    out = io.StringIO()
    first = run_demo("numpy", requests=40, remote=redis_server.url, out=out, progress=False)
    assert first.ok and first.remote_put_blocks > 0 and first.remote_errors == 0
    second = run_demo("numpy", requests=40, remote=redis_server.url, out=out, progress=False)
    assert second.ok, out.getvalue()
    assert second.remote_hit_blocks > 0 and second.remote_errors == 0
    assert second.prefill_tokens <= first.prefill_tokens - second.remote_hit_blocks * second.block_size
    assert f"remote tier  {redis_server.url}:" in out.getvalue()
    other_seed = run_demo("numpy", requests=10, seed=1, remote=redis_server.url, out=out, progress=False)
    assert other_seed.ok and other_seed.remote_hit_blocks == 0  # other weights: another layout, no hits


def test_an_unreachable_server_only_costs_hits(tmp_path):
    out = io.StringIO()
    report = run_demo("numpy", requests=10, remote="redis://127.0.0.1:1/0", out=out, progress=False)
    assert report.ok and report.remote_hit_blocks == 0 and report.remote_errors >= 1
