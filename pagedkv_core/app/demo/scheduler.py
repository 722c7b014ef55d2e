"""Continuous batching over the paged cache: admit, prefill, decode, preempt, swap back, trim.

Each step (vLLM's order of business):

1. requests whose arrival step has come join the waiting queue;
2. at CRITICAL pressure, running sequences are preempted (the manager's
   eviction policy picks them) by swapping them out to the host tier;
3. swapped sequences come back first, oldest first, once they fit under the
   HIGH watermark, and no new request is admitted while any is still out,
   so a preempted request cannot starve;
4. waiting requests are admitted while ``can_allocate`` says they fit, the
   pool stays below CRITICAL and the step's prefill budget lasts (decoding
   then grows the admitted sequences into CRITICAL, where step 2 acts);
   their prefill computes only the tokens after the prefix the cache
   already holds;
5. the other running sequences decode one token. One that reached the
   context limit is trimmed by StreamingLLM first; if the pool cannot give
   every sequence its slot, the policy's victims are swapped out and the
   step goes on without them.

The scheduler only decides; :class:`PagedRunner` computes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...config import AllocationRequest
from ...errors import OutOfBlocks, UnknownSequence
from ...manager.facade import PagedKvCacheManager
from ...manager.handle import PagedKvCacheHandle
from ...policy.eviction import StreamingLLMPolicy
from ...policy.pressure import MemoryPressure
from .engine import PagedRunner
from .workload import Request

__all__ = ["SchedulerConfig", "Live", "StepRecord", "Scheduler"]

CRITICAL = MemoryPressure.CRITICAL


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of the serving loop. ``context``: most tokens a sequence keeps in the cache."""

    context: int = 256
    sink_tokens: int = 4
    window_tokens: int = 192
    max_prefill_tokens: int = 512


@dataclass(slots=True, eq=False)
class Live:
    """A request's life in the engine: what it generated and what happened to it."""

    request: Request
    output: list[int] = field(default_factory=list)
    handle: PagedKvCacheHandle | None = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    offset: int = 0  # tokens cut out by StreamingLLM: RoPE positions continue past them
    swaps: int = 0
    trims: int = 0
    admitted_step: int = -1
    finished_step: int = -1

    @property
    def rid(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return len(self.output) >= self.request.max_new_tokens

    @property
    def admitted(self) -> PagedKvCacheHandle:
        """The cache handle of a request the scheduler admitted (running or swapped out)."""
        if self.handle is None:
            raise UnknownSequence(self.rid)  # a waiting request has no sequence yet
        return self.handle


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one step did and the state it left; the report and the plot read these."""

    step: int
    seconds: float
    generated: int  # tokens produced this step (prefill first tokens + decode tokens)
    prefill_tokens: int  # prompt tokens computed (cache hits excluded)
    running: int
    swapped: int
    waiting: int
    finished: int  # requests finished so far
    used_blocks: int
    wasted_slots: int  # unused slots in the sequences' allocated blocks
    level: MemoryPressure  # the highest pressure seen during the step


class Scheduler:
    """Serves ``requests`` through ``manager`` and ``runner``; ``on_step(record)`` is told after every step."""

    def __init__(self, manager: PagedKvCacheManager, runner: PagedRunner, requests: list[Request],
                 config: SchedulerConfig | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> None:
        self.manager = manager
        self.runner = runner
        self.config = c = config or SchedulerConfig()
        self.on_step = on_step
        self.trim_policy = StreamingLLMPolicy(manager.config.block_size, c.sink_tokens, c.window_tokens)
        self.arrivals = deque(sorted(requests, key=lambda r: r.arrival_step))
        self.waiting: deque[Live] = deque()
        self.running: dict[str, Live] = {}  # in admission order
        self.swapped: deque[Live] = deque()
        self.finished: list[Live] = []
        self.records: list[StepRecord] = []
        self.level_changes: list[tuple[int, MemoryPressure, MemoryPressure]] = []
        self.preemptions = 0
        self.decode_preemptions = 0  # of which a decode step ran out of blocks (the rest: CRITICAL pressure)
        self.trims = 0
        self.trimmed_tokens = 0
        self.generated = 0
        self.step_index = 0
        self._step_level = manager.pressure_level
        manager.set_pressure_callback(self._on_pressure)

    def _on_pressure(self, new: MemoryPressure, old: MemoryPressure) -> None:
        self.level_changes.append((self.step_index, new, old))
        self._step_level = max(self._step_level, new)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> list[Live]:
        """Serve until every request has finished; returns them in finishing order."""
        while self.arrivals or self.waiting or self.running or self.swapped:
            if not (self.waiting or self.running or self.swapped):  # idle: skip to the next arrival
                self.step_index = max(self.step_index, self.arrivals[0].arrival_step)
            self.step()
        return self.finished

    def step(self) -> StepRecord:
        start = time.perf_counter()
        self._step_level = self.manager.pressure_level
        generated_before = self.generated
        while self.arrivals and self.arrivals[0].arrival_step <= self.step_index:
            self.waiting.append(Live(self.arrivals.popleft()))
        if self.manager.pressure_level >= CRITICAL:
            self._relieve_critical()
        swapped_in = self._swap_in()
        admitted = self._admit()
        prefill_tokens = self._prefill(admitted)
        decoding = [live for live in self.running.values() if live.admitted_step != self.step_index]
        self._decode(decoding)
        if self.manager.remote is not None:  # this step's K/V are written: share its full blocks
            self.manager.remote.commit()
        if not (admitted or decoding or swapped_in or self.running) and self.waiting and not self.arrivals:
            raise RuntimeError(f"the scheduler stalled at step {self.step_index}: {len(self.waiting)} requests "
                               f"wait and none fits an empty pool of {self.manager.config.num_blocks} blocks")
        stats = self.manager.stats()
        record = StepRecord(
            self.step_index, time.perf_counter() - start, self.generated - generated_before, prefill_tokens,
            len(self.running), len(self.swapped), len(self.waiting), len(self.finished), stats.used_blocks,
            self.manager.fragmentation_stats().wasted_token_slots, self._step_level,
        )
        self.records.append(record)
        self.step_index += 1
        if self.on_step is not None:
            self.on_step(record)
        return record

    # -- memory ---------------------------------------------------------------------------

    def _preempt(self, blocks: int) -> None:
        """Swap out the running sequences the manager's policy picks to free ``blocks`` blocks.

        The host tier is sized so it cannot fill up (``run_demo`` gives it four
        times the device pool); if it did, ``OutOfHostBlocks`` ends the run
        rather than dropping a request's cache.
        """
        required = max(1, blocks) * self.manager.config.bytes_per_block
        candidates = self.manager.select_eviction_candidates(required)
        if not candidates:
            raise OutOfBlocks(blocks, self.manager.stats().free_blocks)
        for cand in candidates:
            live = self.running.pop(cand.request_id)
            self.manager.swap_out(live.rid)
            live.swaps += 1
            self.preemptions += 1
            self.swapped.append(live)

    def _relieve_critical(self) -> None:
        total = self.manager.config.num_blocks
        limit = math.ceil(self.manager.config.pressure.critical * total) - 1  # the most blocks below CRITICAL
        while self.manager.pressure_level >= CRITICAL and self.running:
            self._preempt(self.manager.stats().used_blocks - limit)

    def _swap_in(self) -> int:
        """Bring swapped sequences back, oldest first, while they fit under the HIGH watermark."""
        config, count = self.manager.config, 0
        high = int(config.pressure.high * config.num_blocks)
        while self.swapped:
            live = self.swapped[0]
            need = live.admitted.stats().blocks_allocated
            stats = self.manager.stats()
            if need > stats.free_blocks or (self.running and stats.used_blocks + need > high):
                break
            self.manager.swap_in(live.rid)
            self.swapped.popleft()
            self.running[live.rid] = live
            count += 1
        return count

    # -- admission and prefill ----------------------------------------------------------------

    def _admit(self) -> list[Live]:
        admitted: list[Live] = []
        budget = self.config.max_prefill_tokens
        config = self.manager.config
        ceiling = math.ceil(config.pressure.critical * config.num_blocks) - 1  # the most blocks below CRITICAL
        while self.waiting and not self.swapped:
            live = self.waiting[0]
            prompt = live.request.prompt
            if admitted and len(prompt) > budget:
                break
            request = AllocationRequest(live.rid, token_ids=prompt)
            # the prompt's blocks bound what it takes (prefix hits take fewer)
            if self.manager.stats().used_blocks + request.num_blocks(config.block_size) > ceiling:
                break
            if not self.manager.can_allocate(request):
                break
            live.handle = self.manager.allocate(request)
            live.cached_tokens = live.handle.num_cached_tokens
            live.admitted_step = self.step_index
            budget -= len(prompt)
            self.waiting.popleft()
            self.running[live.rid] = live
            admitted.append(live)
        return admitted

    def _prefill(self, admitted: list[Live]) -> int:
        """Compute the admitted prompts after their cached prefixes; each yields its first token."""
        if not admitted:
            return 0
        new = [len(live.request.prompt) - live.cached_tokens for live in admitted]
        meta = self.manager.batch_metadata([live.rid for live in admitted], new)
        tokens = np.concatenate([live.request.prompt[live.cached_tokens:] for live in admitted])
        positions = np.concatenate([np.arange(live.cached_tokens, len(live.request.prompt)) for live in admitted])
        self._emit(admitted, self.runner.step(meta, tokens, positions, prefill=True))
        return int(sum(new))

    # -- decoding -----------------------------------------------------------------------------

    def _trim(self, live: Live) -> None:
        """StreamingLLM: keep the sink tokens and a recent window, so the sequence fits its context again."""
        removed = self.manager.trim_window(live.rid, self.trim_policy)
        if removed:
            live.offset = live.admitted.position_offset
            live.trims += 1
            self.trims += 1
            self.trimmed_tokens += removed

    def _decode(self, batch: list[Live]) -> None:
        for live in batch:
            if live.admitted.num_tokens >= self.config.context:
                self._trim(live)
        while batch:
            try:
                meta = self.manager.append_slots([live.rid for live in batch], [live.output[-1] for live in batch])
            except OutOfBlocks as exc:
                before = self.preemptions
                self._preempt(exc.needed - exc.available)
                self.decode_preemptions += self.preemptions - before
                batch = [live for live in batch if live.rid in self.running]
                continue
            offsets = np.fromiter((live.offset for live in batch), np.int64, len(batch))
            positions = meta.seq_lens.astype(np.int64) - 1 + offsets
            tokens = np.fromiter((live.output[-1] for live in batch), np.int64, len(batch))
            self._emit(batch, self.runner.step(meta, tokens, positions, prefill=False))
            return

    def _emit(self, batch: list[Live], tokens: np.ndarray) -> None:
        for live, token in zip(batch, tokens.tolist()):
            live.output.append(int(token))
            self.generated += 1
            if live.done:
                self.manager.deallocate(live.rid)
                live.finished_step = self.step_index
                del self.running[live.rid]
                self.finished.append(live)
