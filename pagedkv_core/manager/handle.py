"""The handle users hold: a cheap view of one admission, reading the manager's live state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..blocks.tables import BlockTable
from ..errors import StaleHandle
from ..interfaces import KvCacheHandle
from ..stats import CacheHandleStats
from .records import SeqState, Sequence

if TYPE_CHECKING:
    from .facade import PagedKvCacheManager

__all__ = ["PagedKvCacheHandle"]


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

    def __init__(self, manager: PagedKvCacheManager, record: Sequence) -> None:
        self._manager = manager
        self.request_id = record.request_id
        self._record = record

    def _seq(self) -> Sequence:
        if not self.is_valid():
            raise StaleHandle(self.request_id)
        return self._record

    @property
    def block_table(self) -> BlockTable:
        with self._manager.lock:
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
        with self._manager.lock:
            self._seq()
            return self._manager.handle_stats(self.request_id)

    def is_valid(self) -> bool:
        """True while the admission this handle was made for is still in the manager."""
        return self._manager.get_record(self.request_id) is self._record

    def clone_handle(self, new_request_id: str | None = None) -> PagedKvCacheHandle:
        with self._manager.lock:
            self._seq()  # a stale handle must not fork the sequence that took over its id
            return self._manager.fork(self.request_id, new_request_id)

    def __repr__(self) -> str:
        return f"PagedKvCacheHandle({self.request_id!r}, valid={self.is_valid()})"
