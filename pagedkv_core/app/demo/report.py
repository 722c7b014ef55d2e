"""What a demo run amounted to: the :class:`DemoReport` record and its text form.

Every number printed is a field, so tests and the CLI read the same
values a person reads; the record is built once from the scheduler's step
records and the manager's own counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...manager.facade import PagedKvCacheManager
from ...policy.pressure import MemoryPressure
from ...remote import RemoteStats
from .scheduler import Scheduler
from .selfcheck import CheckResult

__all__ = ["RunSetup", "DemoReport", "build_report", "format_report"]


@dataclass(frozen=True, slots=True)
class RunSetup:
    """How the run was set up (echoed in the report's header)."""

    backend: str
    device: str
    requests: int
    seed: int
    model: str
    context: int
    peak_demand_blocks: int
    expected_tokens: int  # the workload's output lengths, summed


@dataclass(frozen=True, slots=True)
class DemoReport:
    """Every number of a demo run. Latencies in milliseconds, durations in seconds, memory in blocks."""

    backend: str
    device: str
    requests: int
    seed: int
    model: str
    # the cache
    num_blocks: int
    block_size: int
    block_bytes: int  # device bytes of one block, all layers, K and V
    host_blocks: int
    context: int
    peak_demand_blocks: int
    # throughput and latency
    steps: int
    elapsed_s: float
    generated_tokens: int  # counted step by step
    output_tokens: int  # summed over the finished requests' outputs
    expected_tokens: int  # asked for by the workload
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens actually computed
    throughput_tok_s: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    # memory
    peak_blocks: int
    mean_blocks: float
    waste_fraction: float  # unused slots / slots of allocated blocks, over all steps
    mean_wasted_slots: float
    prefix_hit_rate: float
    prefix_hit_tokens: int
    prefix_query_tokens: int
    # preemption, trimming, pressure
    preemptions: int
    decode_preemptions: int  # preemptions because a decode step found no free block (the others: CRITICAL)
    swaps_out: int
    swaps_in: int
    trims: int
    trimmed_tokens: int
    trimmed_requests: int
    pressure_seconds: tuple[tuple[str, float], ...]
    pressure_steps: tuple[tuple[str, int], ...]
    pressure_changes: int
    # the end state and the self-check
    final_used_blocks: int
    final_host_blocks: int
    invariant_problems: tuple[str, ...]
    verified: int
    checked: int
    checked_ids: tuple[str, ...]
    mismatches: tuple[str, ...]
    plot: str | None = None
    # the remote tier, when one was attached (``--remote``)
    remote_url: str | None = None
    remote_queried_blocks: int = 0
    remote_hit_blocks: int = 0
    remote_put_blocks: int = 0
    remote_dropped_blocks: int = 0
    remote_errors: int = 0

    @property
    def consistent(self) -> bool:
        """The run's books balance: everything freed, every token accounted for, every swap returned."""
        return (self.final_used_blocks == 0 and self.final_host_blocks == 0 and not self.invariant_problems
                and self.generated_tokens == self.output_tokens == self.expected_tokens
                and self.swaps_in == self.swaps_out == self.preemptions)

    @property
    def ok(self) -> bool:
        return self.consistent and self.checked > 0 and self.verified == self.checked


def build_report(setup: RunSetup, scheduler: Scheduler, manager: PagedKvCacheManager,
                 pressure_seconds: dict[MemoryPressure, float], elapsed: float, check: CheckResult,
                 plot: str | None = None, remote: tuple[str, RemoteStats] | None = None) -> DemoReport:
    """Condense a finished run; call after the scheduler's loop ended and every request was freed."""
    records, config, stats = scheduler.records, manager.config, manager.stats()
    latencies = np.array([r.seconds for r in records]) * 1000 if records else np.zeros(1)
    used = np.array([r.used_blocks for r in records]) if records else np.zeros(1, np.int64)
    wasted = np.array([r.wasted_slots for r in records]) if records else np.zeros(1, np.int64)
    finished = scheduler.finished
    steps_at = {level: sum(1 for r in records if r.level == level) for level in MemoryPressure}
    remote_url, tier = (None, None) if remote is None else remote
    return DemoReport(
        backend=setup.backend, device=setup.device, requests=setup.requests, seed=setup.seed, model=setup.model,
        num_blocks=config.num_blocks, block_size=config.block_size,
        block_bytes=config.bytes_per_block, host_blocks=config.num_host_blocks,
        context=setup.context, peak_demand_blocks=setup.peak_demand_blocks,
        steps=len(records), elapsed_s=elapsed, generated_tokens=scheduler.generated,
        output_tokens=sum(len(live.output) for live in finished), expected_tokens=setup.expected_tokens,
        prompt_tokens=sum(len(live.request.prompt) for live in finished),
        prefill_tokens=sum(r.prefill_tokens for r in records),
        throughput_tok_s=scheduler.generated / elapsed if elapsed > 0 else 0.0,
        latency_mean_ms=float(latencies.mean()), latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p99_ms=float(np.percentile(latencies, 99)),
        peak_blocks=int(used.max()), mean_blocks=float(used.mean()),
        waste_fraction=float(wasted.sum() / max(1, used.sum() * config.block_size)),
        mean_wasted_slots=float(wasted.mean()),
        prefix_hit_rate=stats.cache_hit_rate, prefix_hit_tokens=stats.prefix_hits,
        prefix_query_tokens=stats.prefix_queries,
        preemptions=scheduler.preemptions, decode_preemptions=scheduler.decode_preemptions,
        swaps_out=stats.swap_out_count, swaps_in=stats.swap_in_count,
        trims=scheduler.trims, trimmed_tokens=scheduler.trimmed_tokens,
        trimmed_requests=sum(1 for live in finished if live.trims),
        pressure_seconds=tuple((level.name, pressure_seconds[level]) for level in MemoryPressure),
        pressure_steps=tuple((level.name, steps_at[level]) for level in MemoryPressure),
        pressure_changes=len(scheduler.level_changes),
        final_used_blocks=stats.used_blocks, final_host_blocks=stats.host_blocks_used,
        invariant_problems=tuple(manager.check_invariants(raise_on_error=False)),
        verified=check.verified, checked=check.checked, checked_ids=check.request_ids,
        mismatches=check.mismatches, plot=plot, remote_url=remote_url,
        remote_queried_blocks=0 if tier is None else tier.blocks_queried,
        remote_hit_blocks=0 if tier is None else tier.hit_blocks,
        remote_put_blocks=0 if tier is None else tier.put_blocks,
        remote_dropped_blocks=0 if tier is None else tier.dropped_blocks,
        remote_errors=0 if tier is None else tier.errors,
    )


def _levels(pairs: tuple[tuple[str, float], ...]) -> str:
    total = sum(v for _, v in pairs) or 1
    return ", ".join(f"{name} {value:.1f} s ({value / total:.0%})" for name, value in pairs)


def format_report(r: DemoReport) -> str:
    """The report as the demo prints it."""
    lines = [
        f"pagedkv demo report: {r.backend}:{r.device}, {r.requests} request{'' if r.requests == 1 else 's'}, "
        f"seed {r.seed}",
        f"  model        {r.model}",
        f"  cache        {r.num_blocks} blocks x {r.block_size} tokens ({r.block_bytes // 1024} KiB each), "
        f"{r.num_blocks / max(1, r.peak_demand_blocks):.0%} of the {r.peak_demand_blocks}-block peak demand; "
        f"host tier {r.host_blocks} blocks; context {r.context} tokens",
        f"  throughput   {r.throughput_tok_s:,.0f} tokens/s: {r.generated_tokens:,} tokens generated in "
        f"{r.steps} steps, {r.elapsed_s:.1f} s ({r.prefill_tokens:,} of {r.prompt_tokens:,} prompt tokens computed)",
        f"  step latency mean {r.latency_mean_ms:.1f} ms, p50 {r.latency_p50_ms:.1f} ms, "
        f"p99 {r.latency_p99_ms:.1f} ms",
        f"  blocks       peak {r.peak_blocks}/{r.num_blocks} ({r.peak_blocks / r.num_blocks:.0%}), "
        f"mean {r.mean_blocks:.1f} ({r.mean_blocks / r.num_blocks:.0%})",
        f"  memory waste {r.waste_fraction:.1%} of the slots in allocated blocks unused "
        f"(mean {r.mean_wasted_slots:.0f} slots)",
        f"  prefix cache hit rate {r.prefix_hit_rate:.1%} ({r.prefix_hit_tokens:,} of {r.prefix_query_tokens:,} "
        f"prompt tokens)",
        *([f"  remote tier  {r.remote_url}: {r.remote_hit_blocks:,} of {r.remote_queried_blocks:,} blocks asked for "
           f"were loaded ({r.remote_hit_blocks * r.block_size:,} prompt tokens not computed); "
           f"{r.remote_put_blocks:,} written, {r.remote_dropped_blocks:,} dropped, {r.remote_errors} errors"]
          if r.remote_url else []),
        f"  preemptions  {r.preemptions} ({r.preemptions - r.decode_preemptions} at CRITICAL pressure, "
        f"{r.decode_preemptions} when a decode step found no free block); swaps out {r.swaps_out}, in {r.swaps_in}",
        f"  StreamingLLM {r.trims} trims, {r.trimmed_tokens:,} tokens cut from {r.trimmed_requests} "
        f"request{'' if r.trimmed_requests == 1 else 's'}",
        f"  pressure     {_levels(r.pressure_seconds)}; {r.pressure_changes} level changes",
        f"  end state    {r.final_used_blocks} blocks in use, {r.final_host_blocks} host blocks, "
        + ("invariants hold" if not r.invariant_problems else f"INVARIANTS BROKEN: {'; '.join(r.invariant_problems)}"),
    ]
    if r.generated_tokens != r.output_tokens or r.output_tokens != r.expected_tokens:
        lines.append(f"  TOKENS DO NOT ADD UP: {r.generated_tokens} generated, {r.output_tokens} in outputs, "
                     f"{r.expected_tokens} asked for")
    lines += [f"  MISMATCH {m}" for m in r.mismatches]
    lines.append(f"verified {r.verified}/{r.checked} (sampled requests equal a float64 reference decode "
                 f"without cache)")
    if r.plot:
        lines.append(f"plot written to {r.plot}")
    return "\n".join(lines)
