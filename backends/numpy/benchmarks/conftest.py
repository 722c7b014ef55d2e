"""Collects the NumPy benchmarks' timings and prints the ratios issue 3 asks for.

Ratios use each benchmark's minimum, the figure least disturbed by other
work on the machine. Copy bandwidth counts bytes read plus bytes written
(the STREAM convention); decode's fraction of it counts the K/V bytes read.
"""

from __future__ import annotations

import pytest

_RESULTS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def bench_results(request: pytest.FixtureRequest) -> dict:
    """``{benchmark name: {"min": s, "median": s, ...}}``, filled by the benchmarks as they run."""
    return request.config.stash.setdefault(_RESULTS, {})


def _lines(results: dict) -> list[str]:
    lines = []
    for kind in ("decode", "prefill"):
        paged, peer = results.get(f"{kind} paged"), results.get(f"{kind} contiguous")
        if paged and peer:
            lines.append(f"{kind}: paged / contiguous = {paged['min'] / peer['min']:.2f}x (min), "
                         f"{paged['median'] / peer['median']:.2f}x (median)")
        paired = results.get(f"{kind} paired")
        if paired:
            lines.append(f"{kind}: paired rounds, median of paged / contiguous = {paired['ratio']:.2f}x")
    copy = results.get("copy")
    if copy:
        bandwidth = copy["bytes_moved"] / copy["min"]
        lines.append(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
        for name in ("decode paged", "decode contiguous", "decode naive gather"):
            if name in results:
                rate = results[name]["kv_bytes"] / results[name]["min"]
                lines.append(f"{name}: K/V read at {rate / 1e9:.1f} GB/s = {rate / bandwidth:.0%} of copy bandwidth")
    return lines


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    lines = _lines(config.stash.get(_RESULTS, {}))
    if lines:
        terminalreporter.section("paging cost (numpy)")
        for line in lines:
            terminalreporter.write_line(line)
