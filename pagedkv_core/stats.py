"""Statistics records: small frozen dataclasses, safe to hand to any thread."""

from __future__ import annotations

from dataclasses import dataclass

from .policy.pressure import MemoryPressure

__all__ = [
    "CacheHandleStats",
    "CacheManagerStats",
    "CacheGcStats",
    "CompressionStats",
    "FragmentationStats",
    "DefragmentResult",
    "EvictionResult",
]


@dataclass(frozen=True, slots=True)
class CacheHandleStats:
    memory_bytes: int
    blocks_allocated: int
    tokens_stored: int
    utilization: float  # tokens / (blocks * block_size)
    last_access: float  # monotonic seconds
    shared_blocks: int  # blocks with ref count > 1


@dataclass(frozen=True, slots=True)
class CacheManagerStats:
    total_blocks: int
    free_blocks: int
    used_blocks: int
    cached_blocks: int  # blocks findable by prefix hash (in use or free)
    active_caches: int  # sequences on the device
    swapped_caches: int
    total_memory_bytes: int
    used_memory_bytes: int
    host_blocks_total: int
    host_blocks_used: int
    prefix_queries: int  # prompt tokens looked up
    prefix_hits: int  # of which served from the cache
    cache_hit_rate: float
    allocation_count: int
    allocation_failures: int
    eviction_count: int
    swap_out_count: int
    swap_in_count: int
    cow_copies: int
    pressure: MemoryPressure


@dataclass(frozen=True, slots=True)
class CacheGcStats:
    memory_freed: int  # bytes of device blocks that lost their cached contents
    caches_freed: int  # prefix-cache entries forgotten
    gc_time_ms: float


@dataclass(frozen=True, slots=True)
class CompressionStats:
    compressed_caches: int  # sequences currently held compressed on the host
    memory_saved_bytes: int  # device bytes minus host bytes, summed over compressions
    avg_compression_ratio: float  # host bytes / device bytes
    avg_compression_time_ms: float


@dataclass(frozen=True, slots=True)
class FragmentationStats:
    """How scattered the used blocks are.

    ``holes``: empty blocks (free and holding no cached prefix) below the
    highest occupied block id, i.e. what compaction would fill;
    ``largest_free_run`` counts empty blocks; ``fragmentation_ratio`` is
    ``1 - largest_free_run / empty_blocks`` (0 when all empty space is one run); ``wasted_token_slots``: unused slots in
    sequences' last, partly filled blocks.
    """

    used_blocks: int
    free_blocks: int
    holes: int
    largest_free_run: int
    fragmentation_ratio: float
    wasted_token_slots: int
    avg_tokens_per_block: float


@dataclass(frozen=True, slots=True)
class DefragmentResult:
    moved_blocks: int
    holes_before: int
    holes_after: int


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """What ``evict`` did: whole sequences swapped out or dropped, and blocks trimmed from others."""

    swapped: tuple[str, ...]
    dropped: tuple[str, ...]
    trimmed: tuple[tuple[str, int], ...]  # (request id, tokens removed)
    freed_blocks: int
