"""The remote tier: blocks shared by many serving instances, keyed by prefix hash.

Two layers, so the core keeps no network dependency:

- :class:`KeyValueStore` is the transport: a handful of batched operations any
  key-value server offers in one round trip each (Redis and Valkey through
  ``pagedkv_core.remote.redis_store``; :class:`MemoryStore` in-process, for
  tests and single-process use).
- :class:`BlockTier` implements :class:`RemoteTier` over a store: it names
  keys (:mod:`.layout`), encodes and validates values (:mod:`.codec`) and
  turns every transport failure into :class:`~pagedkv_core.errors.RemoteTierError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..blocks.hashing import BlockHasher
from ..contract.storage import NumpyHostBlocks
from ..errors import RemoteTierError
from .codec import decode_run, encode_blocks
from .layout import KEY_PREFIX, LayoutFingerprint, TenantTagger, block_key

__all__ = ["KeyValueStore", "MemoryStore", "RemoteTier", "BlockTier", "FetchResult"]


@runtime_checkable
class KeyValueStore(Protocol):
    """Batched key-value operations; each call is one round trip to the server.

    Implementations raise :class:`RemoteTierError` when the server cannot be
    reached or answers with an error.
    """

    def count_leading(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, exist before the first missing one."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]], ttl_seconds: float | None = None) -> None: ...

    def put_if_absent(self, key: bytes, value: bytes) -> None: ...

    def delete_matching(self, pattern: bytes) -> int:
        """Delete every key matching a glob ``pattern`` (``*`` wildcards); return how many."""

    def close(self) -> None: ...


class MemoryStore:
    """A thread-safe in-process store with TTLs (glob patterns as Redis ``MATCH`` takes them)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: dict[bytes, tuple[bytes, float | None]] = {}
        self._lock = threading.Lock()
        self.clock = clock
        self.round_trips = 0

    def _live(self, key: bytes) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, deadline = item
        if deadline is not None and self.clock() >= deadline:
            del self._data[key]
            return None
        return value

    def count_leading(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            self.round_trips += 1
            return next((i for i, k in enumerate(keys) if self._live(k) is None), len(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            self.round_trips += 1
            return [self._live(k) for k in keys]

    def put_many(self, items: Sequence[tuple[bytes, bytes]], ttl_seconds: float | None = None) -> None:
        with self._lock:
            self.round_trips += 1
            deadline = None if ttl_seconds is None else self.clock() + ttl_seconds
            for key, value in items:
                self._data[bytes(key)] = (bytes(value), deadline)

    def put_if_absent(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self.round_trips += 1
            if self._live(key) is None:
                self._data[key] = (value, None)

    def delete_matching(self, pattern: bytes) -> int:
        import fnmatch

        with self._lock:
            self.round_trips += 1
            doomed = [k for k in self._data if fnmatch.fnmatchcase(k.decode(), pattern.decode())]
            for key in doomed:
                del self._data[key]
            return len(doomed)

    def raw(self) -> dict[bytes, bytes]:
        """A snapshot of every live key and value (tests damage values through :meth:`put_many`)."""
        with self._lock:
            return {k: v for k in list(self._data) if (v := self._live(k)) is not None}

    def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Blocks read from the tier: the valid leading run, whether a bad value stopped it, the bytes read."""

    host: NumpyHostBlocks
    corrupt: int
    nbytes: int

    @property
    def num_blocks(self) -> int:
        return self.host.num_blocks


@runtime_checkable
class RemoteTier(Protocol):
    """What the manager asks of a remote tier; ``tag`` is a tenant tag from :attr:`tagger`."""

    layout: LayoutFingerprint
    tagger: TenantTagger

    def probe(self, tag: bytes, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of the chain ``hashes`` the tier holds (one round trip)."""

    def fetch(self, tag: bytes, hashes: Sequence[Hashable]) -> FetchResult:
        """Read the blocks of ``hashes`` (one round trip); keep the leading run that validates."""

    def put(self, tag: bytes, hashes: Sequence[Hashable], host: NumpyHostBlocks) -> int:
        """Store the blocks of ``host`` under ``hashes`` (one round trip); return the bytes sent."""

    def drop_tenant(self, salt: str | None) -> int:
        """Delete every block of the tenant with ``salt``, in every layout; return how many keys."""

    def close(self) -> None: ...


class BlockTier:
    """:class:`RemoteTier` over any :class:`KeyValueStore`.

    ``ttl_seconds`` bounds how long a written block lives on the server
    (``None``: until the server's own eviction policy removes it).
    """

    def __init__(self, store: KeyValueStore, layout: LayoutFingerprint, *, tenant_secret: bytes = b"",
                 ttl_seconds: float | None = None) -> None:
        self.store, self.layout, self.ttl_seconds = store, layout, ttl_seconds
        self.tagger = TenantTagger(BlockHasher(layout.block_size, layout.hash_algorithm, layout.hash_seed),
                                   tenant_secret)
        self._fingerprint = layout.digest
        self._described = False

    def keys(self, tag: bytes, hashes: Sequence[Hashable]) -> list[bytes]:
        return [block_key(self._fingerprint, tag, h) for h in hashes]

    def probe(self, tag: bytes, hashes: Sequence[Hashable]) -> int:
        if not hashes:
            return 0
        return self.store.count_leading(self.keys(tag, hashes))

    def fetch(self, tag: bytes, hashes: Sequence[Hashable]) -> FetchResult:
        values: list[bytes | None] = self.store.get_many(self.keys(tag, hashes)) if hashes else []
        host, corrupt = decode_run(self.layout, hashes, values)
        # the run's values are all present (it stops at the first missing one)
        return FetchResult(host, corrupt, sum(len(v) for v in values[:host.num_blocks] if v is not None))

    def put(self, tag: bytes, hashes: Sequence[Hashable], host: NumpyHostBlocks) -> int:
        if not self._described:  # operators can read what a fingerprint stands for
            self.store.put_if_absent(b"%s:%s:layout" % (KEY_PREFIX, self._fingerprint.hex().encode()),
                                     self.layout.describe().encode())
            self._described = True
        values = encode_blocks(self.layout, hashes, host)
        self.store.put_many(list(zip(self.keys(tag, hashes), values)), self.ttl_seconds)
        return sum(len(v) for v in values)

    def drop_tenant(self, salt: str | None) -> int:
        tag = self.tagger.for_salt(salt)
        return self.store.delete_matching(b"%s:*:%s:*" % (KEY_PREFIX, tag))

    def close(self) -> None:
        try:
            self.store.close()
        except RemoteTierError:
            pass
