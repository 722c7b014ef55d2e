"""The reference cache manager: sequences, prefix caching, copy-on-write, swap and eviction over any backend.

It decides *which* blocks; the backend's storage moves bytes. Every public
method takes one re-entrant lock, validates everything first and only then
mutates, so a failed call changes nothing. Pressure callbacks fire after the
call that changed the level, outside the lock.

Prefix caching follows vLLM's semantics: the K/V of slots handed out by a
call (``allocate``, ``extend``, ``append_slots``) must be written before the
next step's attention runs, because full blocks are registered in the prefix
cache as soon as their token ids are known.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..blocks.hashing import BlockHasher
from ..blocks.metadata import BatchMetadata, build_batch_metadata
from ..blocks.pool import BlockPool
from ..blocks.tables import TableArrays
from ..config import AllocationRequest, PrefixCacheConfig
from ..contract.storage import BlockStorage
from ..errors import (
    InvalidArgument,
    OutOfBlocks,
    OutOfBounds,
    SequenceExists,
    SequenceNotResident,
    UnknownSequence,
)
from ..events import CacheEvent, CacheEventCallback
from ..interfaces import AdvancedKvCacheManager
from ..memory import BOOKKEEPING_BYTES_PER_BLOCK, check_memory, host_memory_available
from ..policy.eviction import EvictionPolicy, LruPolicy
from ..policy.pressure import MemoryPressure, PressureCallback, PressureMonitor
from ..stats import (
    CacheGcStats,
    CacheHandleStats,
    CacheManagerStats,
    DefragmentResult,
    FragmentationStats,
)
from . import maintenance, persistence
from .eviction import EvictionMixin
from .growth import GrowthMixin
from .host_tier import HostTierMixin
from .records import PagedKvCacheHandle, SeqState, Sequence

if TYPE_CHECKING:
    from ..remote import RemoteConnector, RemoteTier

__all__ = ["PagedKvCacheManager"]

RUNNING, SWAPPED = SeqState.RUNNING, SeqState.SWAPPED


class PagedKvCacheManager(GrowthMixin, HostTierMixin, EvictionMixin, AdvancedKvCacheManager):
    """Paged KV-cache bookkeeping over one backend storage (one device).

    ``eviction_policy`` chooses victims for :meth:`evict`; ``clock`` is
    injectable so TTL and LRU behaviour can be tested exactly; ``event_hook``
    (a pluggy hook relay such as ``default_registry().plugin_manager.hook``)
    receives every prefix-cache event through ``pagedkv_cache_event``, as
    :meth:`subscribe` callbacks do.
    """

    def __init__(self, storage: BlockStorage, *, eviction_policy: EvictionPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, event_hook=None) -> None:
        self.storage = storage
        self.config = config = storage.config
        self.device = storage.device
        self.clock = clock
        check_memory(f"the manager's bookkeeping of {config.num_blocks:,} blocks",
                     config.num_blocks * BOOKKEEPING_BYTES_PER_BLOCK, host_memory_available(), "host")
        self.pool = BlockPool(config.num_blocks, config.block_size, clock=clock)
        self.tables = TableArrays(config.max_blocks_per_seq)
        self.policy: EvictionPolicy = eviction_policy or LruPolicy()
        self.pressure = PressureMonitor(config.pressure, clock)
        self.prefix_config: PrefixCacheConfig | None = None
        self.hasher: BlockHasher | None = None
        self._last_plan: tuple[object, object, list] = (None, None, [])  # (request, root, its chain so far)
        self._set_prefix_config(config.prefix_cache if config.prefix_caching else None)
        self.host_capacity = config.num_host_blocks
        self.host_used = 0
        self._seqs: dict[str, Sequence] = {}
        self._external: Counter[int] = Counter()  # blocks handed out through ``allocator``
        self._lock = threading.RLock()
        self._arrivals = itertools.count()
        self._forks = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self._compressions: list[tuple[int, int, float]] = []  # (device bytes, host bytes, seconds)
        self._subscribers: list[CacheEventCallback] = []
        self.remote: RemoteConnector | None = None  # a shared tier behind the local prefix cache
        # the ``pagedkv_cache_event`` hook of a plugin manager (e.g. default_registry().plugin_manager.hook)
        self._plugin_hook = None if event_hook is None else event_hook.pagedkv_cache_event
        if self._plugin_hook is not None:
            self.pool.on_event = self._emit

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        with self._lock:
            yield
            change = self.pressure.update(self.pool.utilization())
        if change is not None:
            self.pressure.notify(change)

    def _sequence(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise UnknownSequence(request_id)
        return seq

    def _running(self, request_id: str) -> Sequence:
        seq = self._sequence(request_id)
        if seq.state is not RUNNING:
            raise SequenceNotResident(request_id, seq.state.value)
        return seq

    def has_sequence(self, request_id: str) -> bool:
        return request_id in self._seqs

    def get_record(self, request_id: str) -> Sequence | None:
        """The live record of ``request_id`` (None if absent): handles compare it to tell a new admission."""
        return self._seqs.get(request_id)

    def _set_prefix_config(self, prefix: PrefixCacheConfig | None) -> None:
        self._last_plan = (None, None, [])  # hashes cached under the old scheme are void
        self.prefix_config = prefix if prefix is not None and prefix.enabled else None
        if self.prefix_config is None:
            self.hasher = None
            self.pool.max_cached = None
            return
        self.hasher = BlockHasher(self.config.block_size, prefix.hash_algorithm, prefix.hash_seed)
        self.pool.max_cached = prefix.max_prefixes

    # -- admission ------------------------------------------------------------------

    def _admission_plan(self, request: AllocationRequest) -> tuple[list[int], list, int, object]:
        """(prefix-hit blocks, chain hashes so far, new blocks needed, chain root) for a request.

        Hashes are computed only up to the first miss; ``allocate`` completes
        the chain, so a refused ``can_allocate`` costs little.
        """
        bs = self.config.block_size
        n = request.initial_tokens
        total_blocks = -(-n // bs)
        if total_blocks > self.tables.max_width:
            raise OutOfBounds(n - 1, self.tables.max_width * bs)
        hits: list[int] = []
        hashes: list = []
        root = None
        if self.hasher is not None and request.token_ids is not None:
            prefix = self.prefix_config
            if prefix.ttl_seconds is not None:
                self.pool.expire_cached(prefix.ttl_seconds)
            cached_request, cached_root, known = self._last_plan
            root = self.hasher.root(request.cache_salt)  # also tells whether the hash scheme changed since
            if cached_request is not request or cached_root != root:  # can_allocate, allocate: hash once
                known = []
                self._last_plan = (request, root, known)
            tokens, parent, lookup, step = request.token_ids, root, self.pool.cached.get, self.hasher.next
            for i in range((n - 1) // bs):  # at least one token is always computed
                if i < len(known):
                    parent = known[i]
                else:
                    parent = step(parent, tokens[i * bs:(i + 1) * bs])
                    known.append(parent)
                hashes.append(parent)
                block = lookup(parent)
                if block is None:
                    break
                hits.append(block)
            if len(hits) * bs < prefix.min_prefix_length:
                hits = []
        return hits, hashes, total_blocks - len(hits), root

    def _blocks_to_admit(self, hits: list[int], new_blocks: int) -> int:
        """Free blocks an admission consumes: new ones plus cache hits that sit in the free queue."""
        return new_blocks + sum(1 for b in hits if self.pool.ref[b] == 0)

    def can_allocate(self, request: AllocationRequest) -> bool:
        with self._lock:
            if request.request_id in self._seqs:
                return False
            try:
                hits, _, new_blocks, _ = self._admission_plan(request)
            except OutOfBounds:
                return False
            return self._blocks_to_admit(hits, new_blocks) <= self.pool.num_free

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle:
        """Admit a sequence: reuse its longest cached prefix and reserve slots for the rest of its prompt."""
        prefetched = self._prefetch(request)
        with self._mutating():
            if request.request_id in self._seqs:
                raise SequenceExists(request.request_id)
            hits, hashes, new_blocks, root = self._admission_plan(request)
            needed = self._blocks_to_admit(hits, new_blocks)
            if needed > self.pool.num_free:
                self.counters["allocation_failures"] += 1
                raise OutOfBlocks(needed, self.pool.num_free)
            return self._admit(request, hits, hashes, new_blocks, root, prefetched)

    def _prefetch(self, request: AllocationRequest):
        """The remote tier's blocks for ``request``, read before the lock is taken (None without a tier)."""
        remote, hasher = self.remote, self.hasher
        if remote is None or hasher is None or request.token_ids is None or request.request_id in self._seqs:
            return None
        bs = self.config.block_size
        root = hasher.root(request.cache_salt)
        chain = hasher.chain(request.token_ids[:(request.initial_tokens - 1) // bs * bs], root)
        self._last_plan = (request, root, chain)  # the admission plan reuses these hashes
        return remote.prefetch(root, chain)

    def _admit(self, request: AllocationRequest, hits: list[int], hashes: list, new_blocks: int, root,
               prefetched=None, *, pinned: bool = False) -> PagedKvCacheHandle:
        """Commit an admission whose blocks were checked to be available (hits already pinned if ``pinned``)."""
        if root is not None:
            hashes += self.hasher.chain(request.token_ids, root, hashes[-1] if hashes else None, len(hashes))
        if not pinned:
            for block in hits:
                self.pool.incref(block)
        blocks = hits + self.pool.allocate(new_blocks)
        bs = self.config.block_size
        loaded = 0
        if self.remote is not None and root is not None:
            end = (request.initial_tokens - 1) // bs  # the last token is always computed
            loaded = self.remote.fill(prefetched, len(hits), hashes, blocks[len(hits):end])
            self.remote.note(root, hashes[len(hits) + loaded:])
        self.pool.register_chain(blocks, hashes, start=len(hits))
        row = self.tables.acquire()
        self.tables.set_row(row, blocks, request.initial_tokens)
        seq = Sequence(
            request.request_id, row, blocks, request.initial_tokens, request.priority,
            next(self._arrivals), self.clock(), root,
            token_ids=list(request.token_ids) if root is not None else None,
            hashes=hashes, cached_tokens=(len(hits) + loaded) * bs,
        )
        self._seqs[request.request_id] = seq
        self.counters["allocation_count"] += 1
        if root is not None:
            self.counters["prefix_queries"] += request.initial_tokens
            self.counters["prefix_hits"] += len(hits) * bs
        return PagedKvCacheHandle(self, request.request_id)

    def allocate_batch(self, requests: Seq[AllocationRequest]) -> list[PagedKvCacheHandle]:
        """Admit several requests at once, all or nothing (a scheduler step's admissions).

        Hits are looked up against the cache as it was before the batch, and
        every hit is pinned before any new block is taken, so one admission
        can never evict another's hit.
        """
        prefetched = [self._prefetch(r) for r in requests]
        with self._mutating():
            ids = [r.request_id for r in requests]
            if len(set(ids)) != len(ids):
                raise InvalidArgument("a request id appears twice in one batch")
            for rid in ids:
                if rid in self._seqs:
                    raise SequenceExists(rid)
            plans = [self._admission_plan(r) for r in requests]
            pinned = {b for hits, _, _, _ in plans for b in hits if self.pool.ref[b] == 0}
            needed = len(pinned) + sum(new for _, _, new, _ in plans)
            if needed > self.pool.num_free:
                self.counters["allocation_failures"] += len(requests)
                raise OutOfBlocks(needed, self.pool.num_free)
            for hits, _, _, _ in plans:
                for block in hits:
                    self.pool.incref(block)
            return [self._admit(r, *plan, fetched, pinned=True) for r, plan, fetched in zip(requests, plans, prefetched)]

    # -- growing, shrinking ---------------------------------------------------------

    def deallocate(self, request_id: str) -> None:
        """Free a sequence; its full blocks stay in the prefix cache until their space is needed."""
        with self._mutating():
            seq = self._sequence(request_id)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        del self._seqs[seq.request_id]
        if seq.state is RUNNING:
            self.pool.free(reversed(seq.blocks))  # tail blocks first: they are the least shared
        else:
            self.host_used -= seq.host_blocks
        self.tables.release(seq.row)

    # -- sharing ----------------------------------------------------------------------

    def fork(self, request_id: str, new_request_id: str | None = None) -> PagedKvCacheHandle:
        """Clone a sequence; blocks are shared and a partly filled one is copied on the first write."""
        with self._mutating():
            src = self._running(request_id)
            new_id = new_request_id or f"{request_id}#fork{next(self._forks)}"
            if new_id in self._seqs:
                raise SequenceExists(new_id)
            self._share(src, new_id, src.num_tokens, src.priority)
            self.counters["forks"] += 1
            return PagedKvCacheHandle(self, new_id)

    def clone_handle(self, request_id: str, new_request_id: str | None = None) -> PagedKvCacheHandle:
        return self.fork(request_id, new_request_id)

    def share_prefix(self, source: str, target: str, shared_tokens: int) -> None:
        """Give ``target`` (new, or empty) the first ``shared_tokens`` tokens of ``source`` without copying."""
        with self._mutating():
            src = self._running(source)
            if not 0 < shared_tokens <= src.num_tokens:
                raise OutOfBounds(shared_tokens - 1, src.num_tokens)
            existing = self._seqs.get(target)
            if existing is not None and (existing.state is not RUNNING or existing.num_tokens):
                raise SequenceExists(target)
            priority = src.priority
            if existing is not None:
                priority = existing.priority
                self._release(existing)
            self._share(src, target, shared_tokens, priority)

    def _share(self, src: Sequence, new_id: str, num_tokens: int, priority: int) -> None:
        bs = self.config.block_size
        blocks = src.blocks[:-(-num_tokens // bs)]
        for block in blocks:
            self.pool.incref(block)
        row = self.tables.acquire()
        self.tables.set_row(row, blocks, num_tokens)
        self._seqs[new_id] = Sequence(
            new_id, row, list(blocks), num_tokens, priority, next(self._arrivals), self.clock(), src.root,
            token_ids=None if src.token_ids is None else src.token_ids[:num_tokens],
            hashes=src.hashes[:num_tokens // bs], cached_tokens=num_tokens, dropped_tokens=src.dropped_tokens,
        )

    def enable_prefix_caching(self, config: PrefixCacheConfig) -> None:
        """Switch prefix caching on (or off with ``enabled=False``, which forgets every cached free block)."""
        with self._mutating():
            self._set_prefix_config(config)
            if self.prefix_config is None:
                self.pool.clear_cache()
            elif config.max_prefixes is not None:
                self.pool.trim_cached(config.max_prefixes)

    # -- reclaiming and compaction -------------------------------------------------------

    def gc(self, *, all_prefixes: bool = False) -> CacheGcStats:
        """Forget expired (TTL) or excess cached free blocks; ``all_prefixes`` empties the prefix cache.

        Emptying forgets the hashes of blocks in use too (their owners keep
        the blocks; they are just no longer findable).
        """
        start = time.perf_counter()
        with self._mutating():
            forgotten = 0
            prefix = self.prefix_config
            if all_prefixes or prefix is None:
                forgotten += self.pool.clear_cache()
            else:
                if prefix.ttl_seconds is not None:
                    forgotten += self.pool.expire_cached(prefix.ttl_seconds)
                if prefix.max_prefixes is not None:
                    forgotten += self.pool.trim_cached(prefix.max_prefixes)
        return CacheGcStats(forgotten * self.config.bytes_per_block, forgotten,
                            1000 * (time.perf_counter() - start))

    def defragment(self) -> DefragmentResult:
        """Move occupied blocks to the lowest ids (data included) and rewrite every table."""
        with self._mutating():
            return maintenance.defragment(self)

    def fragmentation_stats(self) -> FragmentationStats:
        with self._lock:
            return maintenance.fragmentation_stats(self)

    def check_invariants(self, *, raise_on_error: bool = True) -> list[str]:
        """Every leaked, double-owned or miscounted block (empty when all is well)."""
        with self._lock:
            return maintenance.check_invariants(self, raise_on_error=raise_on_error)

    # -- export ---------------------------------------------------------------------------

    def batch_metadata(self, request_ids: Seq[str], query_lens: Seq[int] | None = None) -> BatchMetadata:
        """Kernel metadata for a batch whose last ``query_lens[i]`` tokens are new (default: 1 each)."""
        with self._lock:
            seqs = [self._running(r) for r in request_ids]
            rows = np.fromiter((s.row for s in seqs), np.int64, len(seqs))
            if query_lens is None:
                qlens = np.ones(len(seqs), np.int32)
            else:
                qlens = np.asarray(query_lens, np.int32)
                if qlens.shape != (len(seqs),) or (qlens < 0).any():
                    raise InvalidArgument("query_lens must be one non-negative count per request")
            lens = self.tables.lens[rows]
            if (qlens > lens).any():
                raise InvalidArgument("a sequence has more new tokens than cached tokens")
            return build_batch_metadata(tuple(request_ids), self.tables.tables, self.tables.lens, rows,
                                        None if query_lens is None else qlens, self.config.block_size)

    # -- persistence --------------------------------------------------------------------------

    def save(self, path, sequences: Seq[str] | None = None, *, hmac_key: bytes | None = None) -> int:
        """Write sequences (all if None) to a portable safetensors file; return blocks saved.

        Swapped-out sequences are saved from the host tier, bit-exact, and load
        back swapped out. Saving a subset makes a prompt cache that
        :meth:`load_prompt_cache` adds to another manager's prefix cache.
        ``hmac_key`` signs the file (HMAC-SHA256) so that loading with the same
        key can refuse files this deployment did not write.
        """
        return persistence.save_cache(self, path, sequences, hmac_key=hmac_key)

    @classmethod
    def load(cls, path, backend="numpy", device: str = "cpu", *, hmac_key: bytes | None = None,
             max_bytes: int | None = None, **kwargs) -> PagedKvCacheManager:
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

    def load_prompt_cache(self, path, *, hmac_key: bytes | None = None) -> int:
        """Add a saved cache's full blocks to this manager's prefix cache; return how many joined.

        Validates the file and its fit (shapes, dtype, block size, hash scheme,
        no more blocks than this pool and host tier) before reading its tensors
        or changing anything; ``hmac_key`` as in :meth:`load`. The blocks sit
        in the free queue, findable, until their space is needed.
        """
        return persistence.load_prompt_cache(self, path, hmac_key=hmac_key)

    # -- remote tier ---------------------------------------------------------------------------

    def attach_remote(self, tier: RemoteTier, **options) -> RemoteConnector:
        """Put a shared remote tier (e.g. Redis) behind the local prefix cache; see :mod:`pagedkv_core.remote`.

        Admissions then load the blocks the local cache lacks from the tier,
        and full blocks are written to it in the background after each
        :meth:`RemoteConnector.commit`. ``options`` go to :class:`RemoteConnector`.
        """
        from ..remote import RemoteConnector

        with self._lock:
            if self.remote is not None:
                raise InvalidArgument("a remote tier is already attached; close its connector first")
            self.remote = RemoteConnector(self, tier, **options)
            return self.remote

    # -- views ------------------------------------------------------------------------------

    def get_handle(self, request_id: str) -> PagedKvCacheHandle | None:
        return PagedKvCacheHandle(self, request_id) if request_id in self._seqs else None

    def list_handles(self) -> list[tuple[str, PagedKvCacheHandle]]:
        with self._lock:
            return [(r, PagedKvCacheHandle(self, r)) for r in self._seqs]

    def set_pressure_callback(self, callback: PressureCallback) -> None:
        """Call ``callback(new_level, old_level)`` on every pressure change (adds to earlier callbacks)."""
        self.pressure.callbacks.append(callback)

    def subscribe(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for every prefix-cache change, in order; returns an unsubscribe function.

        Events (:mod:`pagedkv_core.events`) are delivered synchronously under
        the manager's lock, so a subscriber must be quick and must not call
        back into the manager; hand them to a queue if there is real work.
        """
        with self._lock:
            self._subscribers.append(callback)
            self.pool.on_event = self._emit

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.remove(callback)
                if not self._subscribers and self._plugin_hook is None:
                    self.pool.on_event = None

        return unsubscribe

    def _emit(self, event: CacheEvent) -> None:
        for callback in self._subscribers:
            callback(event)
        if self._plugin_hook is not None:
            self._plugin_hook(event=event, manager=self)

    @property
    def pressure_level(self) -> MemoryPressure:
        return self.pressure.level

    def handle_stats(self, request_id: str) -> CacheHandleStats:
        with self._lock:
            seq = self._sequence(request_id)
            nb = len(seq.blocks) if seq.state is RUNNING else seq.host_blocks
            capacity = nb * self.config.block_size
            return CacheHandleStats(
                nb * self.config.bytes_per_block, nb, seq.num_tokens,
                seq.num_tokens / capacity if capacity else 0.0, seq.last_access,
                sum(1 for b in seq.blocks if self.pool.ref[b] > 1),
            )

    def stats(self) -> CacheManagerStats:
        with self._lock:
            c, pool, k = self.config, self.pool, self.counters
            swapped = sum(1 for s in self._seqs.values() if s.state is SWAPPED)
            queries = k["prefix_queries"]
            return CacheManagerStats(
                total_blocks=c.num_blocks, free_blocks=pool.num_free, used_blocks=pool.num_used,
                cached_blocks=len(pool.cached), active_caches=len(self._seqs) - swapped, swapped_caches=swapped,
                total_memory_bytes=c.num_blocks * c.bytes_per_block,
                used_memory_bytes=pool.num_used * c.bytes_per_block,
                host_blocks_total=self.host_capacity, host_blocks_used=self.host_used,
                prefix_queries=queries, prefix_hits=k["prefix_hits"],
                cache_hit_rate=k["prefix_hits"] / queries if queries else 0.0,
                allocation_count=k["allocation_count"], allocation_failures=k["allocation_failures"],
                eviction_count=k["eviction_count"], swap_out_count=k["swap_out_count"],
                swap_in_count=k["swap_in_count"], cow_copies=k["cow_copies"], pressure=self.pressure.level,
            )

    @property
    def allocator(self) -> maintenance.ManagerBlockAllocator:
        """The pool as a plain :class:`BlockAllocator` (blocks outside any sequence, e.g. scratch)."""
        return maintenance.ManagerBlockAllocator(self)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)
