"""Prefix-cache events for external routers, in the spirit of vLLM's KV events.

A router that spreads requests over several engines wants to know which
prefixes each engine can serve without recomputing. Every change to the set
of findable block hashes is reported, in order, as one of these events;
replaying them reconstructs that set exactly. Block ids are not reported:
they are the engine's business (defragmentation moves them without changing
what is cached).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

__all__ = ["BlockStored", "BlockRemoved", "AllCleared", "CacheEvent", "CacheEventCallback", "replay"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A full block became findable under ``block_hash``; ``parent_hash`` is its predecessor's (None: first block)."""

    block_hash: Hashable
    parent_hash: Hashable | None
    token_count: int
    tier: str = "device"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """The block under ``block_hash`` is no longer findable (its space was reused, or it expired)."""

    block_hash: Hashable
    tier: str = "device"


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Every hash of the tier was forgotten at once."""

    tier: str = "device"


CacheEvent = BlockStored | BlockRemoved | AllCleared
CacheEventCallback = Callable[[CacheEvent], None]


def replay(events: Iterable[CacheEvent], cached: Iterable[Hashable] | None = None) -> set[Hashable]:
    """The set of findable hashes after ``events`` (starting from ``cached``)."""
    out: set[Hashable] = set() if cached is None else set(cached)
    for event in events:
        if isinstance(event, BlockStored):
            out.add(event.block_hash)
        elif isinstance(event, BlockRemoved):
            out.discard(event.block_hash)
        else:
            out.clear()
    return out
