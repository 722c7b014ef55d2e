"""Several device pools behind one manager: placement by preference, moves and rebalancing.

Each device keeps its own :class:`PagedKvCacheManager` (its own pool, prefix
cache and host tier); this class only routes requests and moves sequences
between them through the host (``export_sequence`` / ``import_sequence``),
so a move between backends of different kinds works too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq
from dataclasses import fields

from ..config import AllocationRequest
from ..errors import InvalidArgument, OutOfBlocks, SequenceExists, UnknownSequence
from ..interfaces import MultiDeviceCacheManager
from ..policy.pressure import MemoryPressure, PressureCallback
from ..stats import CacheGcStats, CacheManagerStats
from .facade import PagedKvCacheManager
from .handle import PagedKvCacheHandle

__all__ = ["MultiDeviceManager"]


class MultiDeviceManager(MultiDeviceCacheManager):
    """Routes sequences to per-device managers; ``rebalance_tolerance`` is the utilization gap it tolerates."""

    def __init__(self, managers: dict[str, PagedKvCacheManager], *, rebalance_tolerance: float = 0.1) -> None:
        if not managers:
            raise InvalidArgument("MultiDeviceManager needs at least one device manager")
        self.managers = dict(managers)
        self.preference = list(managers)
        self.rebalance_tolerance = rebalance_tolerance
        self._where: dict[str, str] = {}
        self._lock = threading.RLock()

    def _manager_of(self, request_id: str) -> PagedKvCacheManager:
        device = self._where.get(request_id)
        if device is None:
            raise UnknownSequence(request_id)
        return self.managers[device]

    def supported_devices(self) -> list[str]:
        return list(self.managers)

    def set_device_preference(self, devices: Seq[str]) -> None:
        unknown = [d for d in devices if d not in self.managers]
        if unknown or not devices:
            raise InvalidArgument(f"unknown devices {unknown}; known: {list(self.managers)}")
        with self._lock:
            self.preference = list(devices) + [d for d in self.managers if d not in devices]

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle:
        """Place the request on the first preferred device that can take it."""
        with self._lock:
            if request.request_id in self._where:
                raise SequenceExists(request.request_id)
            for device in self.preference:
                manager = self.managers[device]
                if manager.can_allocate(request):
                    handle = manager.allocate(request)
                    self._where[request.request_id] = device
                    return handle
            best = max(m.pool.num_free for m in self.managers.values())
            raise OutOfBlocks(request.num_blocks(next(iter(self.managers.values())).config.block_size), best)

    def can_allocate(self, request: AllocationRequest) -> bool:
        with self._lock:
            return request.request_id not in self._where and any(
                m.can_allocate(request) for m in self.managers.values())

    def extend(self, request_id: str, additional_tokens: int, token_ids: Seq[int] | None = None) -> None:
        self._manager_of(request_id).extend(request_id, additional_tokens, token_ids)

    def deallocate(self, request_id: str) -> None:
        with self._lock:
            self._manager_of(request_id).deallocate(request_id)
            del self._where[request_id]

    def get_cache_device(self, request_id: str) -> str | None:
        return self._where.get(request_id)

    def get_handle(self, request_id: str) -> PagedKvCacheHandle | None:
        device = self._where.get(request_id)
        return None if device is None else self.managers[device].get_handle(request_id)

    def list_handles(self) -> list[tuple[str, PagedKvCacheHandle]]:
        return [pair for m in self.managers.values() for pair in m.list_handles()]

    def move_cache(self, request_id: str, target_device: str) -> None:
        """Move a running sequence's blocks (bit-exact) and bookkeeping to another device."""
        with self._lock:
            source = self._manager_of(request_id)
            if target_device not in self.managers:
                raise InvalidArgument(f"unknown device {target_device!r}; known: {list(self.managers)}")
            if self._where[request_id] == target_device:
                return
            target = self.managers[target_device]
            blocks = len(source.sequences.running(request_id).blocks)
            if not target.can_import(blocks):
                raise OutOfBlocks(blocks, target.pool.num_free)
            record, host = source.export_sequence(request_id)
            target.import_sequence(record, host)
            self._where[request_id] = target_device

    def rebalance_devices(self) -> int:
        """Move the smallest sequences from the fullest to the emptiest device until within tolerance."""
        moves = 0
        with self._lock:
            while True:
                ranked = sorted(self.managers, key=lambda d: self.managers[d].pool.utilization())
                low, high = ranked[0], ranked[-1]
                gap = self.managers[high].pool.utilization() - self.managers[low].pool.utilization()
                if gap <= self.rebalance_tolerance:
                    return moves
                infos = sorted(self.managers[high].sequence_infos(), key=lambda s: s.num_blocks)
                movable = [s for s in infos if s.num_blocks and self.managers[low].can_import(s.num_blocks)]
                if not movable:
                    return moves
                before = gap
                self.move_cache(movable[0].request_id, low)
                moves += 1
                after = self.managers[high].pool.utilization() - self.managers[low].pool.utilization()
                if abs(after) >= before:  # the move did not narrow the gap: stop rather than oscillate
                    return moves

    def device_stats(self) -> dict[str, CacheManagerStats]:
        return {d: m.stats() for d, m in self.managers.items()}

    def stats(self) -> CacheManagerStats:
        """Counts summed over devices; hit rate recomputed; pressure is the highest level."""
        per = list(self.device_stats().values())
        summed = {f.name: sum(getattr(s, f.name) for s in per) for f in fields(CacheManagerStats)
                  if f.name not in ("cache_hit_rate", "pressure")}
        queries = summed["prefix_queries"]
        return CacheManagerStats(**summed, cache_hit_rate=summed["prefix_hits"] / queries if queries else 0.0,
                                 pressure=MemoryPressure(max(s.pressure for s in per)))

    def gc(self) -> CacheGcStats:
        results = [m.gc() for m in self.managers.values()]
        return CacheGcStats(sum(r.memory_freed for r in results), sum(r.caches_freed for r in results),
                            sum(r.gc_time_ms for r in results))

    def set_pressure_callback(self, callback: PressureCallback) -> None:
        for manager in self.managers.values():
            manager.set_pressure_callback(callback)
