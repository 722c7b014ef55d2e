"""Admission and retirement: sequences enter with their prefix hits, leave by releasing their blocks.

Forks and prefix sharing live here too: both admit a sequence whose blocks
another already holds (by reference count, copy-on-write later).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from ..blocks.pool import BlockPool
from ..config import AllocationRequest
from ..errors import InvalidArgument, OutOfBlocks, OutOfBounds, SequenceExists
from .host_tier import HostTier
from .prefix import AdmissionPlan, PrefixIndex
from .records import SeqState, Sequence
from .sequences import SequenceTable

if TYPE_CHECKING:
    from ..remote.connector import Prefetched

__all__ = ["Admission"]

RUNNING = SeqState.RUNNING


class Admission:
    """Admits requests (all or nothing), forks and shares sequences, and releases them."""

    def __init__(self, pool: BlockPool, sequences: SequenceTable, prefix: PrefixIndex, host_tier: HostTier,
                 counters: Counter[str], clock: Callable[[], float]) -> None:
        self.pool = pool
        self.sequences = sequences
        self.prefix = prefix
        self.host_tier = host_tier
        self.counters = counters
        self.clock = clock
        self._forks = itertools.count(1)

    def can_allocate(self, request: AllocationRequest) -> bool:
        if request.request_id in self.sequences:
            return False
        try:
            plan = self.prefix.plan(request, self.sequences.max_width)
        except OutOfBounds:
            return False
        return plan.free_blocks_needed(self.pool) <= self.pool.num_free

    def allocate(self, request: AllocationRequest, prefetched: Prefetched | None = None) -> Sequence:
        """Admit a sequence: reuse its longest cached prefix and reserve slots for the rest of its prompt."""
        if request.request_id in self.sequences:
            raise SequenceExists(request.request_id)
        plan = self.prefix.plan(request, self.sequences.max_width)
        needed = plan.free_blocks_needed(self.pool)
        if needed > self.pool.num_free:
            self.counters["allocation_failures"] += 1
            raise OutOfBlocks(needed, self.pool.num_free)
        return self._admit(request, plan, prefetched)

    def allocate_batch(self, requests: Seq[AllocationRequest],
                       prefetched: Seq[Prefetched | None]) -> list[Sequence]:
        """Admit several requests at once, all or nothing (a scheduler step's admissions).

        Hits are looked up against the cache as it was before the batch, and
        every hit is pinned before any new block is taken, so one admission
        can never evict another's hit.
        """
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("a request id appears twice in one batch")
        for rid in ids:
            if rid in self.sequences:
                raise SequenceExists(rid)
        plans = [self.prefix.plan(r, self.sequences.max_width) for r in requests]
        pinned = {b for plan in plans for b in plan.hits if self.pool.ref[b] == 0}
        needed = len(pinned) + sum(plan.new_blocks for plan in plans)
        if needed > self.pool.num_free:
            self.counters["allocation_failures"] += len(requests)
            raise OutOfBlocks(needed, self.pool.num_free)
        for plan in plans:
            for block in plan.hits:
                self.pool.incref(block)
        return [self._admit(r, plan, fetched, pinned=True) for r, plan, fetched in zip(requests, plans, prefetched)]

    def admit_plan(self, request: AllocationRequest, plan: AdmissionPlan) -> Sequence:
        """Commit a plan a coordinator made (hybrid groups), whose free blocks it checked across groups.

        ``plan.hits`` may begin with the pool's null block, standing for
        blocks a sliding or chunked group never reads again.
        """
        if request.request_id in self.sequences:
            raise SequenceExists(request.request_id)
        return self._admit(request, plan)

    def _admit(self, request: AllocationRequest, plan: AdmissionPlan, prefetched: Prefetched | None = None, *,
               pinned: bool = False) -> Sequence:
        """Commit an admission whose blocks were checked to be available (hits already pinned if ``pinned``)."""
        self.prefix.complete_chain(request, plan)
        hits, hashes, root = plan.hits, plan.hashes, plan.root
        if not pinned:
            for block in hits:
                self.pool.incref(block)
        blocks = hits + self.pool.allocate(plan.new_blocks)
        bs = self.prefix.block_size
        n = request.initial_tokens or 0
        loaded = 0
        remote = self.prefix.remote
        if remote is not None and root is not None:
            end = (n - 1) // bs  # the last token is always computed
            loaded = remote.fill(prefetched, len(hits), hashes, blocks[len(hits):end])
            remote.note(root, hashes[len(hits) + loaded:])
        self.pool.register_chain(blocks, hashes, start=len(hits))
        seq = self.sequences.add(
            request.request_id, blocks, n, priority=request.priority, now=self.clock(), root=root,
            token_ids=list(request.token_ids) if root is not None and request.token_ids is not None else None,
            hashes=hashes, cached_tokens=(len(hits) + loaded) * bs)
        self.counters["allocation_count"] += 1
        if root is not None:
            self.counters["prefix_queries"] += n
            self.counters["prefix_hits"] += len(hits) * bs
        return seq

    def admit_record(self, record: Sequence, blocks: list[int]) -> Sequence:
        """Admit a sequence exported by another manager into ``blocks`` (already filled), with its hashes."""
        if record.request_id in self.sequences:
            raise SequenceExists(record.request_id)
        self.pool.register_chain(blocks, record.hashes)
        return self.sequences.add(
            record.request_id, blocks, record.num_tokens, priority=record.priority, now=self.clock(),
            root=record.root, token_ids=record.token_ids, hashes=record.hashes,
            cached_tokens=record.cached_tokens, dropped_tokens=record.dropped_tokens)

    def release(self, seq: Sequence) -> None:
        """Forget a sequence; its full blocks stay in the prefix cache until their space is needed."""
        self.sequences.remove(seq)
        if seq.state is RUNNING:
            self.pool.free(reversed(seq.blocks))  # tail blocks first: they are the least shared
        else:
            self.host_tier.release(seq)

    def fork(self, src: Sequence, new_request_id: str | None = None) -> Sequence:
        """Clone a running sequence; blocks are shared and a partly filled one is copied on the first write."""
        new_id = new_request_id or f"{src.request_id}#fork{next(self._forks)}"
        if new_id in self.sequences:
            raise SequenceExists(new_id)
        seq = self._share(src, new_id, src.num_tokens, src.priority)
        self.counters["forks"] += 1
        return seq

    def share_prefix(self, src: Sequence, target: str, shared_tokens: int) -> None:
        """Give ``target`` (new, or empty) the first ``shared_tokens`` tokens of ``src`` without copying."""
        if not 0 < shared_tokens <= src.num_tokens:
            raise OutOfBounds(shared_tokens - 1, src.num_tokens)
        existing = self.sequences.get(target)
        if existing is not None and (existing.state is not RUNNING or existing.num_tokens):
            raise SequenceExists(target)
        priority = src.priority
        if existing is not None:
            priority = existing.priority
            self.release(existing)
        self._share(src, target, shared_tokens, priority)

    def _share(self, src: Sequence, new_id: str, num_tokens: int, priority: int) -> Sequence:
        bs = self.prefix.block_size
        blocks = src.blocks[:-(-num_tokens // bs)]
        for block in blocks:
            self.pool.incref(block)
        return self.sequences.add(
            new_id, list(blocks), num_tokens, priority=priority, now=self.clock(), root=src.root,
            token_ids=None if src.token_ids is None else src.token_ids[:num_tokens],
            hashes=src.hashes[:num_tokens // bs], cached_tokens=num_tokens, dropped_tokens=src.dropped_tokens)
