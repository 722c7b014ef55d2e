"""A sequence's record inside the manager, and the handle users hold."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..blocks.tables import BlockTable
from ..errors import StaleHandle
from ..interfaces import KvCacheHandle
from ..stats import CacheHandleStats

if TYPE_CHECKING:
    from .facade import PagedKvCacheManager

__all__ = ["SeqState", "Sequence", "PagedKvCacheHandle"]


class SeqState(enum.Enum):
    RUNNING = "running"  # blocks on the device
    SWAPPED = "swapped"  # blocks on the host tier


@dataclass(slots=True, eq=False)
class Sequence:
    """Mutable bookkeeping of one request; only the manager touches it (under its lock)."""

    request_id: str
    row: int
    blocks: list[int]
    num_tokens: int
    priority: int
    arrival: int
    last_access: float
    root: Hashable | None  # hash-chain root (None: this sequence is not prefix-cacheable)
    token_ids: list[int] | None = None
    hashes: list[Hashable] = field(default_factory=list)  # hash of each full block, in order
    state: SeqState = SeqState.RUNNING
    access_count: int = 1
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    dropped_tokens: int = 0  # tokens cut out by StreamingLLM / sliding-window eviction
    host: Any = None  # HostBlocks while swapped
    host_blocks: int = 0
    host_lossy: bool = False  # swapped out compressed: contents no longer match their hashes

    @property
    def cacheable(self) -> bool:
        return self.root is not None and self.token_ids is not None


class PagedKvCacheHandle(KvCacheHandle):
    """A cheap view of one sequence; every property reads the manager's live state.

    A handle belongs to one admission, not to a request id: after
    ``deallocate("a")`` and a new ``allocate("a")`` the old handle is stale
    (``is_valid()`` is False and its properties raise :class:`StaleHandle`),
    so it can never show another sequence's blocks. The record it was made
    for is its generation: swaps and defragmentation keep the record, a new
    admission makes a new one.
    """

    __slots__ = ("_manager", "request_id", "_record")

    def __init__(self, manager: PagedKvCacheManager, request_id: str) -> None:
        self._manager = manager
        self.request_id = request_id
        self._record = manager._sequence(request_id)

    def _seq(self) -> Sequence:
        if not self.is_valid():
            raise StaleHandle(self.request_id)
        return self._record

    @property
    def block_table(self) -> BlockTable:
        with self._manager._lock:
            seq = self._seq()
            return BlockTable(tuple(seq.blocks), seq.num_tokens, self._manager.config.block_size)

    @property
    def device(self) -> str:
        return self._manager.device

    @property
    def num_tokens(self) -> int:
        return self._seq().num_tokens

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens whose K/V came from the prefix cache: the engine need not compute them."""
        return self._seq().cached_tokens

    @property
    def position_offset(self) -> int:
        """Tokens cut out by window eviction; the next token's position is ``num_tokens + position_offset``."""
        return self._seq().dropped_tokens

    @property
    def state(self) -> SeqState:
        return self._seq().state

    @property
    def num_layers(self) -> int:
        return self._manager.config.num_layers

    @property
    def num_heads(self) -> int:
        return self._manager.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._manager.config.head_dim

    @property
    def cache_id(self) -> str:
        return f"{self._manager.device}/{self.request_id}"

    def stats(self) -> CacheHandleStats:
        with self._manager._lock:
            self._seq()
            return self._manager.handle_stats(self.request_id)

    def is_valid(self) -> bool:
        """True while the admission this handle was made for is still in the manager."""
        return self._manager.get_record(self.request_id) is self._record

    def clone_handle(self, new_request_id: str | None = None) -> PagedKvCacheHandle:
        with self._manager._lock:
            self._seq()  # a stale handle must not fork the sequence that took over its id
            return self._manager.fork(self.request_id, new_request_id)

    def __repr__(self) -> str:
        return f"PagedKvCacheHandle({self.request_id!r}, valid={self.is_valid()})"
