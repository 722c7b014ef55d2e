"""Whole-pool work of the manager: defragmentation, fragmentation figures, invariant checks.

These scan the pool (O(num_blocks)) and so never run on a decode step; the
manager calls them under its lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidBlock, InvariantViolation
from ..interfaces import BlockAllocator
from ..stats import DefragmentResult, FragmentationStats

if TYPE_CHECKING:
    from .facade import PagedKvCacheManager

__all__ = ["defragment", "fragmentation_stats", "check_invariants", "ManagerBlockAllocator"]


def _occupied(m: PagedKvCacheManager) -> np.ndarray:
    """Blocks holding data worth keeping: in use, or free but findable in the prefix cache."""
    pool = m.pool
    ref = np.asarray(pool.ref)
    cached = np.fromiter((h is not None for h in pool.block_hash), bool, pool.num_blocks)
    return (ref > 0) | cached


def _holes(mask: np.ndarray) -> int:
    used = np.flatnonzero(mask)
    return 0 if used.size == 0 else int(used[-1] + 1 - used.size)


def defragment(m: PagedKvCacheManager) -> DefragmentResult:
    """Move occupied blocks with high ids into free low ids, in one storage copy.

    Blocks taken through the manager's ``allocator`` stay where they are
    (their owners hold the ids). Otherwise the occupied blocks end up exactly
    ``0 .. k-1``, and the free queue
    hands out uncached blocks in ascending order, then cached free blocks in
    their previous (least recently freed first) order.
    """
    pool = m.pool
    occupied = _occupied(m)
    holes_before = _holes(occupied)
    k = int(occupied.sum())
    pinned = set(m._external)  # blocks handed out through ``allocator``: their owners hold the ids
    movers = [int(b) for b in np.flatnonzero(occupied[k:]) + k if int(b) not in pinned]
    targets = [int(b) for b in np.flatnonzero(~occupied[:k])][:len(movers)]
    if movers:
        m.storage.copy_blocks(movers, targets)
        mapping = dict(zip(movers, targets))
        for src, dst in mapping.items():
            pool.ref[dst], pool.ref[src] = pool.ref[src], 0
            block_hash = pool.block_hash[src]
            pool.block_hash[dst], pool.block_hash[src] = block_hash, None
            if block_hash is not None:
                pool.cached[block_hash] = dst
        pool.free_cached = {mapping.get(b, b): t for b, t in pool.free_cached.items()}
        for seq in m._seqs.values():
            if seq.blocks:
                seq.blocks = [mapping.get(b, b) for b in seq.blocks]
                m.tables.set_row(seq.row, seq.blocks, seq.num_tokens)
    uncached_free = [b for b in range(pool.num_blocks) if pool.ref[b] == 0 and pool.block_hash[b] is None]
    pool.rebuild_free_queue(uncached_free + list(pool.free_cached))
    m.counters["defragmentations"] += 1
    return DefragmentResult(len(movers), holes_before, _holes(_occupied(m)))


def fragmentation_stats(m: PagedKvCacheManager) -> FragmentationStats:
    pool, bs = m.pool, m.config.block_size
    used = np.asarray(pool.ref) > 0
    empty = ~_occupied(m)  # free and not holding a cached prefix: what compaction can fill
    free_count = int(empty.sum())
    # lengths of runs of free blocks
    padded = np.concatenate([[False], empty, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs = edges[1::2] - edges[::2]
    largest = int(runs.max()) if runs.size else 0
    fill = np.zeros(pool.num_blocks, np.int64)
    wasted = 0
    for seq in m._seqs.values():
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


def check_invariants(m: PagedKvCacheManager, *, raise_on_error: bool = True) -> list[str]:
    pool, bs, problems = m.pool, m.config.block_size, []
    owners: Counter[int] = Counter(m._external)
    rows = set()
    host = 0
    for rid, seq in m._seqs.items():
        if seq.row in rows:
            problems.append(f"{rid}: table row {seq.row} shared with another sequence")
        rows.add(seq.row)
        if int(m.tables.lens[seq.row]) != seq.num_tokens:
            problems.append(f"{rid}: table length {int(m.tables.lens[seq.row])} != {seq.num_tokens} tokens")
        if seq.state.value == "running":
            owners.update(seq.blocks)
            if len(seq.blocks) != -(-seq.num_tokens // bs):
                problems.append(f"{rid}: {len(seq.blocks)} blocks for {seq.num_tokens} tokens")
            row = m.tables.tables[seq.row]
            if list(row[:len(seq.blocks)]) != seq.blocks or (row[len(seq.blocks):] != -1).any():
                problems.append(f"{rid}: block table row does not match its blocks")
            if int(m.tables.used[seq.row]) != len(seq.blocks):
                problems.append(f"{rid}: table row records {int(m.tables.used[seq.row])} entries, "
                                f"the sequence holds {len(seq.blocks)} blocks")
        else:
            host += seq.host_blocks
            if seq.blocks:
                problems.append(f"{rid}: swapped out but still holds device blocks")
    for block in range(pool.num_blocks):
        if pool.ref[block] != owners.get(block, 0):
            problems.append(f"block {block}: ref count {pool.ref[block]} but {owners.get(block, 0)} owners")
    queue, seen, block = [], set(), pool._next[pool.num_blocks]
    while block != pool.num_blocks and len(queue) <= pool.num_blocks:
        if block in seen or not 0 <= block < pool.num_blocks:
            problems.append(f"free queue is corrupt at block {block}")
            break
        seen.add(block)
        queue.append(block)
        block = pool._next[block]
    expected_free = {b for b in range(pool.num_blocks) if pool.ref[b] == 0}
    if seen != expected_free:
        leaked = sorted(expected_free - seen)[:5]
        double = sorted(seen - expected_free)[:5]
        problems.append(f"free queue mismatch: leaked {leaked}, in use but queued {double}")
    if len(queue) != pool.num_free:
        problems.append(f"free count {pool.num_free} but {len(queue)} blocks queued")
    for block_hash, block in pool.cached.items():
        if pool.block_hash[block] != block_hash:
            problems.append(f"hash index points to block {block} which holds another hash")
    hashed = sum(h is not None for h in pool.block_hash)
    if hashed != len(pool.cached):
        problems.append(f"{hashed} hashed blocks but {len(pool.cached)} index entries")
    free_cached = {b for b in expected_free if pool.block_hash[b] is not None}
    if set(pool.free_cached) != free_cached:
        problems.append("free cached-block list does not match the free hashed blocks")
    if host != m.host_used or host > m.host_capacity:
        problems.append(f"host tier: {host} blocks held, {m.host_used} counted, capacity {m.host_capacity}")
    if problems and raise_on_error:
        raise InvariantViolation(problems)
    return problems


class ManagerBlockAllocator(BlockAllocator):
    """Raw block allocation from a manager's pool, for blocks that belong to no sequence."""

    def __init__(self, manager: PagedKvCacheManager) -> None:
        self._m = manager

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        with self._m._mutating():
            blocks = self._m.pool.allocate(num_blocks)
            self._m._external.update(blocks)
            return blocks

    def free_blocks(self, blocks: Sequence[int]) -> None:
        with self._m._mutating():
            wanted = Counter(blocks)
            for block, n in wanted.items():
                self._m.pool.check_id(block)
                if self._m._external.get(block, 0) < n:
                    raise InvalidBlock(block, self._m.pool.num_blocks, "not allocated through this allocator")
            self._m._external.subtract(wanted)
            self._m._external += Counter()  # drop zero counts
            self._m.pool.free(blocks)

    def free_block_count(self) -> int:
        return self._m.pool.num_free

    def total_block_count(self) -> int:
        return self._m.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self._m.config.block_size

    def defragment(self) -> DefragmentResult:
        return self._m.defragment()
