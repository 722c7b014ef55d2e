"""The decode step's bookkeeping against a bare free list, over batch and pool sizes, and when it fails.

The peer is the least a scheduler can do per decode token: a Python free
list of block ids, a length and a block list per sequence, one slot number
per token and one ``int32`` slot array per step. ``append_slots`` does that
and more: it validates the whole batch before changing anything, copies a
shared last block on write, records each token id and hashes every block
that fills (sha256 prefix caching), keeps LRU/LFU statistics, updates the
block-table arrays and returns the step's kernel metadata.

Each figure is a ratio within one round (the two sides alternate, the first
side rotating), median and range over the rounds: these machines are noisy.
Sequences start at 100-115 tokens and take 128 decode steps, so every one
crosses block boundaries.

* ``test_decode_step_vs_free_list``: 64, 256 and 1,024 running sequences in a
  65,536-block pool; µs per decode token of each side and their ratio. At 256
  also with the ``builtin`` hash and with prefix caching off, which show
  what recording token ids and hashing full blocks cost.
* ``test_decode_step_pool_size``: 64 running sequences in a pool of 4,096 and
  of 1,048,576 blocks; the cost must not grow with the pool.
* ``test_failed_append_cost``: 256 sequences at a block boundary and no free
  block, so ``append_slots`` raises ``OutOfBlocks``; its time against a
  successful step of the same batch in a pool with room.
* ``test_decode_step_breakdown``: at 256 running, each part of the step
  (record lookup, duplicate check, validation, commit) timed alone, and the
  whole step with prefix caching off and with sha256.

Run: ``python -m pytest benchmarks/test_bench_decode_step.py -m benchmark --benchmark-only -s -p no:cacheprovider``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest

from pagedkv_core import AllocationRequest, CacheConfig, OutOfBlocks, PagedKvCacheManager, PrefixCacheConfig
from pagedkv_numpy.storage import NumpyStorage

pytestmark = pytest.mark.benchmark

BLOCK, STEPS, ROUNDS = 16, 128, 7


def _manager(num_blocks: int, prefix: str = "sha256") -> PagedKvCacheManager:
    """``prefix``: the prefix cache's hash algorithm, or "off" (no token ids kept, nothing hashed)."""
    cache = None if prefix == "off" else PrefixCacheConfig(hash_algorithm=prefix)
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=num_blocks, block_size=BLOCK,
                         dtype="float32", prefix_cache=cache)
    return PagedKvCacheManager(NumpyStorage(config))


def _prompt_lengths(running: int) -> list[int]:
    return (100 + np.random.default_rng(running).integers(0, BLOCK, running)).tolist()


def pagedkv_us_per_token(running: int, num_blocks: int, prefix: str = "sha256") -> float:
    manager = _manager(num_blocks, prefix)
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(running)]
    for rid, length in zip(ids, _prompt_lengths(running)):
        manager.allocate(AllocationRequest(rid, token_ids=rng.integers(0, 32000, length).tolist()))
    token_steps = [list(range(s * running, (s + 1) * running)) for s in range(STEPS)]
    start = time.perf_counter()
    for tokens in token_steps:
        manager.append_slots(ids, tokens)
    return 1e6 * (time.perf_counter() - start) / (STEPS * running)


def free_list_us_per_token(running: int, num_blocks: int) -> float:
    free = list(range(num_blocks - 1, -1, -1))
    lengths = _prompt_lengths(running)
    blocks = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lengths]
    start = time.perf_counter()
    for _ in range(STEPS):
        slots = []
        for i in range(running):
            n = lengths[i]
            offset = n % BLOCK
            if not offset:
                blocks[i].append(free.pop())
            slots.append(blocks[i][-1] * BLOCK + offset)
            lengths[i] = n + 1
        np.array(slots, np.int32)
    return 1e6 * (time.perf_counter() - start) / (STEPS * running)


def interleaved(sides: dict[str, Callable[[], float]], rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Each side once per round, the first side rotating; returns every round's figure per side."""
    names = list(sides)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(sides[name]())
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


@pytest.mark.parametrize(("running", "prefix"), [(64, "sha256"), (256, "sha256"), (1024, "sha256"),
                                                 (256, "builtin"), (256, "off")])
def test_decode_step_vs_free_list(benchmark, running, prefix):
    sides = {"pagedkv": lambda: pagedkv_us_per_token(running, 65536, prefix),
             "free list": lambda: free_list_us_per_token(running, 65536)}
    timings = benchmark.pedantic(interleaved, args=(sides,), rounds=1, iterations=1)
    ratios = [p / f for p, f in zip(timings["pagedkv"], timings["free list"])]
    benchmark.extra_info.update(us_per_token=statistics.median(timings["pagedkv"]),
                                free_list_us_per_token=statistics.median(timings["free list"]),
                                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    print(f"\n{running} running, prefix cache {prefix}: pagedkv {spread(timings['pagedkv'])} us/token, free list "
          f"{spread(timings['free list'])} us/token, ratio {spread(ratios)} over {ROUNDS} rounds")
    assert all(r > 0 for r in ratios)


def test_decode_step_pool_size(benchmark):
    sides = {"4096": lambda: pagedkv_us_per_token(64, 4096),
             "1048576": lambda: pagedkv_us_per_token(64, 1 << 20)}
    timings = benchmark.pedantic(interleaved, args=(sides,), rounds=1, iterations=1)
    ratios = [big / small for small, big in zip(timings["4096"], timings["1048576"])]
    benchmark.extra_info.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    print(f"\n64 running: 4,096 blocks {spread(timings['4096'])} us/token, 1,048,576 blocks "
          f"{spread(timings['1048576'])} us/token, ratio {spread(ratios)} over {ROUNDS} rounds")
    assert all(r > 0 for r in ratios)


class FailedStep:
    """256 sequences at a block boundary; ``full`` has no free block left, ``roomy`` has room for the step."""

    RUNNING = 256

    def __init__(self) -> None:
        self.ids = [f"r{i}" for i in range(self.RUNNING)]
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 32000, 8 * BLOCK).tolist() for _ in self.ids]
        self.full = self._filled(self.RUNNING * 8, prompts)
        self.roomy = self._filled(self.RUNNING * 9, prompts)
        self.tokens = list(range(self.RUNNING))

    def _filled(self, num_blocks: int, prompts: list[list[int]]) -> PagedKvCacheManager:
        manager = _manager(num_blocks)
        for rid, prompt in zip(self.ids, prompts):
            manager.allocate(AllocationRequest(rid, token_ids=prompt))
        return manager

    def failed_us(self) -> float:
        start = time.perf_counter()
        try:
            self.full.append_slots(self.ids, self.tokens)
        except OutOfBlocks:
            return 1e6 * (time.perf_counter() - start)
        raise AssertionError("the step should not fit")

    def succeeded_us(self) -> float:
        start = time.perf_counter()
        self.roomy.append_slots(self.ids, self.tokens)
        elapsed = 1e6 * (time.perf_counter() - start)
        for rid in self.ids:  # back to the boundary for the next round
            self.roomy.trim(rid, 1)
        return elapsed


def test_failed_append_cost(benchmark):
    step = FailedStep()
    sides = {"failed": step.failed_us, "succeeded": step.succeeded_us}
    timings = benchmark.pedantic(interleaved, args=(sides, 21), rounds=1, iterations=1)
    ratios = [f / s for f, s in zip(timings["failed"], timings["succeeded"])]
    benchmark.extra_info.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    print(f"\n256 at a block boundary: failed {spread(timings['failed'])} us, succeeded "
          f"{spread(timings['succeeded'])} us, failed/succeeded {spread(ratios)} over 21 rounds")
    step.full.check_invariants()
    assert step.full.pool.num_free == 0


def _part_ns_per_token(part: str, running: int = 256) -> float:
    """ns per token of one part of the decode step, timed alone over STEPS steps of a fresh manager."""
    prefix = "sha256" if part == "whole step, sha256" else "off"
    manager = _manager(65536, prefix)
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(running)]
    for rid, length in zip(ids, _prompt_lengths(running)):
        manager.allocate(AllocationRequest(rid, token_ids=rng.integers(0, 32000, length).tolist()))
    seqs = manager.sequences.find_many(ids)
    token_steps = [list(range(s * running, (s + 1) * running)) for s in range(STEPS)]
    calls = {
        "record lookup": lambda tokens: manager.sequences.find_many(ids),
        "duplicate check": lambda tokens: len(set(ids)),
        "validation": lambda tokens: manager.growth.append_need(seqs),
        "commit": lambda tokens: manager.growth.append_checked(ids, seqs, tokens),
        "whole step, prefix off": lambda tokens: manager.append_slots(ids, tokens),
        "whole step, sha256": lambda tokens: manager.append_slots(ids, tokens),
    }
    call = calls[part]
    start = time.perf_counter()
    for tokens in token_steps:
        call(tokens)
    return 1e9 * (time.perf_counter() - start) / (STEPS * running)


PARTS = ("record lookup", "duplicate check", "validation", "commit", "whole step, prefix off", "whole step, sha256")


def test_decode_step_breakdown(benchmark):
    """Where a step's time goes at 256 running: each part alone (prefix caching off), and the whole step."""
    sides = {part: (lambda part=part: _part_ns_per_token(part)) for part in PARTS}
    timings = benchmark.pedantic(interleaved, args=(sides,), rounds=1, iterations=1)
    medians = {part: statistics.median(values) for part, values in timings.items()}
    benchmark.extra_info.update({f"{part} ns/token": round(value) for part, value in medians.items()})
    whole = medians["whole step, prefix off"]
    print("\n256 running, ns per token (median of 7 interleaved rounds; share of the step with prefix caching off):")
    for part in PARTS:
        print(f"  {part:24s} {spread(timings[part])}  {medians[part] / whole:.0%}")
    assert all(value > 0 for value in medians.values())
