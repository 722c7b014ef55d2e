"""``pagedkv bench``: run the pytest-benchmark suites of a checkout and write a markdown table and a PNG.

The benchmarks live beside the code they measure (``benchmarks/`` for the
core, ``backends/<name>/benchmarks/`` for each backend); this runs the ones
asked for with pytest-benchmark, then turns its JSON into a table of times
with each benchmark's extra figures (ratios, bandwidth fractions) and a bar
chart of median times. It reports only the files it really wrote, and
says up front what is missing (pytest-benchmark, a checkout, a folder).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, UnsupportedOperation

__all__ = ["BenchResult", "benchmark_paths", "run_bench", "markdown_table"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    """pytest's exit code, the files written (nothing else is claimed), and why anything was not."""

    exit_code: int
    written: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()


def benchmark_paths(root: Path, backends: Sequence[str] = ()) -> list[Path]:
    """The benchmark folders of ``root``: the core's and those of the named backends (all if none)."""
    found = {p.parent.name: p for p in sorted(root.glob("backends/*/benchmarks"))}
    unknown = [b for b in backends if b not in found]
    if unknown:
        raise InvalidArgument(f"no benchmarks for backend(s) {unknown}; known: {sorted(found)}")
    chosen = [found[b] for b in backends] if backends else list(found.values())
    core = root / "benchmarks"
    paths = ([core] if core.is_dir() and not backends else []) + chosen
    if not paths:
        raise InvalidArgument(f"no benchmark suites under {root.resolve()}: pagedkv bench runs those of a pagedkv "
                              "checkout (benchmarks/, backends/*/benchmarks/); run it there or pass --root")
    return paths


def markdown_table(report: dict[str, Any]) -> str:
    """One row per benchmark: min / median / mean in ms, rounds, and its extra figures."""
    lines = ["| benchmark | min (ms) | median (ms) | mean (ms) | rounds | figures |",
             "|---|---:|---:|---:|---:|---|"]
    for bench in report.get("benchmarks", []):
        stats = bench["stats"]
        extra = ", ".join(f"{k}={v}" for k, v in sorted(bench.get("extra_info", {}).items()))
        lines.append(f"| {bench['fullname'].split('/')[-1]} | {1e3 * stats['min']:.3f} | "
                     f"{1e3 * stats['median']:.3f} | {1e3 * stats['mean']:.3f} | {stats['rounds']} | {extra} |")
    machine = report.get("machine_info", {})
    header = f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, Python {machine.get('python_version', '?')}\n\n"
    return header + "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = report.get("benchmarks", [])
    names = [b["name"] for b in benches]
    medians = [1e3 * b["stats"]["median"] for b in benches]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    ax.barh(names, medians)
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(root: Path, backends: Sequence[str] = (), out: Path = Path("bench.md"), plot: Path | None = None,
              pytest_args: Sequence[str] = ()) -> BenchResult:
    """Run the benchmarks; write ``out`` (markdown) and ``plot`` (PNG) when there are results.

    Raises before running anything when pytest-benchmark is missing, ``root``
    holds no suites, or a target folder does not exist; a Ctrl-C inside pytest
    comes back as ``KeyboardInterrupt``.
    """
    import pytest

    if importlib.util.find_spec("pytest_benchmark") is None:
        raise UnsupportedOperation("pagedkv bench needs pytest-benchmark: pip install pytest-benchmark")
    paths = benchmark_paths(root, backends)
    for target in (out, plot):
        if target is not None and not target.resolve().parent.is_dir():
            raise InvalidArgument(f"cannot write {target}: the folder {target.resolve().parent} does not exist")
    notes: list[str] = []
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        notes.append(f"no plot written to {plot}: matplotlib is not installed (pip install matplotlib)")
        plot = None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        code = int(pytest.main([*map(str, paths), "-q", "-m", "benchmark", "--benchmark-only",
                                f"--benchmark-json={raw}", "-p", "no:cacheprovider", *pytest_args]))
        if code == pytest.ExitCode.INTERRUPTED:
            raise KeyboardInterrupt
        report = json.loads(raw.read_text()) if raw.exists() else {}
    if not report.get("benchmarks"):
        return BenchResult(code or 1, (), (*notes, f"no benchmark ran (pytest exit code {code}); wrote nothing"))
    out.write_text("# pagedkv benchmarks\n\n" + markdown_table(report))
    written = [out]
    if plot is not None:
        _plot(report, plot)
        written.append(plot)
    return BenchResult(code, tuple(written), tuple(notes))
