"""Eviction policies: which sequences (or which of their blocks) to give up under memory need.

A policy only *chooses*; the manager acts (swap out, drop, or trim blocks).
Policies see :class:`SequenceInfo` snapshots, so they hold no references
into the manager and need no lock. Whole-sequence policies return
candidates with ``blocks=None``; token-window policies (StreamingLLM,
sliding window) return the logical block indices to cut out of a sequence.

``required_blocks`` counts blocks that would really return to the pool: a
block shared with another sequence is not freed by evicting one owner, so
candidates are accumulated by their ``freeable_blocks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgument

__all__ = [
    "SequenceInfo",
    "EvictionCandidate",
    "EvictionPolicy",
    "WindowPolicy",
    "LruPolicy",
    "LfuPolicy",
    "LongestFirstPolicy",
    "PriorityPolicy",
    "StreamingLLMPolicy",
    "SlidingWindowPolicy",
    "make_policy",
]

SortKey = tuple[float, ...]  # what whole-sequence policies order by (ints are floats to the type checker)


@dataclass(frozen=True, slots=True)
class SequenceInfo:
    request_id: str
    num_tokens: int
    num_blocks: int
    freeable_blocks: int  # blocks this sequence alone holds
    priority: int  # lower value = more important (vLLM's convention)
    last_access: float
    access_count: int
    arrival: int  # admission order


@dataclass(frozen=True, slots=True)
class EvictionCandidate:
    request_id: str
    blocks: tuple[int, ...] | None = None  # logical block indices to cut; None = the whole sequence
    freeable_blocks: int = 0


@runtime_checkable
class EvictionPolicy(Protocol):
    name: str

    def select_eviction_candidates(self, required_blocks: int | None,
                                   sequences: Sequence[SequenceInfo]) -> list[EvictionCandidate]:
        """Candidates, in order, until ``required_blocks`` would be freed (``None``: every candidate)."""

    def record_access(self, request_id: str, access_time: float) -> None:
        """Told on every access; the built-in policies read access data from ``SequenceInfo`` instead."""


class _WholeSequencePolicy:
    """Evicts whole sequences in the order of ``sort_key``."""

    name = "whole-sequence"

    def sort_key(self, seq: SequenceInfo) -> SortKey:
        return (seq.last_access, seq.arrival)

    def select_eviction_candidates(self, required_blocks: int | None,
                                   sequences: Sequence[SequenceInfo]) -> list[EvictionCandidate]:
        out: list[EvictionCandidate] = []
        freed = 0
        for seq in sorted(sequences, key=self.sort_key):
            if required_blocks is not None and freed >= required_blocks:
                break
            out.append(EvictionCandidate(seq.request_id, None, seq.freeable_blocks))
            freed += seq.freeable_blocks
        return out

    def record_access(self, request_id: str, access_time: float) -> None:
        return None


class LruPolicy(_WholeSequencePolicy):
    """Least recently accessed first."""

    name = "lru"


class LfuPolicy(_WholeSequencePolicy):
    """Fewest accesses first; ties broken by least recent access."""

    name = "lfu"

    def sort_key(self, seq: SequenceInfo) -> SortKey:
        return (seq.access_count, seq.last_access, seq.arrival)


class LongestFirstPolicy(_WholeSequencePolicy):
    """Most tokens first: one eviction frees the most memory."""

    name = "longest-first"

    def sort_key(self, seq: SequenceInfo) -> SortKey:
        return (-seq.num_tokens, seq.arrival)


class PriorityPolicy(_WholeSequencePolicy):
    """Least important (highest ``priority`` value) first, then the newest (preempt late arrivals, as vLLM)."""

    name = "priority"

    def sort_key(self, seq: SequenceInfo) -> SortKey:
        return (-seq.priority, -seq.arrival)


@runtime_checkable
class WindowPolicy(Protocol):
    """A policy that cuts blocks out of a sequence (StreamingLLM, sliding window) instead of evicting it."""

    def cut(self, num_tokens: int) -> range:
        """Logical blocks to remove from a sequence of ``num_tokens`` tokens."""


class _WindowPolicy:
    name = "window"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def cut(self, num_tokens: int) -> range:
        """Logical blocks to remove from a sequence of ``num_tokens`` tokens."""
        return range(0)

    def select_eviction_candidates(self, required_blocks: int | None,
                                   sequences: Sequence[SequenceInfo]) -> list[EvictionCandidate]:
        ranked = sorted(sequences, key=lambda s: (-len(self.cut(s.num_tokens)), s.arrival))
        out: list[EvictionCandidate] = []
        freed = 0
        for seq in ranked:
            blocks = self.cut(seq.num_tokens)
            if not blocks or (required_blocks is not None and freed >= required_blocks):
                break
            out.append(EvictionCandidate(seq.request_id, tuple(blocks), len(blocks)))
            freed += len(blocks)
        return out

    def record_access(self, request_id: str, access_time: float) -> None:
        return None


class StreamingLLMPolicy(_WindowPolicy):
    """Keep ``sink_tokens`` attention sinks and the ``window_tokens`` most recent tokens; cut the middle.

    Works in whole blocks: the sinks are kept with the blocks that hold them,
    and at least ``window_tokens`` recent tokens always stay.
    """

    name = "streaming-llm"

    def __init__(self, block_size: int, sink_tokens: int = 4, window_tokens: int = 1024) -> None:
        if sink_tokens < 0 or window_tokens < 1:
            raise InvalidArgument("StreamingLLM needs sink_tokens >= 0 and window_tokens >= 1")
        super().__init__(block_size)
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens

    def cut(self, num_tokens: int) -> range:
        head = -(-self.sink_tokens // self.block_size)
        first_recent = max(0, num_tokens - self.window_tokens) // self.block_size
        return range(head, first_recent) if first_recent > head else range(0)


class SlidingWindowPolicy(_WindowPolicy):
    """Free blocks that no query can see any more under a sliding window of ``window_tokens``."""

    name = "sliding-window"

    def __init__(self, block_size: int, window_tokens: int) -> None:
        if window_tokens < 1:
            raise InvalidArgument("window_tokens must be >= 1")
        super().__init__(block_size)
        self.window_tokens = window_tokens

    def cut(self, num_tokens: int) -> range:
        # the newest cached token (position num_tokens - 1) still sees p > num_tokens - 1 - window
        first_visible = max(0, num_tokens - self.window_tokens)
        return range(0, first_visible // self.block_size)


_WHOLE = {p.name: p for p in (LruPolicy, LfuPolicy, LongestFirstPolicy, PriorityPolicy)}


def make_policy(name: str, block_size: int = 16, **options: int) -> EvictionPolicy:
    """Build a policy by name: lru, lfu, longest-first, priority, streaming-llm, sliding-window."""
    if name in _WHOLE:
        return _WHOLE[name]()
    if name == "streaming-llm":
        return StreamingLLMPolicy(block_size, **options)
    if name == "sliding-window":
        return SlidingWindowPolicy(block_size, **options)
    known: Iterable[str] = [*_WHOLE, "streaming-llm", "sliding-window"]
    raise InvalidArgument(f"unknown eviction policy {name!r}; known: {', '.join(known)}")
