"""Collects the torch benchmarks' timings and prints the figures issue 4 asks for.

Ratios use each benchmark's minimum (the figure least disturbed by other work
on a shared machine) and, from the ``paired`` benchmarks, the median of
per-round ratios. Copy bandwidth counts bytes read plus bytes written (the
STREAM convention); a kernel's rate counts the K/V bytes it must read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

_RESULTS = pytest.StashKey[dict]()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a second one competing with the machine's other work only adds noise on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time every function once per round, rotating which goes first (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for name in names:
        fns[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


@pytest.fixture
def paired_session() -> Callable[..., dict[str, list[float]]]:
    """``paired_session(benchmark, group, fns, rounds)``: paired rounds run once under pytest-benchmark (so
    ``--benchmark-only`` keeps them); returns each function's timings, round by round."""

    def run(benchmark, group: str, fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {}
        benchmark.group = group
        benchmark.pedantic(lambda: times.update(_paired(fns, rounds)), rounds=1, iterations=1)
        return times

    return run


@pytest.fixture(scope="session")
def torch_bench_results(request: pytest.FixtureRequest) -> dict:
    """``{name: {"min": s, "median": s, "kv_bytes": n, ...}}``, filled by the benchmarks as they run."""
    return request.config.stash.setdefault(_RESULTS, {})


def _ratio_lines(results: dict) -> list[str]:
    lines = []
    for name, goal in (("decode float32", 0.5), ("decode bfloat16", 1.0), ("prefill float32", 1.1)):
        paged, peer = results.get(f"{name} paged"), results.get(f"{name} sdpa")
        if paged and peer:
            lines.append(f"{name}: paged / contiguous SDPA = {paged['min'] / peer['min']:.2f}x (min), "
                         f"{paged['median'] / peer['median']:.2f}x (median); goal <= {goal}")
        paired = results.get(f"{name} paired")
        if paired:
            lines.append(f"{name}: paired rounds, median of paged / SDPA = {paired['ratio']:.2f}x"
                         f" ({_verdict(paired['ratio'], goal)})")
    paired = results.get("decode bfloat16 vs float32")
    if paired:
        lines.append(f"decode: paired rounds, median of bfloat16 / float32 paged = {paired['ratio']:.2f}x "
                     f"(goal <= 0.7: {_verdict(paired['ratio'], 0.7)})")
    large = results.get("decode float32 32x8192 vs copy")
    if large:
        met = "goal met" if large["ratio"] >= 0.6 else "goal NOT met in this run"
        lines.append(f"decode float32 32 x 8,192: paired rounds, K/V read rate / copy bandwidth = "
                     f"{large['ratio']:.0%} (goal >= 60 %: {met})")
    for name, entry in results.items():
        if name.endswith("(torch-ops)") and "ratio" in entry:
            lines.append(f"{name.replace('paired', 'paired rounds, median ratio')}: {entry['ratio']:.2f}x "
                         "(the torch-op kernel, for comparison)")
    return lines


def _verdict(ratio: float, goal: float) -> str:
    met = ratio <= goal
    return "goal met" if met else "goal NOT met in this run"


def _bandwidth_lines(results: dict) -> list[str]:
    lines = []
    for device, copy_name in (("cpu", "copy cpu"), ("cuda", "copy cuda")):
        copy = results.get(copy_name)
        if not copy:
            continue
        bandwidth = copy["bytes_moved"] / copy["min"]
        lines.append(f"{device} copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
        for name, entry in results.items():
            if entry.get("device") == device and "kv_bytes" in entry:
                rate = entry["kv_bytes"] / entry["min"]
                lines.append(f"  {name}: K/V read at {rate / 1e9:.1f} GB/s = {rate / bandwidth:.0%} of copy bandwidth")
    return lines


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    lines = _ratio_lines(results) + _bandwidth_lines(results)
    if lines:
        terminalreporter.section("paged attention (torch)")
        for line in lines:
            terminalreporter.write_line(line)
