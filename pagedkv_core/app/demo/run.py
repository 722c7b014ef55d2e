"""``pagedkv demo``: serve a synthetic workload with a tiny transformer on a backend, then check and report.

The pool is sized from the workload itself, to a share of the blocks it
would need if every request ran the moment it arrived, so a default run
goes through every pressure level, preempts and swaps; the context limit
is set so the longest requests need StreamingLLM trimming.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from ...config import CacheConfig
from ...errors import BackendUnavailable, InvalidArgument
from ...manager.facade import PagedKvCacheManager
from ...plugins import get_backend
from ...policy.eviction import PriorityPolicy
from .engine import PagedRunner
from .model import ModelConfig, TinyDecoder
from .plot import check_plot_target, write_plot
from .progress import Progress
from .report import DemoReport, RunSetup, build_report, format_report
from .scheduler import Scheduler, SchedulerConfig
from .selfcheck import choose_sample, verify
from .workload import WorkloadConfig, make_workload, peak_demand

__all__ = ["run_demo", "POOL_SHARE", "BLOCK_SIZE", "SAMPLE_SIZE", "MAX_REQUESTS"]

POOL_SHARE = 0.6
"""The pool holds this share of the workload's peak demand, so memory runs short and the scheduler must act."""
BLOCK_SIZE = 16
SAMPLE_SIZE = 8
"""Requests the self-check compares with the reference decode."""
MAX_REQUESTS = 10_000
"""A demo, not a load test: about a second per ten requests on a laptop core; the benchmarks go further."""


def _describe(c: ModelConfig) -> str:
    return (f"{c.num_layers} layers, {c.num_q_heads} query / {c.num_kv_heads} KV heads, head dim {c.head_dim}, "
            f"hidden {c.hidden_size}, vocabulary {c.vocab_size}, RoPE, RMSNorm; greedy; float32 K/V in the cache")


def _cache_config(model: ModelConfig, peak: int, context: int) -> CacheConfig:
    """A pool of ``POOL_SHARE`` of the peak demand (at least three full contexts), a host tier four times as big.

    New requests wait while any sequence is swapped out, so what is out is
    at most what the device held plus the growth since, well within four
    pools; a full host tier would end the run with ``OutOfHostBlocks``
    rather than drop a sequence's cache.
    """
    min_blocks = 3 * math.ceil(context / BLOCK_SIZE)  # a full-context sequence and room beside it
    num_blocks = max(min_blocks, math.ceil(POOL_SHARE * peak))
    return CacheConfig(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                       num_blocks=num_blocks, block_size=BLOCK_SIZE, dtype="float32",
                       num_host_blocks=4 * num_blocks, max_seq_len=context)


def run_demo(backend: str = "numpy", device: str = "cpu", requests: int = 200, seed: int = 0,
             plot: str | None = None, out: TextIO | None = None, progress: bool = True,
             remote: str | None = None) -> DemoReport:
    """Serve ``requests`` synthetic requests on ``backend``/``device``, print progress and the report to ``out``.

    Returns the :class:`DemoReport`; the self-check passed when
    ``report.verified == report.checked`` (the CLI exits non-zero otherwise).
    ``plot`` is a path for a PNG of block use and pressure (needs matplotlib).
    ``remote`` is a Redis/Valkey URL: prefix blocks are shared through it, so
    a second run (another process) loads the prompts the first computed.
    Raises ``UnknownBackend`` / ``BackendUnavailable`` for a backend or device
    that cannot be used here.
    """
    out = sys.stdout if out is None else out  # looked up per call, so redirected stdout is honoured
    if isinstance(requests, bool) or not isinstance(requests, int) or not 1 <= requests <= MAX_REQUESTS:
        raise InvalidArgument(f"--requests must be an integer from 1 to {MAX_REQUESTS:,}, got {requests!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgument(f"--seed must be a non-negative integer, got {seed!r}")
    impl = get_backend(backend)
    probe = impl.probe(device)
    if not probe.available:
        raise BackendUnavailable(backend, f"device {device!r}: {probe.reason}")

    if plot is not None:
        check_plot_target(plot)

    model = TinyDecoder.create(ModelConfig(), seed)
    workload_config = WorkloadConfig(vocab_size=model.config.vocab_size)
    sched_config = SchedulerConfig(context=workload_config.context)
    workload = make_workload(requests, seed, workload_config)
    peak = peak_demand(workload, BLOCK_SIZE, sched_config.context)
    config = _cache_config(model.config, peak, sched_config.context)
    manager = PagedKvCacheManager(impl.create_storage(config, device), eviction_policy=PriorityPolicy())
    connector = None
    if remote is not None:
        from ...remote import BlockTier, LayoutFingerprint
        from ...remote.redis_store import RedisStore

        layout = LayoutFingerprint.for_manager(manager, f"pagedkv-demo/seed-{seed}")  # the weights follow the seed
        connector = manager.attach_remote(BlockTier(RedisStore(remote), layout))
    runner = PagedRunner(model, impl, manager.storage, device)
    setup = RunSetup(backend, device, requests, seed, _describe(model.config), sched_config.context, peak,
                     sum(r.max_new_tokens for r in workload))

    out.write(f"pagedkv demo on {backend}:{device}: serving {requests} request{'' if requests == 1 else 's'} "
              f"with a pool of {config.num_blocks} blocks x {BLOCK_SIZE} tokens "
              f"({config.num_blocks / max(1, peak):.0%} of their peak demand)\n")
    bar = Progress(out, requests, config.num_blocks, enabled=progress)
    scheduler = Scheduler(manager, runner, workload, sched_config, on_step=bar.update)
    start = time.perf_counter()
    try:
        scheduler.run()
    finally:
        bar.close()
        if connector is not None:
            connector.close()
    elapsed = time.perf_counter() - start
    pressure_seconds = manager.pressure.seconds_at_levels()

    check = verify(model, choose_sample(scheduler.finished, seed, SAMPLE_SIZE))
    if plot is not None:
        title = f"pagedkv demo: {backend}:{device}, {requests} requests, seed {seed}"
        write_plot(plot, scheduler.records, config, title)
    report = build_report(setup, scheduler, manager, pressure_seconds, elapsed, check, plot,
                          None if connector is None or remote is None else (remote, connector.stats()))
    out.write(format_report(report) + "\n")
    out.flush()
    return report
