"""The contracts every part of pagedkv promises, mirroring ferrum-interfaces in Python style.

Synchronous and thread-safe: a scheduler calls these from its loop. Errors
are the typed ones of :mod:`pagedkv_core.errors`, raised before any state
changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from .blocks.tables import BlockTable
from .config import AllocationRequest, PrefixCacheConfig
from .policy.eviction import EvictionPolicy
from .policy.pressure import MemoryPressure, PressureCallback
from .stats import CacheGcStats, CacheHandleStats, CacheManagerStats, CompressionStats

__all__ = [
    "BlockAllocator",
    "KvCacheHandle",
    "KvCacheManager",
    "AdvancedKvCacheManager",
    "MultiDeviceCacheManager",
    "EvictionPolicy",
    "MemoryPressure",
]


class BlockAllocator(ABC):
    """Hands out physical block ids of one pool."""

    @abstractmethod
    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks (ref count 1 each) or raise ``OutOfBlocks``."""

    @abstractmethod
    def free_blocks(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; ``InvalidBlock`` if one is not allocated."""

    @abstractmethod
    def free_block_count(self) -> int: ...

    @abstractmethod
    def total_block_count(self) -> int: ...

    @property
    @abstractmethod
    def block_size(self) -> int: ...

    @abstractmethod
    def defragment(self) -> object:
        """Compact used blocks to the lowest ids, moving their data."""


class KvCacheHandle(ABC):
    """One sequence's view of the cache; stays cheap to hold and reads live state."""

    @property
    @abstractmethod
    def block_table(self) -> BlockTable: ...

    @property
    @abstractmethod
    def device(self) -> str: ...

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """KV heads."""

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @property
    @abstractmethod
    def cache_id(self) -> str: ...

    @abstractmethod
    def stats(self) -> CacheHandleStats: ...

    @abstractmethod
    def is_valid(self) -> bool:
        """False once the sequence has been deallocated or dropped by eviction."""

    @abstractmethod
    def clone_handle(self, new_request_id: str | None = None) -> KvCacheHandle:
        """Fork the sequence: blocks are shared and copied on the first write (copy-on-write)."""


class KvCacheManager(ABC):
    """Allocation and lifecycle of sequences' caches."""

    @abstractmethod
    def allocate(self, request: AllocationRequest) -> KvCacheHandle: ...

    @abstractmethod
    def extend(self, request_id: str, additional_tokens: int, token_ids: Sequence[int] | None = None) -> None: ...

    @abstractmethod
    def deallocate(self, request_id: str) -> None: ...

    @abstractmethod
    def can_allocate(self, request: AllocationRequest) -> bool: ...

    @abstractmethod
    def stats(self) -> CacheManagerStats: ...

    @abstractmethod
    def gc(self) -> CacheGcStats: ...

    @abstractmethod
    def set_pressure_callback(self, callback: PressureCallback) -> None: ...

    @abstractmethod
    def get_handle(self, request_id: str) -> KvCacheHandle | None: ...

    @abstractmethod
    def list_handles(self) -> Sequence[tuple[str, KvCacheHandle]]: ...


class AdvancedKvCacheManager(KvCacheManager):
    """Prefix sharing, swapping and compression."""

    @abstractmethod
    def enable_prefix_caching(self, config: PrefixCacheConfig) -> None: ...

    @abstractmethod
    def share_prefix(self, source: str, target: str, shared_tokens: int) -> None: ...

    @abstractmethod
    def swap_out(self, request_id: str) -> None: ...

    @abstractmethod
    def swap_in(self, request_id: str) -> None: ...

    @abstractmethod
    def compress_cache(self, request_id: str, compression_ratio: float | None = None) -> None: ...

    @abstractmethod
    def compression_stats(self) -> CompressionStats: ...


class MultiDeviceCacheManager(KvCacheManager):
    """Several device pools behind one manager."""

    @abstractmethod
    def supported_devices(self) -> list[str]: ...

    @abstractmethod
    def set_device_preference(self, devices: Sequence[str]) -> None: ...

    @abstractmethod
    def move_cache(self, request_id: str, target_device: str) -> None: ...

    @abstractmethod
    def get_cache_device(self, request_id: str) -> str | None: ...

    @abstractmethod
    def rebalance_devices(self) -> int:
        """Move sequences from fuller to emptier devices; return how many moved."""

    @abstractmethod
    def device_stats(self) -> dict[str, CacheManagerStats]: ...
