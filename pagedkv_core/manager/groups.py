"""The per-group parts of a hybrid cache: one cache group's sequences over the shared pool, and state slots.

A :class:`KvGroup` is what vLLM calls a single-type manager: its own table
rows, its own prefix-hash namespace (the hash seed is mixed with the group
index, so equal tokens in two groups never match each other's blocks), and
the same admission and growth components a uniform cache uses — all over the
one :class:`~pagedkv_core.blocks.pool.BlockPool` the coordinator owns.

Sliding and chunked groups keep block positions absolute: a block that no
future query can see is released and its table entry points at the pool's
*null block* (a block the coordinator holds for good and never writes).
The null block is reference-counted like any shared block, one reference per
table entry, so releasing, forking and the invariant checks need no special
case, and a kernel that reads it anyway reads zeros under a zero weight.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from ..blocks.pool import BlockPool
from ..config import CacheConfig, PrefixCacheConfig
from ..contract.storage import BlockStorage
from ..errors import InvalidArgument, OutOfBlocks
from ..layers import CacheGroup, LayerGroup
from .admission import Admission
from .growth import Growth
from .host_tier import HostTier
from .prefix import PrefixIndex
from .records import Sequence
from .sequences import SequenceTable

__all__ = ["KvGroup", "StateSlots", "group_prefix_config"]


def group_prefix_config(config: PrefixCacheConfig | None, index: int) -> PrefixCacheConfig | None:
    """The group's own hash namespace: the seed mixed with the group index (groups never share blocks)."""
    if config is None or not config.enabled:
        return None
    return dataclasses.replace(config, hash_seed=config.hash_seed * 1_000_003 + index + 1)


class KvGroup:
    """One cache group: table rows, prefix namespace, admission and growth over the shared pool."""

    def __init__(self, cache_group: CacheGroup, config: CacheConfig, storage: BlockStorage, pool: BlockPool,
                 null_block: int, clock: Callable[[], float]) -> None:
        self.cache_group = cache_group
        self.spec: LayerGroup = cache_group.group
        self.pool = pool
        self.null_block = null_block
        self.block_size = config.block_size
        self.counters: Counter[str] = Counter()  # this group's own: every group admits each request once
        counters = self.counters
        self.sequences = SequenceTable(config.max_blocks_per_seq)
        prefix_config = group_prefix_config(config.prefix_cache, cache_group.index)
        self.prefix = PrefixIndex(pool, config.block_size, prefix_config)
        no_host = dataclasses.replace(config.storage_config(), num_host_blocks=0)
        host_tier = HostTier(no_host, storage, pool, self.sequences, counters, clock)
        self.admission = Admission(pool, self.sequences, self.prefix, host_tier, counters, clock)
        self.growth = Growth(pool, self.sequences, self.prefix, storage, counters, clock)

    @property
    def drops_blocks(self) -> bool:
        return self.cache_group.drops_blocks

    def reach(self, num_tokens: int) -> int:
        """The first block a query at position ``num_tokens`` (or later) can read."""
        return self.spec.first_needed_token(num_tokens) // self.block_size

    # -- the window's edge --------------------------------------------------------------

    def planned_drops(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Sequences with blocks that fell out of reach, and up to which index (the last block always stays).

        Written out (no :meth:`reach` call) because it runs for every sequence of every group each step.
        """
        if not self.drops_blocks:
            return []
        bs, window, chunk = self.block_size, self.spec.window, self.spec.chunk_size or 1
        out = []
        for seq in seqs:
            n = seq.num_tokens
            upto = (n - window + 1 if window is not None else n // chunk * chunk) // bs
            last = len(seq.blocks) - 1
            if upto > last:
                upto = last
            if upto > seq.live_from:
                out.append((seq, upto))
        return out

    def drop(self, seq: Sequence, upto: int) -> None:
        """Release the blocks ``[live_from, upto)`` of ``seq``; their entries point at the null block."""
        released = []
        for index in range(seq.live_from, upto):
            released.append(seq.blocks[index])
            self.pool.incref(self.null_block)
            self.sequences.replace_block(seq, index, self.null_block)
        seq.live_from = upto
        self.pool.free(released)

    def check_rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Refuse to roll ``seq`` back to a length whose window reaches blocks already released."""
        total = seq.num_tokens - num_tokens
        if self.drops_blocks and 0 <= total and seq.live_from > self.reach(total):
            raise InvalidArgument(
                f"cannot roll {seq.request_id!r} back {num_tokens} tokens: group {self.cache_group.index} "
                f"({self.spec.kind}) already released the blocks a query at {total} would read")


def freed_by(drops: list[tuple[KvGroup, list[tuple[Sequence, int]]]], ref: list[int]) -> int:
    """Blocks that planned drops return to the free queue (a block shared by forks frees with its last owner)."""
    released: Counter[int] = Counter()
    for _, planned in drops:
        for seq, upto in planned:
            released.update(seq.blocks[seq.live_from:upto])
    return sum(1 for block, count in released.items() if ref[block] == count)


class StateSlots:
    """Fixed-size per-sequence state slots of one state group: an index the engine uses into its own arrays."""

    def __init__(self, group: LayerGroup) -> None:
        self.group = group
        self.capacity = group.state_slots
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out the lowest index first
        self.owner: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check_free(self, count: int) -> None:
        if count > len(self._free):
            raise OutOfBlocks(count, len(self._free), "state slots")

    def take(self, request_id: str) -> int:
        slot = self._free.pop()
        self.owner[request_id] = slot
        return slot

    def release(self, request_id: str) -> None:
        self._free.append(self.owner.pop(request_id))
