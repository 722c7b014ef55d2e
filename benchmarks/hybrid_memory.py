"""Device memory a Gemma-3-like model's cache holds: layer groups against today's uniform cache.

The model: 6 layers per pattern, 5 sliding-window (window 1,024) and 1 full
attention; block size 16. Each of ``num_seqs`` sequences brings a prompt of
``context - decode_steps`` tokens, prefilled in chunks of ``prefill_chunk``
tokens (the first chunk admitted, the rest reserved with ``extend_batch``,
as a chunked-prefill scheduler does), then decodes ``decode_steps`` tokens in
one batch. Bytes held are compared at the end and at the peak; a uniform
cache keeps every token of every layer, so its blocks hold all 6 layers
while a hybrid block holds one cache group's (here: one layer).

The floor is set by the model, not the cache: the full layer keeps all
``context`` tokens and each sliding layer about ``window`` of them, so the
ratio cannot go below ``(1 + 5 * window / context) / 6`` (0.271 at 8k
context, window 1,024); blocks are whole, so the sliding layers hold up to
one partly read block more than the window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pagedkv_core import (
    AllocationRequest,
    CacheConfig,
    HybridCacheManager,
    LayerGroup,
    PagedKvCacheManager,
    PrefixCacheConfig,
)
from pagedkv_numpy.storage import NumpyStorage

BLOCK = 16


@dataclass(frozen=True)
class MemoryFigures:
    uniform_bytes_end: int
    hybrid_bytes_end: int
    uniform_bytes_peak: int
    hybrid_bytes_peak: int
    floor: float
    uniform_us_per_token: float  # decode bookkeeping, the same run
    hybrid_us_per_token: float

    @property
    def ratio_end(self) -> float:
        return self.hybrid_bytes_end / self.uniform_bytes_end

    @property
    def ratio_peak(self) -> float:
        return self.hybrid_bytes_peak / self.uniform_bytes_peak


def gemma_like_groups(window: int) -> tuple[LayerGroup, ...]:
    return (LayerGroup.full([5]), LayerGroup.sliding(window, [0, 1, 2, 3, 4]))


def _drive(manager, num_seqs: int, prompt: int, chunk: int, steps: int, used) -> tuple[int, int, float]:
    """Chunked prefill then batched decode; returns (blocks at the end, peak blocks, decode seconds)."""
    ids = [f"s{i}" for i in range(num_seqs)]
    peak = 0
    for rid in ids:
        manager.allocate(AllocationRequest(rid, initial_tokens=min(chunk, prompt)))
    done = min(chunk, prompt)
    while done < prompt:
        step = min(chunk, prompt - done)
        manager.extend_batch(ids, [step] * num_seqs)
        done += step
        peak = max(peak, used())
    start = time.perf_counter()
    for _ in range(steps):
        manager.append_slots(ids)
    seconds = time.perf_counter() - start
    peak = max(peak, used())
    return used(), peak, seconds


def measure(num_seqs: int = 32, context: int = 8192, window: int = 1024, decode_steps: int = 128,
            prefill_chunk: int = 1024) -> MemoryFigures:
    layers, prompt = 6, context - decode_steps
    blocks_per_seq = -(-context // BLOCK)
    common = dict(num_kv_heads=1, head_dim=1, block_size=BLOCK, prefix_cache=PrefixCacheConfig(enabled=False))
    uniform_config = CacheConfig(num_layers=layers, num_blocks=num_seqs * blocks_per_seq, **common)
    uniform = PagedKvCacheManager(NumpyStorage(uniform_config))
    u_end, u_peak, u_seconds = _drive(uniform, num_seqs, prompt, prefill_chunk, decode_steps,
                                      lambda: uniform.pool.num_used)
    hybrid_config = CacheConfig(num_layers=layers, num_blocks=num_seqs * blocks_per_seq * layers + 1,
                                layer_groups=gemma_like_groups(window), **common)
    hybrid = HybridCacheManager(NumpyStorage(hybrid_config.storage_config()), hybrid_config)
    h_end, h_peak, h_seconds = _drive(hybrid, num_seqs, prompt, prefill_chunk, decode_steps,
                                      lambda: hybrid.num_used_blocks)
    tokens = num_seqs * decode_steps
    return MemoryFigures(
        uniform_bytes_end=u_end * uniform_config.bytes_per_block,
        hybrid_bytes_end=h_end * hybrid_config.bytes_per_block,
        uniform_bytes_peak=u_peak * uniform_config.bytes_per_block,
        hybrid_bytes_peak=h_peak * hybrid_config.bytes_per_block,
        floor=(1 + 5 * window / context) / layers,
        uniform_us_per_token=1e6 * u_seconds / tokens,
        hybrid_us_per_token=1e6 * h_seconds / tokens,
    )
