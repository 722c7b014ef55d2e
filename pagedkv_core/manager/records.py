"""A sequence's record inside the manager: what the components read and change, under the manager's lock."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SeqState", "Sequence"]


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
    live_from: int = 0  # blocks before this index fell out of a sliding/chunked group's reach (the null block)

    @property
    def cacheable(self) -> bool:
        return self.root is not None and self.token_ids is not None
