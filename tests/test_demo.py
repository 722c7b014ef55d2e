"""`pagedkv demo`: the serving run checks itself on every available backend, and its books balance."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from pagedkv_core import (
    AllocationRequest,
    BackendUnavailable,
    CacheConfig,
    InvalidArgument,
    MemoryPressure,
    PagedKvCacheManager,
    PagedKvError,
    PressureThresholds,
    PriorityPolicy,
    UnknownBackend,
    default_registry,
    get_backend,
)
from pagedkv_core.app.demo import DemoReport, run_demo
from pagedkv_core.app.demo.engine import PagedRunner
from pagedkv_core.app.demo.model import TinyDecoder
from pagedkv_core.app.demo.progress import Progress
from pagedkv_core.app.demo.reference import reference_choices, reference_decode
from pagedkv_core.app.demo.scheduler import Live, Scheduler, StepRecord
from pagedkv_core.app.demo.selfcheck import verify
from pagedkv_core.app.demo.workload import Request, WorkloadConfig, make_workload, peak_demand


def _usable_device(name: str) -> str:
    """'cpu' if the backend can use it, else its first usable device; skips with the reasons otherwise."""
    status = default_registry().status(name)
    if not status.available:
        pytest.skip(f"backend {name} unavailable: {status.reason}")
    usable = [device for device, probe in status.devices if probe.available]
    if not usable:
        pytest.skip(f"backend {name} has no usable device: "
                    + "; ".join(f"{d}: {p.reason}" for d, p in status.devices))
    return "cpu" if "cpu" in usable else usable[0]


def _assert_consistent(report: DemoReport) -> None:
    assert report.checked > 0 and report.verified == report.checked, report.mismatches
    assert report.final_used_blocks == 0 and report.final_host_blocks == 0
    assert report.invariant_problems == ()
    assert 0.0 <= report.prefix_hit_rate <= 1.0
    assert report.generated_tokens == report.output_tokens == report.expected_tokens
    assert 0 <= report.swaps_in <= report.swaps_out == report.preemptions
    assert 0 <= report.decode_preemptions <= report.preemptions
    assert report.peak_blocks <= report.num_blocks
    assert report.latency_p50_ms <= report.latency_p99_ms
    assert report.consistent and report.ok


@pytest.mark.parametrize("backend", default_registry().names())
def test_demo_checks_itself_and_balances_its_books(backend: str) -> None:
    device = _usable_device(backend)
    out = io.StringIO()
    report = run_demo(backend, device, requests=20, progress=False, out=out)
    _assert_consistent(report)
    assert report.trims > 0 and report.trimmed_requests > 0  # the workload always has a long request
    assert report.prefix_hit_tokens > 0
    text = out.getvalue()
    assert f"verified {report.checked}/{report.checked}" in text
    assert "\r" not in text


def _numpy_runner(model: TinyDecoder) -> tuple[PagedKvCacheManager, PagedRunner]:
    backend = get_backend("numpy")
    config = CacheConfig(num_layers=4, num_kv_heads=2, head_dim=64, num_blocks=16, block_size=16)
    manager = PagedKvCacheManager(backend.create_storage(config, "cpu"))
    return manager, PagedRunner(model, backend, manager.storage, "cpu")


def _paged_decode(manager: PagedKvCacheManager, runner: PagedRunner, rid: str, prompt: tuple[int, ...],
                  n: int) -> tuple[list[int], int]:
    """Prefill (after any cached prefix) and decode ``n`` tokens; returns them and the cached prompt tokens."""
    handle = manager.allocate(AllocationRequest(rid, token_ids=prompt))
    cached = handle.num_cached_tokens
    meta = manager.batch_metadata([rid], [len(prompt) - cached])
    out = [int(runner.step(meta, np.asarray(prompt[cached:]), np.arange(cached, len(prompt)), prefill=True)[0])]
    while len(out) < n:
        position = handle.num_tokens
        meta = manager.append_slots([rid], [out[-1]])
        out.append(int(runner.step(meta, np.asarray(out[-1:]), np.asarray([position]), prefill=False)[0]))
    return out, cached


SHARED = tuple(range(100, 132))  # two full blocks


def test_the_paged_decode_equals_the_reference_decode() -> None:
    """One short request, then one that reuses its prefix from the cache: both decode like the oracle."""
    model = TinyDecoder.create(seed=1)
    manager, runner = _numpy_runner(model)
    reference = model.astype(np.float64)
    for rid, prompt, expect_cached in (("a", SHARED + (7, 8, 9), 0), ("b", SHARED + (1, 2, 3, 4, 5), 32)):
        out, cached = _paged_decode(manager, runner, rid, prompt, 6)
        assert cached == expect_cached
        assert out == reference_decode(reference, prompt, 6)
        assert reference_choices(reference, prompt, out) == out
    manager.check_invariants()


def test_the_self_check_catches_a_cache_that_loses_tokens() -> None:
    """Decode writes silently dropped (slot -1): the outputs drift and ``verify`` says where."""
    model = TinyDecoder.create(seed=1)
    manager, runner = _numpy_runner(model)
    write = manager.storage.write
    manager.storage.write = lambda layer, slots, k, v: write(layer, np.full(len(slots), -1) if len(slots) == 1
                                                             else slots, k, v)
    prompt = SHARED + (7, 8, 9)
    out, _ = _paged_decode(manager, runner, "a", prompt, 12)
    result = verify(model, [Live(Request("a", 0, prompt, 12), out)])
    assert (result.verified, result.checked) == (0, 1)
    assert "the reference decodes" in result.mismatches[0]


def test_a_decode_step_out_of_blocks_preempts_by_swapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CRITICAL relief switched off, a full pool makes append_slots fail; the victims swap out and back."""
    monkeypatch.setattr(Scheduler, "_relieve_critical", lambda self: None)
    backend = get_backend("numpy")
    model = TinyDecoder.create(seed=3)
    config = CacheConfig(num_layers=4, num_kv_heads=2, head_dim=64, num_blocks=24, num_host_blocks=96,
                         max_seq_len=256, pressure=PressureThresholds(0.5, 0.7, 1.0))
    manager = PagedKvCacheManager(backend.create_storage(config, "cpu"), eviction_policy=PriorityPolicy())
    workload = make_workload(10, seed=3, config=WorkloadConfig(context=128))  # a shorter long request
    scheduler = Scheduler(manager, PagedRunner(model, backend, manager.storage, "cpu"), workload)
    finished = scheduler.run()
    assert scheduler.decode_preemptions > 0
    assert manager.stats().swap_in_count == manager.stats().swap_out_count == scheduler.preemptions
    assert manager.stats().used_blocks == 0 and not manager.check_invariants(raise_on_error=False)
    untrimmed = [live for live in finished if live.trims == 0]
    assert any(live.swaps for live in untrimmed)
    result = verify(model, untrimmed)
    assert result.verified == result.checked == len(untrimmed), result.mismatches


def test_the_workload_is_reproducible_and_shaped_as_promised() -> None:
    first, again = make_workload(200, seed=5), make_workload(200, seed=5)
    assert first == again
    assert make_workload(200, seed=6) != first
    config = WorkloadConfig()
    with_system = sum(r.system >= 0 for r in first)
    assert 60 < with_system < 140
    assert all(len(r.prompt) < config.context for r in first)
    assert any(len(r.prompt) + r.max_new_tokens > config.context for r in first)
    assert [r.arrival_step for r in first] == sorted(r.arrival_step for r in first)
    assert peak_demand(first, 16, config.context) > 0
    assert all(any(len(r.prompt) + r.max_new_tokens > config.context for r in make_workload(2, seed=s))
               for s in range(5))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(step: int, finished: int) -> StepRecord:
    return StepRecord(step, 0.01, 3, 0, 2, 0, 0, finished, 10, 4, MemoryPressure.HIGH)


def test_progress_rewrites_one_line_on_a_terminal_and_prints_a_few_lines_elsewhere() -> None:
    tty, log, quiet = _Terminal(), io.StringIO(), _Terminal()
    for out, enabled in ((tty, True), (log, True), (quiet, False)):
        bar = Progress(out, total_requests=8, total_blocks=64, enabled=enabled)
        for step in range(8):
            bar.update(_record(step, step + 1))
        bar.close()
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n")
    assert "8/8 requests" in tty.getvalue() and "pressure HIGH" in tty.getvalue()
    assert "\r" not in log.getvalue() and len(log.getvalue().splitlines()) == 4
    assert quiet.getvalue() == ""


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    report = run_demo(requests=6, plot=str(path), progress=False, out=io.StringIO())
    assert report.plot == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_matplotlib_is_a_clear_error_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    out = io.StringIO()
    with pytest.raises(PagedKvError, match="pip install matplotlib"):
        run_demo(requests=2, plot="demo.png", out=out)
    assert out.getvalue() == ""


def test_bad_arguments_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        run_demo(requests=2, plot=str(tmp_path / "no" / "demo.png"), out=io.StringIO())
    with pytest.raises(UnknownBackend):
        run_demo("no-such-backend", out=io.StringIO())
    with pytest.raises(BackendUnavailable):
        run_demo("numpy", "cuda:0", out=io.StringIO())
    with pytest.raises(InvalidArgument):
        run_demo(requests=0, out=io.StringIO())
