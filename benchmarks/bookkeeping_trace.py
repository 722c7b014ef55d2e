"""A seeded continuous-batching trace that drives the manager's bookkeeping as a scheduler would.

2,000 requests; prompt lengths lognormal (median 600, sigma 0.8, cap 4,096);
output lengths lognormal (median 200, sigma 0.8, cap 2,048); half start with
one of 8 system prompts of 512 tokens; block size 16; 4,096 blocks; at most
256 running. Each step admits waiting requests while ``can_allocate`` says
there is room, appends one token to every running sequence, and on
``OutOfBlocks`` preempts the newest sequence (freed and re-queued; its
blocks stay in the prefix cache, so re-admission is mostly hits) and admits
nothing more until a step succeeds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from pagedkv_core import AllocationRequest, CacheConfig, OutOfBlocks, PagedKvCacheManager, PrefixCacheConfig
from pagedkv_numpy.storage import NumpyStorage


@dataclass
class TraceResult:
    wall_seconds: float
    decode_seconds: float
    decode_tokens: int
    block_ops: int  # blocks allocated, referenced by a hit, or released
    hit_rate: float
    preemptions: int
    mean_waste: float  # unused slots / allocated slots, averaged over steps
    max_partial_blocks_per_seq: float  # wasted slots / block_size / running, worst step
    steps: int

    @property
    def us_per_decode_token(self) -> float:
        return 1e6 * self.decode_seconds / self.decode_tokens

    @property
    def block_ops_per_second(self) -> float:
        return self.block_ops / self.wall_seconds


def make_requests(num_requests: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompt_lens = np.minimum(rng.lognormal(np.log(600), 0.8, num_requests), 4096).astype(int).clip(1)
    output_lens = np.minimum(rng.lognormal(np.log(200), 0.8, num_requests), 2048).astype(int).clip(1)
    systems = [tuple(rng.integers(0, 32000, 512).tolist()) for _ in range(8)]
    requests = []
    for i in range(num_requests):
        body = rng.integers(0, 32000, prompt_lens[i]).tolist()
        prompt = (systems[i % 8] + tuple(body))[:max(prompt_lens[i], 513)] if i % 2 else tuple(body)
        requests.append((f"r{i}", prompt, int(output_lens[i])))
    return requests


def run_trace(requests, *, prefix_caching: bool = True, num_blocks: int = 4096, max_running: int = 256,
              hash_algorithm: str = "sha256") -> TraceResult:
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=num_blocks, block_size=16,
                         dtype="float32",
                         prefix_cache=PrefixCacheConfig(hash_algorithm=hash_algorithm) if prefix_caching else None)
    manager = PagedKvCacheManager(NumpyStorage(config))
    bs = config.block_size
    pending = deque((rid, AllocationRequest(rid, token_ids=prompt)) for rid, prompt, _ in requests)
    generated: dict[str, list[int]] = {}
    info = {rid: (prompt, out) for rid, prompt, out in requests}
    running: list[str] = []
    decode_seconds, decode_tokens, preemptions, steps = 0.0, 0, 0, 0
    waste_sum, worst_partial = 0.0, 0.0
    next_token = 1
    admit = True  # no admissions between a preemption and the next successful step (no livelock)
    start = time.perf_counter()
    while pending or running:
        while admit and pending and len(running) < max_running:
            rid, req = pending[0]
            if not manager.can_allocate(req):
                break
            manager.allocate(req)
            pending.popleft()
            running.append(rid)
            generated.setdefault(rid, [])
        if not running:
            raise RuntimeError("a single request does not fit the pool")
        tokens = list(range(next_token, next_token + len(running)))
        next_token += len(running)
        t0 = time.perf_counter()
        try:
            manager.append_slots(running, tokens)
        except OutOfBlocks:
            decode_seconds += time.perf_counter() - t0
            victim = running.pop()
            manager.deallocate(victim)
            prompt = info[victim][0] + tuple(generated[victim])
            pending.appendleft((victim, AllocationRequest(victim, token_ids=prompt)))
            preemptions += 1
            admit = False
            continue
        admit = True
        decode_seconds += time.perf_counter() - t0
        decode_tokens += len(running)
        steps += 1
        still = []
        for rid, token in zip(running, tokens):
            out = generated[rid]
            out.append(token)
            if len(out) >= info[rid][1]:
                manager.deallocate(rid)
            else:
                still.append(rid)
        if steps % 64 == 0:  # sample memory waste
            used_slots = manager.pool.num_used * bs
            tokens_held = sum(manager.sequences.tables.lens[manager.sequences.find(r).row] for r in still)
            if used_slots:
                waste_sum += 1 - min(1.0, tokens_held / used_slots)
            frag = manager.fragmentation_stats()
            if still:
                worst_partial = max(worst_partial, frag.wasted_token_slots / bs / len(still))
        running = still
    wall = time.perf_counter() - start
    manager.check_invariants()
    stats = manager.stats()
    return TraceResult(wall, decode_seconds, decode_tokens, manager.pool.block_ops, stats.cache_hit_rate, preemptions,
                       waste_sum / max(1, steps // 64), worst_partial, steps)


if __name__ == "__main__":
    result = run_trace(make_requests())
    print(result, f"{result.us_per_decode_token:.2f} us/token")
