"""Whole-pool work of the manager: defragmentation, fragmentation figures, invariant checks.

These scan the pool (O(num_blocks)) and so never run on a decode step; the
manager calls them under its lock. Blocks handed out through the manager's
plain ``allocator`` (owned by no sequence) are tracked by
:class:`ExternalBlocks`, so the checks can count their owners too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..blocks.pool import BlockPool
from ..contract.storage import BlockStorage
from ..errors import InvalidBlock, InvariantViolation
from ..interfaces import BlockAllocator
from ..stats import DefragmentResult, FragmentationStats
from .host_tier import HostTier
from .records import SeqState
from .sequences import SequenceTable

if TYPE_CHECKING:
    from .facade import PagedKvCacheManager

__all__ = ["ExternalBlocks", "defragment", "fragmentation_stats", "check_invariants", "ManagerBlockAllocator"]


class ExternalBlocks:
    """Blocks taken from the pool by the raw allocator, with how many references each holds."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.held: Counter[int] = Counter()

    def allocate(self, count: int) -> list[int]:
        blocks = self.pool.allocate(count)
        self.held.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Give back blocks this allocator handed out; ``InvalidBlock`` (nothing freed) for any other."""
        wanted = Counter(blocks)
        for block, n in wanted.items():
            self.pool.check_id(block)
            if self.held.get(block, 0) < n:
                raise InvalidBlock(block, self.pool.num_blocks, "not allocated through this allocator")
        self.held.subtract(wanted)
        self.held += Counter()  # drop zero counts
        self.pool.free(blocks)


def _occupied(pool: BlockPool) -> np.ndarray:
    """Blocks holding data worth keeping: in use, or free but findable in the prefix cache."""
    ref = np.asarray(pool.ref)
    cached = np.fromiter((h is not None for h in pool.block_hash), bool, pool.num_blocks)
    occupied: np.ndarray = (ref > 0) | cached
    return occupied


def _holes(mask: np.ndarray) -> int:
    used = np.flatnonzero(mask)
    return 0 if used.size == 0 else int(used[-1] + 1 - used.size)


def defragment(pool: BlockPool, sequences: SequenceTable, storage: BlockStorage,
               external: ExternalBlocks) -> DefragmentResult:
    """Move occupied blocks with high ids into free low ids, in one storage copy.

    Blocks taken through the manager's ``allocator`` stay where they are
    (their owners hold the ids). Otherwise the occupied blocks end up exactly
    ``0 .. k-1``, and the free queue hands out uncached blocks in ascending
    order, then cached free blocks in their previous (least recently freed
    first) order.
    """
    occupied = _occupied(pool)
    holes_before = _holes(occupied)
    k = int(occupied.sum())
    pinned = set(external.held)  # their owners hold the ids
    movers = [int(b) for b in np.flatnonzero(occupied[k:]) + k if int(b) not in pinned]
    targets = [int(b) for b in np.flatnonzero(~occupied[:k])][:len(movers)]
    if movers:
        storage.copy_blocks(movers, targets)
        mapping = dict(zip(movers, targets))
        pool.relabel(mapping)
        for seq in sequences:
            if seq.blocks:
                sequences.set_blocks(seq, [mapping.get(b, b) for b in seq.blocks])
    uncached_free = [b for b in range(pool.num_blocks) if pool.ref[b] == 0 and pool.block_hash[b] is None]
    pool.rebuild_free_queue(uncached_free + list(pool.free_cached))
    return DefragmentResult(len(movers), holes_before, _holes(_occupied(pool)))


def fragmentation_stats(pool: BlockPool, sequences: SequenceTable) -> FragmentationStats:
    bs = pool.block_size
    used = np.asarray(pool.ref) > 0
    empty = ~_occupied(pool)  # free and not holding a cached prefix: what compaction can fill
    free_count = int(empty.sum())
    padded = np.concatenate([[False], empty, [False]]).astype(np.int8)  # lengths of runs of free blocks
    edges = np.flatnonzero(np.diff(padded))
    runs = edges[1::2] - edges[::2]
    largest = int(runs.max()) if runs.size else 0
    fill = np.zeros(pool.num_blocks, np.int64)
    wasted = 0
    for seq in sequences:
        if not seq.blocks:
            continue
        counts = np.minimum(bs, seq.num_tokens - bs * np.arange(len(seq.blocks)))
        np.maximum.at(fill, np.asarray(seq.blocks), counts)
        wasted += len(seq.blocks) * bs - seq.num_tokens
    used_count = int(used.sum())
    return FragmentationStats(
        used_blocks=used_count,
        free_blocks=pool.num_free,
        holes=_holes(~empty),
        largest_free_run=largest,
        fragmentation_ratio=1.0 - largest / free_count if free_count else 0.0,
        wasted_token_slots=int(wasted),
        avg_tokens_per_block=float(fill[used].mean()) if used_count else 0.0,
    )


def check_invariants(pool: BlockPool, sequences: SequenceTable, host_tier: HostTier, external: ExternalBlocks,
                     *, raise_on_error: bool = True) -> list[str]:
    """Every leaked, double-owned or miscounted block, row or host block (empty when all is well)."""
    owners: Counter[int] = Counter(external.held)
    problems, host = _sequence_problems(pool.block_size, sequences, owners)
    for block in range(pool.num_blocks):
        if pool.ref[block] != owners.get(block, 0):
            problems.append(f"block {block}: ref count {pool.ref[block]} but {owners.get(block, 0)} owners")
    problems += pool.check_invariants()
    if host != host_tier.used or host > host_tier.capacity:
        problems.append(f"host tier: {host} blocks held, {host_tier.used} counted, capacity {host_tier.capacity}")
    if problems and raise_on_error:
        raise InvariantViolation(problems)
    return problems


def _sequence_problems(bs: int, sequences: SequenceTable, owners: Counter[int]) -> tuple[list[str], int]:
    """Problems of each record against its row; counts the owners of device blocks and the host blocks held."""
    tables = sequences.tables
    problems: list[str] = []
    rows: set[int] = set()
    host = 0
    for seq in sequences:
        rid = seq.request_id
        if seq.row in rows:
            problems.append(f"{rid}: table row {seq.row} shared with another sequence")
        rows.add(seq.row)
        if int(tables.lens[seq.row]) != seq.num_tokens:
            problems.append(f"{rid}: table length {int(tables.lens[seq.row])} != {seq.num_tokens} tokens")
        if seq.state is SeqState.RUNNING:
            owners.update(seq.blocks)
            if len(seq.blocks) != -(-seq.num_tokens // bs):
                problems.append(f"{rid}: {len(seq.blocks)} blocks for {seq.num_tokens} tokens")
            row = tables.tables[seq.row]
            if list(row[:len(seq.blocks)]) != seq.blocks or (row[len(seq.blocks):] != -1).any():
                problems.append(f"{rid}: block table row does not match its blocks")
            if int(tables.used[seq.row]) != len(seq.blocks):
                problems.append(f"{rid}: table row records {int(tables.used[seq.row])} entries, "
                                f"the sequence holds {len(seq.blocks)} blocks")
        else:
            host += seq.host_blocks
            if seq.blocks:
                problems.append(f"{rid}: swapped out but still holds device blocks")
    return problems, host


class ManagerBlockAllocator(BlockAllocator):
    """Raw block allocation from a manager's pool, for blocks that belong to no sequence."""

    def __init__(self, manager: PagedKvCacheManager) -> None:
        self.manager = manager

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        return self.manager.allocate_external(num_blocks)

    def free_blocks(self, blocks: Sequence[int]) -> None:
        self.manager.free_external(blocks)

    def free_block_count(self) -> int:
        return self.manager.pool.num_free

    def total_block_count(self) -> int:
        return self.manager.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.manager.config.block_size

    def defragment(self) -> DefragmentResult:
        return self.manager.defragment()
