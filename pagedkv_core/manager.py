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

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager

import numpy as np

from . import maintenance
from .block_pool import BlockPool
from .block_table import TableArrays
from .config import AllocationRequest, PrefixCacheConfig
from .dtypes import itemsize
from .errors import (
    InvalidArgument,
    OutOfBlocks,
    OutOfBounds,
    OutOfHostBlocks,
    SequenceExists,
    SequenceNotResident,
    UnknownSequence,
    UnsupportedOperation,
)
from .hashing import BlockHasher
from .interfaces import AdvancedKvCacheManager
from .metadata import BatchMetadata, build_batch_metadata
from .policies import EvictionCandidate, EvictionPolicy, LruPolicy, SequenceInfo
from .pressure import MemoryPressure, PressureCallback, PressureMonitor
from .sequence import PagedKvCacheHandle, SeqState, Sequence
from .stats import (
    CacheGcStats,
    CacheHandleStats,
    CacheManagerStats,
    CompressionStats,
    DefragmentResult,
    EvictionResult,
    FragmentationStats,
)
from .storage import BlockStorage

__all__ = ["PagedKvCacheManager"]

RUNNING, SWAPPED = SeqState.RUNNING, SeqState.SWAPPED


class PagedKvCacheManager(AdvancedKvCacheManager):
    """Paged KV-cache bookkeeping over one backend storage (one device).

    ``eviction_policy`` chooses victims for :meth:`evict`; ``clock`` is
    injectable so TTL and LRU behaviour can be tested exactly.
    """

    def __init__(self, storage: BlockStorage, *, eviction_policy: EvictionPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.config = config = storage.config
        self.device = storage.device
        self.clock = clock
        self.pool = BlockPool(config.num_blocks, config.block_size, clock=clock)
        self.tables = TableArrays(config.max_blocks_per_seq)
        self.policy: EvictionPolicy = eviction_policy or LruPolicy()
        self.pressure = PressureMonitor(config.pressure, clock)
        self.prefix_config: PrefixCacheConfig | None = None
        self.hasher: BlockHasher | None = None
        if config.prefix_caching:
            self._set_prefix_config(config.prefix_cache)
        self.host_capacity = config.num_host_blocks
        self.host_used = 0
        self._seqs: dict[str, Sequence] = {}
        self._external: Counter[int] = Counter()  # blocks handed out through ``allocator``
        self._lock = threading.RLock()
        self._arrivals = itertools.count()
        self._forks = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self._compressions: list[tuple[int, int, float]] = []  # (device bytes, host bytes, seconds)
        self._last_plan: tuple[object, object, list] = (None, None, [])  # (request, root, its chain so far)

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

    def _set_prefix_config(self, prefix: PrefixCacheConfig | None) -> None:
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
        if total_blocks > self.tables.width:
            raise OutOfBounds(n - 1, self.tables.width * bs)
        hits: list[int] = []
        hashes: list = []
        root = None
        if self.hasher is not None and request.token_ids is not None:
            prefix = self.prefix_config
            if prefix.ttl_seconds is not None:
                self.pool.expire_cached(prefix.ttl_seconds)
            cached_request, root, known = self._last_plan
            if cached_request is not request:  # can_allocate then allocate hash the prompt once
                root, known = self.hasher.root(request.cache_salt), []
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
        with self._mutating():
            if request.request_id in self._seqs:
                raise SequenceExists(request.request_id)
            hits, hashes, new_blocks, root = self._admission_plan(request)
            needed = self._blocks_to_admit(hits, new_blocks)
            if needed > self.pool.num_free:
                self.counters["allocation_failures"] += 1
                raise OutOfBlocks(needed, self.pool.num_free)
            return self._admit(request, hits, hashes, new_blocks, root)

    def _admit(self, request: AllocationRequest, hits: list[int], hashes: list, new_blocks: int, root,
               *, pinned: bool = False) -> PagedKvCacheHandle:
        """Commit an admission whose blocks were checked to be available (hits already pinned if ``pinned``)."""
        if root is not None:
            hashes += self.hasher.chain(request.token_ids, root, hashes[-1] if hashes else None, len(hashes))
        if not pinned:
            for block in hits:
                self.pool.incref(block)
        blocks = hits + self.pool.allocate(new_blocks)
        for i in range(len(hits), len(hashes)):
            self.pool.register(blocks[i], hashes[i])
        row = self.tables.acquire()
        self.tables.set_row(row, blocks, request.initial_tokens)
        bs = self.config.block_size
        seq = Sequence(
            request.request_id, row, blocks, request.initial_tokens, request.priority,
            next(self._arrivals), self.clock(), root,
            token_ids=list(request.token_ids) if root is not None else None,
            hashes=hashes, cached_tokens=len(hits) * bs,
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
            return [self._admit(r, *plan, pinned=True) for r, plan in zip(requests, plans)]

    # -- growing, shrinking ---------------------------------------------------------

    def extend(self, request_id: str, additional_tokens: int, token_ids: Seq[int] | None = None) -> None:
        """Reserve slots for ``additional_tokens`` more tokens (their ids enable prefix caching)."""
        self.extend_batch([request_id], [additional_tokens], None if token_ids is None else [token_ids])

    def append_slots(self, request_ids: Seq[str], token_ids: Seq[int] | None = None) -> BatchMetadata:
        """The decode step: one new token for each sequence; returns the step's kernel metadata.

        This is the hot path of a serving loop, so it is written out rather
        than routed through :meth:`extend_batch`: one pass to validate, one
        to commit, and the slot mapping collected on the way.
        """
        with self._mutating():
            try:
                seqs = [self._seqs[r] for r in request_ids]
            except KeyError as exc:
                raise UnknownSequence(exc.args[0]) from None
            if len(set(request_ids)) != len(seqs):
                raise InvalidArgument("a request id appears twice in one batch")
            if token_ids is not None and len(token_ids) != len(seqs):
                raise InvalidArgument("token_ids must hold one token per request")
            pool, ref, bs, width = self.pool, self.pool.ref, self.config.block_size, self.tables.width
            needed = 0
            for seq in seqs:
                if seq.state is not RUNNING:
                    raise SequenceNotResident(seq.request_id, seq.state.value)
                offset = seq.num_tokens % bs
                if offset == 0:
                    if len(seq.blocks) >= width:
                        raise OutOfBounds(seq.num_tokens, width * bs)
                    needed += 1
                elif ref[seq.blocks[-1]] > 1:
                    needed += 1
            if needed > pool.num_free:
                raise OutOfBlocks(needed, pool.num_free)
            table, now = self.tables.tables, self.clock()
            slots = [0] * len(seqs)
            cow_src: list[int] = []
            cow_dst: list[int] = []
            for i, seq in enumerate(seqs):
                n, blocks = seq.num_tokens, seq.blocks
                offset = n % bs
                if offset == 0:
                    block = pool.allocate_one()
                    table[seq.row, len(blocks)] = block
                    blocks.append(block)
                else:
                    block = blocks[-1]
                    if ref[block] > 1:  # shared partly filled block: copy on write
                        cow_src.append(block)
                        ref[block] -= 1
                        block = pool.allocate_one()
                        cow_dst.append(block)
                        blocks[-1] = block
                        table[seq.row, len(blocks) - 1] = block
                slots[i] = block * bs + offset
                seq.num_tokens = n + 1
                seq.last_access = now
                seq.access_count += 1
                if seq.token_ids is not None:
                    if token_ids is None:
                        seq.token_ids, seq.root = None, None
                    else:
                        seq.token_ids.append(token_ids[i])
                        if offset == bs - 1:
                            self._hash_full_blocks(seq)
            rows = np.fromiter([seq.row for seq in seqs], np.int64, len(seqs))
            self.tables.lens[rows] += 1
            if cow_src:
                self.storage.copy_blocks(cow_src, cow_dst)
                self.counters["cow_copies"] += len(cow_src)
            return build_batch_metadata(tuple(request_ids), table, self.tables.lens, rows, None, bs,
                                        np.array(slots, np.int32))

    def extend_batch(self, request_ids: Seq[str], counts: Seq[int] | None = None,
                     token_ids: Seq[Seq[int] | None] | None = None) -> None:
        """Reserve slots for a whole scheduler step at once; all or nothing.

        ``counts=None`` means one token per sequence. A shared, partly filled
        last block is copied first (copy-on-write), all copies in one storage call.
        """
        with self._mutating():
            seqs = [self._running(r) for r in request_ids]
            if len(set(map(id, seqs))) != len(seqs):
                raise InvalidArgument("a request id appears twice in one batch")
            counts = [1] * len(seqs) if counts is None else [int(c) for c in counts]
            if len(counts) != len(seqs) or (token_ids is not None and len(token_ids) != len(seqs)):
                raise InvalidArgument("request_ids, counts and token_ids must have the same length")
            self._reserve(seqs, counts, token_ids)

    def _reserve(self, seqs: list[Sequence], counts: list[int], token_ids) -> None:
        bs, width, ref = self.config.block_size, self.tables.width, self.pool.ref
        needed = 0
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if n < 0:
                raise InvalidArgument(f"cannot extend {seq.request_id!r} by {n} tokens")
            total = seq.num_tokens + n
            blocks = -(-total // bs)
            if blocks > width:
                raise OutOfBounds(total - 1, width * bs)
            needed += blocks - len(seq.blocks)
            if n and seq.num_tokens % bs and ref[seq.blocks[-1]] > 1:
                needed += 1
            if token_ids is not None and token_ids[i] is not None and len(token_ids[i]) != n:
                raise InvalidArgument(f"{seq.request_id!r}: {len(token_ids[i])} token ids for {n} tokens")
        if needed > self.pool.num_free:
            raise OutOfBlocks(needed, self.pool.num_free)
        cow_src: list[int] = []
        cow_dst: list[int] = []
        table, lens, now = self.tables.tables, self.tables.lens, self.clock()
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            seq.last_access = now
            seq.access_count += 1
            if not n:
                continue
            blocks, row = seq.blocks, seq.row
            if seq.num_tokens % bs and ref[blocks[-1]] > 1:
                (fresh,) = self.pool.allocate(1)
                cow_src.append(blocks[-1])
                cow_dst.append(fresh)
                ref[blocks[-1]] -= 1  # still >= 1: other owners keep it
                blocks[-1] = fresh
                table[row, len(blocks) - 1] = fresh
            total = seq.num_tokens + n
            grow = -(-total // bs) - len(blocks)
            if grow:
                fresh_blocks = self.pool.allocate(grow)
                table[row, len(blocks):len(blocks) + grow] = fresh_blocks
                blocks.extend(fresh_blocks)
            seq.num_tokens = total
            lens[row] = total
            if seq.token_ids is not None:
                tokens = None if token_ids is None else token_ids[i]
                if tokens is None:  # ids unknown: this sequence stops feeding the prefix cache
                    seq.token_ids, seq.root = None, None
                else:
                    seq.token_ids.extend(tokens)
                    self._hash_full_blocks(seq)
        if cow_src:
            self.storage.copy_blocks(cow_src, cow_dst)
            self.counters["cow_copies"] += len(cow_src)

    def _hash_full_blocks(self, seq: Sequence) -> None:
        bs, hashes, tokens = self.config.block_size, seq.hashes, seq.token_ids
        while len(hashes) < len(tokens) // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.root
            block_hash = self.hasher.next(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(block_hash)
            self.pool.register(seq.blocks[i], block_hash)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Roll back the last ``num_tokens`` tokens (rejected speculative tokens)."""
        with self._mutating():
            seq = self._running(request_id)
            if not 0 <= num_tokens <= seq.num_tokens:
                raise OutOfBounds(seq.num_tokens - num_tokens, seq.num_tokens)
            bs = self.config.block_size
            total = seq.num_tokens - num_tokens
            keep = -(-total // bs)
            dropped = seq.blocks[keep:]
            del seq.blocks[keep:]
            self.pool.free(reversed(dropped))
            if total % bs and self.pool.ref[seq.blocks[-1]] == 1:
                self.pool.unregister(seq.blocks[-1])  # about to be overwritten: no longer that prefix
            seq.num_tokens = total
            del seq.hashes[total // bs:]
            if seq.token_ids is not None:
                del seq.token_ids[total:]
            self.tables.set_row(seq.row, seq.blocks, total)

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

    # -- the host tier -----------------------------------------------------------------

    def swap_out(self, request_id: str, *, quantize: str | None = None) -> None:
        """Copy a sequence's blocks to the host tier and free them on the device (preemption)."""
        with self._mutating():
            seq = self._running(request_id)
            count = len(seq.blocks)
            if count > self.host_capacity - self.host_used:
                raise OutOfHostBlocks(count, self.host_capacity - self.host_used)
            host = self.storage.swap_out(seq.blocks, quantize=quantize)
            self.pool.free(reversed(seq.blocks))
            seq.blocks = []
            self.tables.set_row(seq.row, [], seq.num_tokens)
            seq.state, seq.host, seq.host_blocks = SWAPPED, host, count
            seq.host_lossy = quantize is not None and not self.config.quantized
            self.host_used += count
            self.counters["swap_out_count"] += 1

    def swap_in(self, request_id: str) -> None:
        """Bring a swapped sequence back into fresh device blocks."""
        with self._mutating():
            seq = self._sequence(request_id)
            if seq.state is not SWAPPED:
                raise SequenceNotResident(request_id, seq.state.value)
            if seq.host_blocks > self.pool.num_free:
                raise OutOfBlocks(seq.host_blocks, self.pool.num_free)
            blocks = self.pool.allocate(seq.host_blocks)
            try:
                seq.host.wait()
                self.storage.swap_in(seq.host, blocks)
            except BaseException:
                self.pool.free(reversed(blocks))
                raise
            seq.blocks = blocks
            if seq.host_lossy:  # dequantized values differ from what the hashes describe
                seq.root, seq.token_ids, seq.hashes = None, None, []
            for block, block_hash in zip(blocks, seq.hashes):
                self.pool.register(block, block_hash)
            self.tables.set_row(seq.row, blocks, seq.num_tokens)
            self.host_used -= seq.host_blocks
            seq.state, seq.host, seq.host_blocks, seq.host_lossy = RUNNING, None, 0, False
            self.counters["swap_in_count"] += 1

    def export_sequence(self, request_id: str) -> tuple[Sequence, object]:
        """Copy a running sequence's blocks to host memory and remove it from this manager.

        Returns its record and host blocks for :meth:`import_sequence` of
        another manager (``MultiDeviceManager.move_cache``).
        """
        with self._mutating():
            seq = self._running(request_id)
            host = self.storage.swap_out(seq.blocks)
            self._release(seq)
            return seq, host

    def can_import(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def import_sequence(self, record: Sequence, host) -> PagedKvCacheHandle:
        """Admit a sequence exported by another manager, with its data and prefix hashes."""
        with self._mutating():
            if record.request_id in self._seqs:
                raise SequenceExists(record.request_id)
            if host.num_blocks > self.pool.num_free:
                raise OutOfBlocks(host.num_blocks, self.pool.num_free)
            if type(host).__module__ != type(self.storage).__module__:
                host = host.to_numpy()
            blocks = self.pool.allocate(host.num_blocks)
            try:
                host.wait()
                self.storage.swap_in(host, blocks)
            except BaseException:
                self.pool.free(reversed(blocks))
                raise
            for block, block_hash in zip(blocks, record.hashes):
                self.pool.register(block, block_hash)
            row = self.tables.acquire()
            self.tables.set_row(row, blocks, record.num_tokens)
            self._seqs[record.request_id] = Sequence(
                record.request_id, row, blocks, record.num_tokens, record.priority, next(self._arrivals),
                self.clock(), record.root, token_ids=record.token_ids, hashes=list(record.hashes),
                cached_tokens=record.cached_tokens, dropped_tokens=record.dropped_tokens,
            )
            return PagedKvCacheHandle(self, record.request_id)

    def compress_cache(self, request_id: str, compression_ratio: float | None = None) -> None:
        """Move a sequence to the host tier as int8 with per-(block, head) scales; ``swap_in`` restores it.

        ``compression_ratio`` (host bytes / device bytes) is the most the caller
        accepts; ``UnsupportedOperation`` if int8 cannot reach it.
        """
        with self._mutating():
            if self.config.quantized:
                raise UnsupportedOperation(f"the pool already stores {self.config.dtype}")
            seq = self._running(request_id)
            c = self.config
            per_block = c.block_size * c.num_kv_heads * c.head_dim
            ratio = (per_block + c.num_kv_heads * 4) / (per_block * itemsize(c.dtype))
            if compression_ratio is not None and not 0 < compression_ratio <= 1:
                raise InvalidArgument(f"compression_ratio must be in (0, 1], got {compression_ratio}")
            if compression_ratio is not None and ratio > compression_ratio:
                raise UnsupportedOperation(f"int8 reaches a ratio of {ratio:.3f}, above the {compression_ratio} asked")
            device_bytes = len(seq.blocks) * c.bytes_per_block
            start = time.perf_counter()
            self.swap_out(request_id, quantize="int8")
            self._compressions.append((device_bytes, seq.host.nbytes, time.perf_counter() - start))

    def compression_stats(self) -> CompressionStats:
        with self._lock:
            done = self._compressions
            current = sum(1 for s in self._seqs.values() if s.host_lossy)
            if not done:
                return CompressionStats(current, 0, 1.0, 0.0)
            return CompressionStats(
                current,
                sum(d - h for d, h, _ in done),
                sum(h / d for d, h, _ in done) / len(done),
                1000 * sum(t for _, _, t in done) / len(done),
            )

    def enable_prefix_caching(self, config: PrefixCacheConfig) -> None:
        """Switch prefix caching on (or off with ``enabled=False``, which forgets every cached free block)."""
        with self._mutating():
            self._set_prefix_config(config)
            if self.prefix_config is None:
                self.pool.trim_cached(0)
            elif config.max_prefixes is not None:
                self.pool.trim_cached(config.max_prefixes)

    # -- eviction -----------------------------------------------------------------------

    def sequence_infos(self) -> list[SequenceInfo]:
        """Snapshots of the running sequences, as eviction policies see them."""
        with self._lock:
            ref = self.pool.ref
            return [
                SequenceInfo(s.request_id, s.num_tokens, len(s.blocks), sum(1 for b in s.blocks if ref[b] == 1),
                             s.priority, s.last_access, s.access_count, s.arrival)
                for s in self._seqs.values() if s.state is RUNNING
            ]

    def select_eviction_candidates(self, required_bytes: int) -> list[EvictionCandidate]:
        required = -(-int(required_bytes) // self.config.bytes_per_block)
        return self.policy.select_eviction_candidates(required, self.sequence_infos())

    def record_access(self, request_id: str) -> None:
        """Mark a sequence as used now (LRU/LFU read this)."""
        with self._lock:
            seq = self._sequence(request_id)
            seq.last_access = self.clock()
            seq.access_count += 1
            self.policy.record_access(request_id, seq.last_access)

    def evict(self, required_blocks: int | None = 1, *, swap: bool = True) -> EvictionResult:
        """Free at least ``required_blocks`` blocks as the policy chooses.

        Whole-sequence victims are swapped to the host tier when it has room
        (and ``swap``), else dropped: their handles become invalid. Window
        policies cut blocks out of sequences instead.
        """
        with self._mutating():
            free_before = self.pool.num_free
            swapped, dropped, trimmed = [], [], []
            for cand in self.policy.select_eviction_candidates(required_blocks, self.sequence_infos()):
                seq = self._running(cand.request_id)
                if cand.blocks is not None:
                    trimmed.append((seq.request_id, self._cut_blocks(seq, cand.blocks)))
                elif swap and len(seq.blocks) <= self.host_capacity - self.host_used:
                    self.swap_out(seq.request_id)
                    swapped.append(seq.request_id)
                else:
                    self._release(seq)
                    dropped.append(seq.request_id)
                self.counters["eviction_count"] += 1
            return EvictionResult(tuple(swapped), tuple(dropped), tuple(trimmed), self.pool.num_free - free_before)

    def evict_to_threshold(self, utilization: float, *, swap: bool = True) -> EvictionResult:
        """Evict until at most ``utilization`` of the pool is in use."""
        if not 0 <= utilization <= 1:
            raise InvalidArgument(f"utilization must be in [0, 1], got {utilization}")
        with self._lock:
            excess = self.pool.num_used - int(utilization * self.config.num_blocks)
            if excess <= 0:
                return EvictionResult((), (), (), 0)
            return self.evict(excess, swap=swap)

    def trim_window(self, request_id: str, policy) -> int:
        """Apply a window policy (StreamingLLM, sliding window) to one sequence; return tokens removed."""
        with self._mutating():
            seq = self._running(request_id)
            return self._cut_blocks(seq, tuple(policy.cut(seq.num_tokens)))

    def _cut_blocks(self, seq: Sequence, logical: Seq[int]) -> int:
        bs = self.config.block_size
        cut = sorted(set(logical))
        if not cut:
            return 0
        if cut[0] < 0 or cut[-1] >= seq.num_tokens // bs or cut[-1] >= len(seq.blocks) - 1:
            raise InvalidArgument(f"can only cut full blocks before the last one of {seq.request_id!r}")
        removed = [seq.blocks[i] for i in cut]
        cut_set = set(cut)
        seq.blocks = [b for i, b in enumerate(seq.blocks) if i not in cut_set]
        self.pool.free(reversed(removed))
        tokens = len(cut) * bs
        seq.num_tokens -= tokens
        seq.dropped_tokens += tokens
        seq.root, seq.token_ids, seq.hashes = None, None, []  # no longer a prefix of its own tokens
        self.tables.set_row(seq.row, seq.blocks, seq.num_tokens)
        return tokens

    # -- reclaiming and compaction -------------------------------------------------------

    def gc(self, *, all_prefixes: bool = False) -> CacheGcStats:
        """Forget expired (TTL) or excess cached free blocks; ``all_prefixes`` empties the prefix cache."""
        start = time.perf_counter()
        with self._mutating():
            forgotten = 0
            prefix = self.prefix_config
            if all_prefixes or prefix is None:
                forgotten += self.pool.trim_cached(0)
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

    # -- views ------------------------------------------------------------------------------

    def get_handle(self, request_id: str) -> PagedKvCacheHandle | None:
        return PagedKvCacheHandle(self, request_id) if request_id in self._seqs else None

    def list_handles(self) -> list[tuple[str, PagedKvCacheHandle]]:
        with self._lock:
            return [(r, PagedKvCacheHandle(self, r)) for r in self._seqs]

    def set_pressure_callback(self, callback: PressureCallback) -> None:
        """Call ``callback(new_level, old_level)`` on every pressure change (adds to earlier callbacks)."""
        self.pressure.callbacks.append(callback)

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
