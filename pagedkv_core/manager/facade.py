"""The reference cache manager: one lock in front of components that each own their state.

It decides *which* blocks; the backend's storage moves bytes. Every public
method takes one re-entrant lock, the components validate everything first
and only then mutate, so a failed call changes nothing. Pressure callbacks
fire after the call that changed the level, outside the lock.

The parts (vLLM v1's ``KVCacheManager`` -> coordinator -> ``BlockPool``
shape, made explicit): :class:`~.sequences.SequenceTable` (records and
table rows), :class:`~.prefix.PrefixIndex` (hash scheme, admission plans),
:class:`~.admission.Admission`, :class:`~.growth.Growth`,
:class:`~.host_tier.HostTier`, :class:`~.eviction.Evictor` and
:class:`~.maintenance.ExternalBlocks`, all over one
:class:`~pagedkv_core.blocks.pool.BlockPool`, which alone changes ref counts
and hashes. This class only locks, delegates and reports.

Prefix caching follows vLLM's semantics: the K/V of slots handed out by a
call (``allocate``, ``extend``, ``append_slots``) must be written before the
next step's attention runs, because full blocks are registered in the prefix
cache as soon as their token ids are known.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

from ..blocks.hashing import BlockHasher
from ..blocks.metadata import BatchMetadata
from ..blocks.pool import BlockPool
from ..blocks.tables import TableArrays
from ..config import AllocationRequest, CacheConfig, PrefixCacheConfig
from ..contract.storage import BlockStorage, HostBlocks
from ..errors import InvalidArgument, OutOfBlocks, SequenceExists
from ..events import CacheEvent, CacheEventCallback
from ..interfaces import AdvancedKvCacheManager
from ..memory import BOOKKEEPING_BYTES_PER_BLOCK, check_memory, host_memory_available
from ..policy.eviction import EvictionCandidate, EvictionPolicy, LruPolicy, SequenceInfo, WindowPolicy
from ..policy.pressure import MemoryPressure, PressureCallback, PressureMonitor
from ..stats import (
    CacheGcStats,
    CacheHandleStats,
    CacheManagerStats,
    CompressionStats,
    DefragmentResult,
    EvictionResult,
    FragmentationStats,
)
from . import maintenance, persistence
from .admission import Admission
from .eviction import Evictor
from .growth import Growth
from .handle import PagedKvCacheHandle
from .host_tier import HostTier
from .prefix import PrefixIndex
from .records import SeqState, Sequence
from .sequences import SequenceTable

if TYPE_CHECKING:
    from ..remote import RemoteConnector, RemoteTier

__all__ = ["PagedKvCacheManager"]


class _Mutating:
    """``with manager.mutating():`` the lock, then a pressure update whose callbacks run after it is released.

    A class, not a generator context manager: every decode step enters it,
    and this costs a third of ``contextlib.contextmanager``'s overhead.
    """

    __slots__ = ("manager",)

    def __init__(self, manager: PagedKvCacheManager) -> None:
        self.manager = manager

    def __enter__(self) -> None:
        self.manager.lock.acquire()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        manager, change = self.manager, None
        try:
            if exc_type is None:
                change = manager.pressure.update(manager.pool.utilization())
        finally:
            manager.lock.release()
        if change is not None:
            manager.pressure.notify(change)


class PagedKvCacheManager(AdvancedKvCacheManager):
    """Paged KV-cache bookkeeping over one backend storage (one device).

    ``eviction_policy`` chooses victims for :meth:`evict`; ``clock`` is
    injectable so TTL and LRU behaviour can be tested exactly; ``event_hook``
    (a pluggy hook relay such as ``default_registry().plugin_manager.hook``)
    receives every prefix-cache event through ``pagedkv_cache_event``, as
    :meth:`subscribe` callbacks do. ``lock`` is the manager's re-entrant lock:
    hold it to make several calls one atomic step.
    """

    def __init__(self, storage: BlockStorage, *, eviction_policy: EvictionPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, event_hook: Any = None) -> None:
        config: CacheConfig = storage.config
        check_memory(f"the manager's bookkeeping of {config.num_blocks:,} blocks",
                     config.num_blocks * BOOKKEEPING_BYTES_PER_BLOCK, host_memory_available(), "host")
        self.storage = storage
        self.config = config
        self.device: str = storage.device
        self.clock = clock
        self.lock = threading.RLock()
        self.counters: Counter[str] = Counter()
        self.pressure = PressureMonitor(config.pressure, clock)
        self.pool = BlockPool(config.num_blocks, config.block_size, clock=clock)
        self.sequences = SequenceTable(config.max_blocks_per_seq)
        self.prefix = PrefixIndex(self.pool, config.block_size, config.prefix_cache if config.prefix_caching else None)
        self.host_tier = HostTier(config, storage, self.pool, self.sequences, self.counters, clock)
        self.admission = Admission(self.pool, self.sequences, self.prefix, self.host_tier, self.counters, clock)
        self.growth = Growth(self.pool, self.sequences, self.prefix, storage, self.counters, clock)
        self.evictor = Evictor(eviction_policy or LruPolicy(), self.pool, self.sequences, self.admission,
                               self.host_tier, self.counters, clock)
        self.external = maintenance.ExternalBlocks(self.pool)
        self._subscribers: list[CacheEventCallback] = []
        # the ``pagedkv_cache_event`` hook of a plugin manager (e.g. default_registry().plugin_manager.hook)
        self._plugin_hook = None if event_hook is None else event_hook.pagedkv_cache_event
        if self._plugin_hook is not None:
            self.pool.on_event = self._emit

    # -- plumbing -------------------------------------------------------------------

    def mutating(self) -> _Mutating:
        """The lock, then a pressure update whose callbacks run after it is released."""
        return _Mutating(self)

    def _handle(self, seq: Sequence) -> PagedKvCacheHandle:
        return PagedKvCacheHandle(self, seq)

    @property
    def tables(self) -> TableArrays:
        return self.sequences.tables

    @property
    def policy(self) -> EvictionPolicy:
        return self.evictor.policy

    @property
    def prefix_config(self) -> PrefixCacheConfig | None:
        return self.prefix.config

    @property
    def hasher(self) -> BlockHasher | None:
        return self.prefix.hasher

    @property
    def remote(self) -> RemoteConnector | None:
        return self.prefix.remote

    @property
    def host_used(self) -> int:
        return self.host_tier.used

    @property
    def host_capacity(self) -> int:
        return self.host_tier.capacity

    def has_sequence(self, request_id: str) -> bool:
        return request_id in self.sequences

    def get_record(self, request_id: str) -> Sequence | None:
        """The live record of ``request_id`` (None if absent): handles compare it to tell a new admission."""
        return self.sequences.get(request_id)

    # -- admission ------------------------------------------------------------------

    def can_allocate(self, request: AllocationRequest) -> bool:
        with self.lock:
            return self.admission.can_allocate(request)

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle:
        """Admit a sequence: reuse its longest cached prefix and reserve slots for the rest of its prompt."""
        prefetched = None if request.request_id in self.sequences else self.prefix.prefetch(request)
        with self.mutating():
            return self._handle(self.admission.allocate(request, prefetched))

    def allocate_batch(self, requests: Seq[AllocationRequest]) -> list[PagedKvCacheHandle]:
        """Admit several requests at once, all or nothing (see :meth:`Admission.allocate_batch`)."""
        prefetched = [None if r.request_id in self.sequences else self.prefix.prefetch(r) for r in requests]
        with self.mutating():
            return [self._handle(s) for s in self.admission.allocate_batch(requests, prefetched)]

    def deallocate(self, request_id: str) -> None:
        """Free a sequence; its full blocks stay in the prefix cache until their space is needed."""
        with self.mutating():
            self.admission.release(self.sequences.find(request_id))

    def fork(self, request_id: str, new_request_id: str | None = None) -> PagedKvCacheHandle:
        """Clone a sequence; blocks are shared and a partly filled one is copied on the first write."""
        with self.mutating():
            return self._handle(self.admission.fork(self.sequences.running(request_id), new_request_id))

    def clone_handle(self, request_id: str, new_request_id: str | None = None) -> PagedKvCacheHandle:
        return self.fork(request_id, new_request_id)

    def share_prefix(self, source: str, target: str, shared_tokens: int) -> None:
        """Give ``target`` (new, or empty) the first ``shared_tokens`` tokens of ``source`` without copying."""
        with self.mutating():
            self.admission.share_prefix(self.sequences.running(source), target, shared_tokens)

    def enable_prefix_caching(self, config: PrefixCacheConfig) -> None:
        """Switch prefix caching on (or off with ``enabled=False``, which forgets every cached free block)."""
        with self.mutating():
            self.prefix.configure(config)
            if self.prefix.config is None:
                self.pool.clear_cache()
            elif config.max_prefixes is not None:
                self.pool.trim_cached(config.max_prefixes)

    # -- growth ----------------------------------------------------------------------

    def extend(self, request_id: str, additional_tokens: int, token_ids: Seq[int] | None = None) -> None:
        """Reserve slots for ``additional_tokens`` more tokens (their ids enable prefix caching)."""
        self.extend_batch([request_id], [additional_tokens], None if token_ids is None else [token_ids])

    def extend_batch(self, request_ids: Seq[str], counts: Seq[int] | None = None,
                     token_ids: Seq[Seq[int] | None] | None = None) -> None:
        """Reserve slots for a whole scheduler step at once; all or nothing."""
        with self.mutating():
            self.growth.extend_batch(request_ids, counts, token_ids)

    def append_slots(self, request_ids: Seq[str], token_ids: Seq[int] | None = None) -> BatchMetadata:
        """The decode step: one new token for each sequence; returns the step's kernel metadata."""
        with self.mutating():
            return self.growth.append_slots(request_ids, token_ids)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Roll back the last ``num_tokens`` tokens (rejected speculative tokens)."""
        with self.mutating():
            self.growth.trim(self.sequences.running(request_id), num_tokens)

    # -- the host tier -----------------------------------------------------------------

    def swap_out(self, request_id: str, *, quantize: str | None = None) -> None:
        """Copy a sequence's blocks to the host tier and free them on the device (preemption)."""
        with self.mutating():
            self.host_tier.swap_out(self.sequences.running(request_id), quantize=quantize)

    def swap_in(self, request_id: str) -> None:
        """Bring a swapped sequence back into fresh device blocks."""
        with self.mutating():
            self.host_tier.swap_in(self.sequences.find(request_id))

    def compress_cache(self, request_id: str, compression_ratio: float | None = None) -> None:
        """Move a sequence to the host tier as int8; ``swap_in`` restores it (see :meth:`HostTier.compress`)."""
        with self.mutating():
            self.host_tier.compress(self.sequences.running(request_id), compression_ratio)

    def compression_stats(self) -> CompressionStats:
        with self.lock:
            return self.host_tier.compression_stats()

    def export_sequence(self, request_id: str) -> tuple[Sequence, HostBlocks]:
        """Copy a running sequence's blocks to host memory and remove it from this manager.

        Returns its record and host blocks for :meth:`import_sequence` of
        another manager (``MultiDeviceManager.move_cache``).
        """
        with self.mutating():
            seq = self.sequences.running(request_id)
            host = self.host_tier.export(seq)
            self.admission.release(seq)
            return seq, host

    def can_import(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def import_sequence(self, record: Sequence, host: HostBlocks) -> PagedKvCacheHandle:
        """Admit a sequence exported by another manager, with its data and prefix hashes."""
        with self.mutating():
            if record.request_id in self.sequences:
                raise SequenceExists(record.request_id)
            if host.num_blocks > self.pool.num_free:
                raise OutOfBlocks(host.num_blocks, self.pool.num_free)
            return self._handle(self.admission.admit_record(record, self.host_tier.blocks_from_host(host)))

    # -- eviction ---------------------------------------------------------------------

    def sequence_infos(self) -> list[SequenceInfo]:
        """Snapshots of the running sequences, as eviction policies see them."""
        with self.lock:
            return self.evictor.sequence_infos()

    def select_eviction_candidates(self, required_bytes: int) -> list[EvictionCandidate]:
        with self.lock:
            return self.evictor.candidates(-(-int(required_bytes) // self.config.bytes_per_block))

    def record_access(self, request_id: str) -> None:
        """Mark a sequence as used now (LRU/LFU read this)."""
        with self.lock:
            self.evictor.record_access(self.sequences.find(request_id))

    def evict(self, required_blocks: int | None = 1, *, swap: bool = True) -> EvictionResult:
        """Free at least ``required_blocks`` blocks as the policy chooses (see :meth:`Evictor.evict`)."""
        with self.mutating():
            return self.evictor.evict(required_blocks, swap=swap)

    def evict_to_threshold(self, utilization: float, *, swap: bool = True) -> EvictionResult:
        """Evict until at most ``utilization`` of the pool is in use."""
        with self.mutating():
            return self.evictor.evict_to_threshold(utilization, swap=swap)

    def trim_window(self, request_id: str, policy: WindowPolicy) -> int:
        """Apply a window policy (StreamingLLM, sliding window) to one sequence; return tokens removed."""
        with self.mutating():
            return self.evictor.trim_window(self.sequences.running(request_id), policy)

    # -- reclaiming and compaction ----------------------------------------------------

    def gc(self, *, all_prefixes: bool = False) -> CacheGcStats:
        """Forget expired (TTL) or excess cached free blocks; ``all_prefixes`` empties the prefix cache.

        Emptying forgets the hashes of blocks in use too (their owners keep
        the blocks; they are just no longer findable).
        """
        start = time.perf_counter()
        with self.mutating():
            forgotten = 0
            prefix = self.prefix.config
            if all_prefixes or prefix is None:
                forgotten += self.pool.clear_cache()
            else:
                if prefix.ttl_seconds is not None:
                    forgotten += self.pool.expire_cached(prefix.ttl_seconds)
                if prefix.max_prefixes is not None:
                    forgotten += self.pool.trim_cached(prefix.max_prefixes)
        return CacheGcStats(forgotten * self.config.bytes_per_block, forgotten, 1000 * (time.perf_counter() - start))

    def defragment(self) -> DefragmentResult:
        """Move occupied blocks to the lowest ids (data included) and rewrite every table."""
        with self.mutating():
            result = maintenance.defragment(self.pool, self.sequences, self.storage, self.external)
            self.counters["defragmentations"] += 1
            return result

    def fragmentation_stats(self) -> FragmentationStats:
        with self.lock:
            return maintenance.fragmentation_stats(self.pool, self.sequences)

    def check_invariants(self, *, raise_on_error: bool = True) -> list[str]:
        """Every leaked, double-owned or miscounted block (empty when all is well)."""
        with self.lock:
            return maintenance.check_invariants(self.pool, self.sequences, self.host_tier, self.external,
                                                raise_on_error=raise_on_error)

    @property
    def allocator(self) -> maintenance.ManagerBlockAllocator:
        """The pool as a plain :class:`BlockAllocator` (blocks outside any sequence, e.g. scratch)."""
        return maintenance.ManagerBlockAllocator(self)

    def allocate_external(self, num_blocks: int) -> list[int]:
        """Blocks owned by no sequence (what :attr:`allocator` hands out)."""
        with self.mutating():
            return self.external.allocate(num_blocks)

    def free_external(self, blocks: Seq[int]) -> None:
        with self.mutating():
            self.external.free(blocks)

    # -- export ---------------------------------------------------------------------------

    def batch_metadata(self, request_ids: Seq[str], query_lens: Seq[int] | None = None) -> BatchMetadata:
        """Kernel metadata for a batch whose last ``query_lens[i]`` tokens are new (default: 1 each)."""
        with self.lock:
            return self.sequences.metadata(request_ids, query_lens, self.config.block_size)

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: Any, sequences: Seq[str] | None = None, *, hmac_key: bytes | None = None) -> int:
        """Write sequences (all if None) to a portable safetensors file; return blocks saved.

        Swapped-out sequences are saved from the host tier, bit-exact, and load
        back swapped out. Saving a subset makes a prompt cache that
        :meth:`load_prompt_cache` adds to another manager's prefix cache.
        ``hmac_key`` signs the file (HMAC-SHA256) so that loading with the same
        key can refuse files this deployment did not write.
        """
        return persistence.save_cache(self, path, sequences, hmac_key=hmac_key)

    @classmethod
    def load(cls, path: Any, backend: Any = "numpy", device: str = "cpu", *, hmac_key: bytes | None = None,
             max_bytes: int | None = None, **kwargs: Any) -> PagedKvCacheManager:
        """A new manager on ``backend`` (a name or a backend object) holding the saved sequences.

        The file is validated completely before anything is allocated
        (``CorruptCacheFile``); ``hmac_key`` refuses files not signed with it
        (``UntrustedCacheFile``); ``max_bytes`` caps the memory the file's
        config may ask for (default: physical memory; ``IncompatibleCache``).
        K/V come back bit-exact wherever the backend keeps the saved dtype.
        """
        from ..plugins import get_backend

        saved = persistence.read_cache(path, hmac_key=hmac_key, max_bytes=max_bytes)
        scheme = saved.hash_scheme
        config = dataclasses.replace(saved.config, prefix_cache=None if scheme is None else PrefixCacheConfig(
            hash_algorithm=scheme["algorithm"], hash_seed=int(scheme["seed"])))
        impl = get_backend(backend) if isinstance(backend, str) else backend
        manager = cls(impl.create_storage(config, device), **kwargs)
        persistence.restore(manager, saved)
        return manager

    def load_prompt_cache(self, path: Any, *, hmac_key: bytes | None = None) -> int:
        """Add a saved cache's full blocks to this manager's prefix cache; return how many joined.

        Validates the file and its fit (shapes, dtype, block size, hash scheme,
        no more blocks than this pool and host tier) before reading its tensors
        or changing anything; ``hmac_key`` as in :meth:`load`. The blocks sit
        in the free queue, findable, until their space is needed.
        """
        return persistence.load_prompt_cache(self, path, hmac_key=hmac_key)

    # -- remote tier ---------------------------------------------------------------------------

    def attach_remote(self, tier: RemoteTier, **options: Any) -> RemoteConnector:
        """Put a shared remote tier (e.g. Redis) behind the local prefix cache; see :mod:`pagedkv_core.remote`.

        Admissions then load the blocks the local cache lacks from the tier,
        and full blocks are written to it in the background after each
        :meth:`RemoteConnector.commit`. ``options`` go to :class:`RemoteConnector`.
        """
        from ..remote import RemoteConnector

        with self.lock:
            if self.prefix.remote is not None:
                raise InvalidArgument("a remote tier is already attached; close its connector first")
            self.prefix.remote = RemoteConnector(self, tier, **options)
            return self.prefix.remote

    def detach_remote(self, connector: RemoteConnector) -> None:
        """Forget ``connector`` if it is the attached one (its ``close`` calls this)."""
        with self.lock:
            if self.prefix.remote is connector:
                self.prefix.remote = None

    # -- views and events ------------------------------------------------------------------------

    def get_handle(self, request_id: str) -> PagedKvCacheHandle | None:
        with self.lock:
            seq = self.sequences.get(request_id)
            return None if seq is None else self._handle(seq)

    def list_handles(self) -> list[tuple[str, PagedKvCacheHandle]]:
        with self.lock:
            return [(s.request_id, self._handle(s)) for s in self.sequences]

    def request_ids(self) -> list[str]:
        with self.lock:
            return self.sequences.ids()

    def __len__(self) -> int:
        return len(self.sequences)

    def set_pressure_callback(self, callback: PressureCallback) -> None:
        """Call ``callback(new_level, old_level)`` on every pressure change (adds to earlier callbacks)."""
        self.pressure.callbacks.append(callback)

    @property
    def pressure_level(self) -> MemoryPressure:
        return self.pressure.level

    def subscribe(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for every prefix-cache change, in order; returns an unsubscribe function.

        Events (:mod:`pagedkv_core.events`) are delivered synchronously under
        the manager's lock, so a subscriber must be quick and must not call
        back into the manager; hand them to a queue if there is real work.
        """
        with self.lock:
            self._subscribers.append(callback)
            self.pool.on_event = self._emit

        def unsubscribe() -> None:
            with self.lock:
                self._subscribers.remove(callback)
                if not self._subscribers and self._plugin_hook is None:
                    self.pool.on_event = None

        return unsubscribe

    def _emit(self, event: CacheEvent) -> None:
        for callback in self._subscribers:
            callback(event)
        if self._plugin_hook is not None:
            self._plugin_hook(event=event, manager=self)

    def handle_stats(self, request_id: str) -> CacheHandleStats:
        with self.lock:
            seq = self.sequences.find(request_id)
            nb = len(seq.blocks) if seq.state is SeqState.RUNNING else seq.host_blocks
            capacity = nb * self.config.block_size
            return CacheHandleStats(
                nb * self.config.bytes_per_block, nb, seq.num_tokens,
                seq.num_tokens / capacity if capacity else 0.0, seq.last_access,
                sum(1 for b in seq.blocks if self.pool.ref[b] > 1),
            )

    def stats(self) -> CacheManagerStats:
        with self.lock:
            c, pool, k = self.config, self.pool, self.counters
            swapped = sum(1 for s in self.sequences if s.state is SeqState.SWAPPED)
            queries = k["prefix_queries"]
            return CacheManagerStats(
                total_blocks=c.num_blocks, free_blocks=pool.num_free, used_blocks=pool.num_used,
                cached_blocks=len(pool.cached), active_caches=len(self.sequences) - swapped, swapped_caches=swapped,
                total_memory_bytes=c.num_blocks * c.bytes_per_block,
                used_memory_bytes=pool.num_used * c.bytes_per_block,
                host_blocks_total=self.host_tier.capacity, host_blocks_used=self.host_tier.used,
                prefix_queries=queries, prefix_hits=k["prefix_hits"],
                cache_hit_rate=k["prefix_hits"] / queries if queries else 0.0,
                allocation_count=k["allocation_count"], allocation_failures=k["allocation_failures"],
                eviction_count=k["eviction_count"], swap_out_count=k["swap_out_count"],
                swap_in_count=k["swap_in_count"], cow_copies=k["cow_copies"], pressure=self.pressure.level,
            )
