"""Connects one manager to a remote tier: prefix hits at admission, background writes after each step.

Reads happen when the manager admits a request: before taking its lock, the
blocks of the prompt that the local prefix cache lacks are probed in one
round trip, read in one more and validated (:meth:`RemoteConnector.prefetch`);
under the lock, those that still line up after the local hits are copied into
the request's fresh blocks (:meth:`RemoteConnector.fill`). Those tokens count
as cached, so the engine does not compute them.

Writes never happen on the caller's thread. Every full block the manager
hashes is noted; :meth:`RemoteConnector.commit` (call it once the step's K/V
are written, as vLLM's connectors save after the forward pass) copies the
noted blocks to host memory in one storage call and hands them to a writer
thread through a queue bounded in blocks. A full queue drops the batch; a
failing server opens a circuit for ``retry_interval`` seconds during which
reads are misses and writes are dropped, all counted in :class:`RemoteStats`.
Nothing the server does can raise in a decode step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from ..contract.storage import HostBlocks, NumpyHostBlocks
from ..errors import InvalidArgument, PagedKvError, RemoteTierError
from .host import CacheHost
from .tier import RemoteTier

__all__ = ["Prefetched", "RemoteConnector", "RemoteStats"]

_Item = tuple[bytes, Hashable]  # (tenant tag, block hash): one block as the server knows it
_WriteJob = tuple[list[_Item], HostBlocks]  # blocks copied out by a commit, for the writer thread


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """Counters of one connector since it was attached."""

    lookups: int  # admissions that asked the tier
    blocks_queried: int  # blocks asked for (those the local cache lacked)
    hit_blocks: int  # blocks loaded from the tier
    corrupt_values: int  # values present but refused (layout, hash, checksum): misses
    errors: int  # failed round trips (reads or writes)
    unavailable_skips: int  # reads and write batches skipped while the circuit was open
    put_blocks: int
    put_bytes: int
    fetched_bytes: int
    dropped_blocks: int  # noted blocks never written: queue full, server down, or a write failed
    queued_blocks: int  # waiting for the writer now

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.blocks_queried if self.blocks_queried else 0.0


@dataclass(frozen=True, slots=True)
class Prefetched:
    """Blocks read from the tier for one admission: ``hashes`` are chain entries ``start, start + 1, ...``."""

    root: Hashable
    start: int
    hashes: list[Hashable]
    host: NumpyHostBlocks


class _KnownSet:
    """Recently seen (tag, hash) pairs present on the server, so they are not written twice."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[_Item, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def add(self, items: Iterable[_Item]) -> None:
        with self._lock:
            for item in items:
                self._items[item] = None
                self._items.move_to_end(item)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def discard(self, items: Iterable[_Item]) -> None:
        with self._lock:
            for item in items:
                self._items.pop(item, None)

    def __contains__(self, item: object) -> bool:
        with self._lock:
            return item in self._items


class RemoteConnector:
    """The manager's link to a :class:`RemoteTier` (see the module docstring for the protocol).

    ``manager`` is any :class:`~.host.CacheHost` (the reference manager is
    one). ``agree`` reduces an int over tensor-parallel ranks (minimum): every
    rank then loads the same number of blocks, keeping the ranks' managers equal.
    """

    def __init__(self, manager: CacheHost, tier: RemoteTier, *, max_queued_blocks: int = 1024,
                 put_batch_blocks: int = 64, retry_interval: float = 5.0,
                 agree: Callable[[int], int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if max_queued_blocks < 1 or put_batch_blocks < 1 or retry_interval < 0:
            raise InvalidArgument("max_queued_blocks and put_batch_blocks must be >= 1, retry_interval >= 0")
        tier.layout.check_manager(manager)
        self.manager, self.tier = manager, tier
        self.max_queued_blocks, self.put_batch_blocks = max_queued_blocks, put_batch_blocks
        self.retry_interval, self.agree, self.clock = retry_interval, agree, clock
        self._pending: list[tuple[Hashable, Hashable]] = []  # (chain root, block hash) noted since the last commit
        self._known = _KnownSet(1 << 16)
        self._queue: queue.Queue[_WriteJob | None] = queue.Queue()  # None stops the writer
        self._queued = 0
        self._down_until = float("-inf")
        self._counts = dict.fromkeys(("lookups", "blocks_queried", "hit_blocks", "corrupt_values", "errors",
                                      "unavailable_skips", "put_blocks", "put_bytes", "fetched_bytes",
                                      "dropped_blocks"), 0)
        self._counts_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="pagedkv-remote-writer", daemon=True)
        self._closed = False

    # -- called by the manager ------------------------------------------------------------

    def note(self, root: Hashable, hashes: Sequence[Hashable]) -> None:
        """Full blocks just hashed (under the manager's lock); written at the next :meth:`commit` if still cached."""
        room = 4 * self.max_queued_blocks - len(self._pending)
        if len(hashes) > room:  # the engine never commits: keep memory bounded, count the loss
            self._count(dropped_blocks=len(hashes) - max(room, 0))
            hashes = hashes[:max(room, 0)]
        self._pending.extend((root, h) for h in hashes)

    def prefetch(self, root: Hashable, chain: Sequence[Hashable]) -> Prefetched | None:
        """Probe and read the blocks of a prompt's ``chain`` the local cache lacks, *before* the manager's lock.

        The network round trips of an admission happen here, so a decode step
        on another thread never waits for the server. ``chain`` holds the
        hashes of the prompt's full blocks but the last token's; the blocks
        wanted run from the first one the local prefix cache lacks now.
        """
        manager = self.manager
        limit = len(chain)
        if not limit or not self._worth_loading(limit):
            return None
        cached = manager.pool.cached  # read without the lock: a stale view only costs hits
        start = next((i for i, h in enumerate(chain) if h not in cached), limit)
        if start == limit:
            return None
        wanted = chain[start:]
        tag = self.tier.tagger.for_root(root)
        valid, fetched = 0, None
        if self._available():
            try:
                found = self.tier.probe(tag, wanted)
                if found:
                    fetched = self.tier.fetch(tag, wanted[:found])
                    valid = fetched.num_blocks
                    self._count(corrupt_values=fetched.corrupt, fetched_bytes=fetched.nbytes)
            except RemoteTierError:
                self._failed()
        else:
            self._count(unavailable_skips=1)
        if self.agree is not None:  # every rank takes this path alike: their managers are equal
            valid = self.agree(valid)
        self._count(lookups=1, blocks_queried=len(wanted))
        if not valid or fetched is None:  # ``agree`` is a minimum: no rank loads what this one lacks
            return None
        self._known.add((tag, h) for h in wanted[:valid])
        return Prefetched(root, start, list(wanted[:valid]), fetched.host)

    def fill(self, prefetched: Prefetched | None, first: int, hashes: Sequence[Hashable],
             block_ids: Sequence[int]) -> int:
        """Copy the prefetched blocks that follow ``first`` local hits into ``block_ids``; return how many.

        Called under the manager's lock. Only blocks whose hashes line up with
        the admission's chain are used: if the local cache changed since the
        prefetch, the rest are simply computed.
        """
        if prefetched is None:
            return 0
        offset = first - prefetched.start
        count = min(len(prefetched.hashes) - offset, len(block_ids))
        if offset < 0 or count <= 0 or list(prefetched.hashes[offset:offset + count]) != list(
                hashes[first:first + count]):
            return 0
        if not self._worth_loading(first + count):
            return 0
        host = _subset(prefetched.host, slice(offset, offset + count))
        try:
            self.manager.storage.swap_in(host, list(block_ids[:count]))  # every backend takes NumpyHostBlocks
        except PagedKvError:  # the storage refused the blocks: compute them instead
            self._count(errors=1)
            return 0
        self._count(hit_blocks=count)
        return count

    # -- called by the engine -----------------------------------------------------------------

    def commit(self) -> int:
        """The K/V of every slot handed out so far is written: queue the noted full blocks; return how many.

        One device-to-host copy on the caller's thread (asynchronous where
        the backend's swap is); encoding and network I/O run in the writer.
        """
        manager = self.manager
        if self._closed:
            raise InvalidArgument("this remote connector was closed")
        with manager.lock:
            pending, self._pending = self._pending, []
            cached, tag_for = manager.pool.cached, self.tier.tagger.for_root
            blocks: list[int] = []
            items: list[_Item] = []
            for root, block_hash in pending:
                tag = tag_for(root)
                block = cached.get(block_hash)
                if block is not None and (tag, block_hash) not in self._known:
                    blocks.append(block)
                    items.append((tag, block_hash))
            if not blocks:
                return 0
            if not self._available():
                self._count(unavailable_skips=1, dropped_blocks=len(blocks))
                return 0
            with self._counts_lock:
                if self._queued + len(blocks) > self.max_queued_blocks:
                    self._counts["dropped_blocks"] += len(blocks)
                    return 0
                self._queued += len(blocks)
            try:
                host = manager.storage.swap_out(blocks)
            except BaseException:
                with self._counts_lock:
                    self._queued -= len(blocks)
                    self._counts["dropped_blocks"] += len(blocks)
                raise
            if not self._writer.is_alive():
                self._writer.start()  # started on the first write, so a read-only connector holds no thread
        self._known.add(items)  # a second note of the same block before the write lands is not re-sent
        self._queue.put((items, host))
        return len(blocks)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued block was written or dropped; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._counts_lock:
                if self._queued == 0:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def stats(self) -> RemoteStats:
        with self._counts_lock:
            return RemoteStats(**self._counts, queued_blocks=self._queued)

    def close(self, timeout: float | None = 10.0) -> None:
        """Commit, write what is queued (up to ``timeout``), stop the writer and detach from the manager."""
        if self._closed:
            return
        self.commit()
        self._closed = True
        if self._writer.is_alive():
            self.flush(timeout)
            self._queue.put(None)
            self._writer.join(timeout)
        self.manager.detach_remote(self)
        self.tier.close()

    def __enter__(self) -> RemoteConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _worth_loading(self, num_blocks: int) -> bool:
        """Whether a prefix of ``num_blocks`` blocks reaches the host's ``min_prefix_length``.

        Never while the host's prefix caching is off: remote keys are prefix hashes.
        """
        prefix = self.manager.prefix_config
        return prefix is not None and self.manager.config.block_size * num_blocks >= prefix.min_prefix_length

    def _available(self) -> bool:
        return self.clock() >= self._down_until

    def _failed(self) -> None:
        self._count(errors=1)
        self._down_until = self.clock() + self.retry_interval

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            items, host = job
            written: set[int] = set()
            try:
                host.wait()
                portable = host.to_numpy()
                for start in range(0, len(items), self.put_batch_blocks):
                    if not self._available():
                        self._count(unavailable_skips=1)
                        break
                    for tag, hashes, index in _by_tag(items, start, self.put_batch_blocks):
                        sent = self.tier.put(tag, hashes, _subset(portable, index))
                        self._count(put_blocks=len(hashes), put_bytes=sent)
                        written.update(index)
            except RemoteTierError:
                self._failed()
            except Exception:  # a writer must survive anything; the blocks are simply not shared
                self._count(errors=1)
            finally:
                # what did not reach the server may be noted and sent again later
                self._known.discard(item for i, item in enumerate(items) if i not in written)
                with self._counts_lock:
                    self._queued -= len(items)
                    self._counts["dropped_blocks"] += len(items) - len(written)


def _by_tag(items: list[_Item], start: int, count: int) -> list[tuple[bytes, list[Hashable], list[int]]]:
    """``items[start:start + count]`` grouped by tag: ``(tag, hashes, their indices in items)``."""
    groups: dict[bytes, tuple[list[Hashable], list[int]]] = {}
    for i in range(start, min(start + count, len(items))):
        tag, block_hash = items[i]
        hashes, index = groups.setdefault(tag, ([], []))
        hashes.append(block_hash)
        index.append(i)
    return [(tag, hashes, index) for tag, (hashes, index) in groups.items()]


def _subset(host: NumpyHostBlocks, index: slice | list[int]) -> NumpyHostBlocks:
    """The blocks ``index`` of ``host`` (axis 1 of every array)."""
    return NumpyHostBlocks(host.k[:, index], host.v[:, index], host.dtype,
                           None if host.k_scale is None else host.k_scale[:, index],
                           None if host.v_scale is None else host.v_scale[:, index])
