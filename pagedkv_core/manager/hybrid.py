"""The cache manager of hybrid models: one block pool, one table per cache group, state slots.

vLLM v1's shape (``KVCacheManager`` -> coordinator -> one single-type
manager per group -> ``BlockPool``) with each part owning its state: this
class locks, checks a step against *all* groups first (so a failed call
changes nothing anywhere) and then lets each :class:`~.groups.KvGroup` commit.

Per step the engine runs, for every layer ``L``, ``meta.for_layer(L)``: the
cache group's metadata, the storage layer, and the mask (sliding window or
chunk) to plan attention with. Sliding and chunked groups release blocks no
future query can read as the sequence grows — the release happens before a
step reserves new slots, so the previous step's prefill could still read them.
Not offered here (use :class:`~pagedkv_core.PagedKvCacheManager` for uniform
models): swapping to a host tier, defragmentation, persistence and remote tiers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from ..blocks.metadata import HybridMetadata
from ..blocks.pool import BlockPool
from ..config import AllocationRequest, CacheConfig
from ..contract.storage import BlockStorage
from ..errors import InvalidArgument, InvariantViolation, OutOfBlocks, OutOfBounds, SequenceExists, UnknownSequence
from ..layers import GroupLayout
from .groups import KvGroup, StateSlots, freed_by
from .hybrid_prefix import PrefixExplanation, explain, search
from .prefix import AdmissionPlan
from .records import Sequence

__all__ = ["HybridCacheManager", "Admitted", "HybridStats"]


@dataclass(frozen=True, slots=True)
class Admitted:
    """An admitted request: its length, the prompt tokens served from the cache, its state slots."""

    request_id: str
    num_tokens: int
    cached_tokens: int
    state_slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HybridStats:
    """A hybrid cache's state: blocks (the null block not counted) and per-request event counts."""

    total_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int  # findable by prefix hash, every group's namespace together
    sequences: int
    blocks_per_group: tuple[int, ...]
    state_slots_used: tuple[int, ...]
    bytes_per_block: int
    prefix_queries: int
    prefix_hits: int
    cache_hit_rate: float
    allocation_count: int
    allocation_failures: int
    cow_copies: int
    forks: int


class HybridCacheManager:
    """Paged KV bookkeeping for models whose layers keep different kinds of cache (see :mod:`pagedkv_core.layers`)."""

    def __init__(self, storage: BlockStorage, config: CacheConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(config, CacheConfig):
            raise InvalidArgument(f"config must be a CacheConfig, got {type(config).__name__}")
        if storage.config != config.storage_config():
            raise InvalidArgument("the storage must be built from config.storage_config(): "
                                  f"{storage.config} != {config.storage_config()}")
        self.config = config
        self.storage = storage
        self.layout: GroupLayout = config.layout
        self.lock = threading.RLock()
        self.own_counts: Counter[str] = Counter()  # what only the coordinator sees: failures, forks
        self.pool = BlockPool(config.num_blocks, config.block_size, clock=clock)
        self.null_block = self.pool.allocate_one()  # held for good; never written, never handed out
        self.groups = [KvGroup(g, config, storage, self.pool, self.null_block, clock)
                       for g in self.layout.cache_groups]
        self.states = [StateSlots(g) for g in self.layout.state_groups]

    @classmethod
    def create(cls, config: CacheConfig, backend: Any = "numpy", device: str = "cpu") -> HybridCacheManager:
        """Build the backend's storage for ``config`` (a backend object or a registered name) and the manager."""
        if isinstance(backend, str):
            from ..plugins import get_backend

            backend = get_backend(backend)
        return cls(backend.create_storage(config.storage_config(), device), config)

    # -- queries ---------------------------------------------------------------------

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.groups[0].sequences

    def __len__(self) -> int:
        return len(self.groups[0].sequences)

    def request_ids(self) -> list[str]:
        return self.groups[0].sequences.ids()

    def has_sequence(self, request_id: str) -> bool:
        return request_id in self

    def num_tokens(self, request_id: str) -> int:
        return self.groups[0].sequences.find(request_id).num_tokens

    def rollback_limit(self, request_id: str) -> int:
        """The shortest length ``trim`` can bring ``request_id`` back to (0 until a group released blocks)."""
        with self.lock:
            bs = self.config.block_size
            return max(g.spec.shortest_length_keeping(g.sequences.find(request_id).live_from * bs)
                       for g in self.groups)

    def state_slot(self, request_id: str, layer: int) -> int:
        """The row of ``request_id`` in the engine's state arrays of ``layer``'s state group."""
        with self.lock:
            slots = self.states[self.layout.state_group_of(layer)]
            if request_id not in slots.owner:
                raise UnknownSequence(request_id)
            return slots.owner[request_id]

    @property
    def counters(self) -> Counter[str]:
        """Event counts, per request, not per group: admissions and prefix lookups as group 0 saw them (every
        group sees the same), copy-on-write copies summed over the groups, failures and forks."""
        first = self.groups[0].counters
        merged: Counter[str] = Counter({k: first[k] for k in ("allocation_count", "prefix_queries", "prefix_hits")})
        merged["cow_copies"] = sum(g.counters["cow_copies"] for g in self.groups)
        merged.update(self.own_counts)
        return merged

    def stats(self) -> HybridStats:
        """Blocks held per cache group, sequences, state slots and the counts of :attr:`counters`."""
        with self.lock:
            counts = self.counters
            queries = counts["prefix_queries"]
            return HybridStats(
                total_blocks=self.config.num_blocks - 1, used_blocks=self.num_used_blocks,
                free_blocks=self.pool.num_free, cached_blocks=len(self.pool.cached), sequences=len(self),
                blocks_per_group=tuple(self.blocks_held(g) for g in range(len(self.groups))),
                state_slots_used=tuple(s.capacity - s.num_free for s in self.states),
                bytes_per_block=self.config.bytes_per_block, prefix_queries=queries,
                prefix_hits=counts["prefix_hits"], cache_hit_rate=counts["prefix_hits"] / queries if queries else 0.0,
                allocation_count=counts["allocation_count"], allocation_failures=counts["allocation_failures"],
                cow_copies=counts["cow_copies"], forks=counts["forks"])

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by sequences (the null block not counted)."""
        return self.pool.num_used - 1

    def blocks_held(self, group: int) -> int:
        """Distinct blocks cache group ``group`` holds now."""
        with self.lock:
            held = {b for seq in self.groups[group].sequences for b in seq.blocks}
            held.discard(self.null_block)
            return len(held)

    def utilization(self) -> float:
        return self.num_used_blocks / max(1, self.config.num_blocks - 1)

    # -- admission -------------------------------------------------------------------

    def _plan(self, request: AllocationRequest) -> tuple[list[tuple[AdmissionPlan, int]], int]:
        if request.request_id in self:
            raise SequenceExists(request.request_id)
        bs, n = self.config.block_size, request.initial_tokens or 0
        total = -(-n // bs)
        width = self.config.max_blocks_per_seq
        if total > width:
            raise OutOfBounds(n - 1, width * bs)
        h, lookups = search(self.groups, self.layout.state_groups, request, self.groups[0].prefix.config)
        plans = []
        for lookup in lookups:
            group = lookup.group
            start = min(group.reach(h * bs), h) if group.drops_blocks else 0
            hits = [self.null_block] * start + [b for b in lookup.cached[start:h] if b is not None]
            plans.append((AdmissionPlan(hits, list(lookup.hashes), total - h, lookup.root), start))
        needed = sum(plan.free_blocks_needed(self.pool) for plan, _ in plans)
        return plans, needed

    def can_allocate(self, request: AllocationRequest) -> bool:
        with self.lock:
            try:
                _, needed = self._plan(request)
            except (SequenceExists, OutOfBounds):
                return False
            return needed <= self.pool.num_free and all(s.num_free for s in self.states)

    def allocate(self, request: AllocationRequest) -> Admitted:
        """Admit a request in every group at once, reusing the longest prefix all groups can serve."""
        with self.lock:
            plans, needed = self._plan(request)
            if needed > self.pool.num_free:
                self.own_counts["allocation_failures"] += 1
                raise OutOfBlocks(needed, self.pool.num_free)
            for slots in self.states:
                slots.check_free(1)
            seqs = []
            for group, (plan, start) in zip(self.groups, plans):
                seq = group.admission.admit_plan(request, plan)
                seq.live_from = start
                seqs.append(seq)
            state = tuple(slots.take(request.request_id) for slots in self.states)
            return Admitted(request.request_id, seqs[0].num_tokens, seqs[0].cached_tokens, state)

    def deallocate(self, request_id: str) -> None:
        """Free a sequence in every group; full blocks stay cached until their space is needed."""
        with self.lock:
            seqs = [g.sequences.find(request_id) for g in self.groups]
            for group, seq in zip(self.groups, seqs):
                group.admission.release(seq)
            for slots in self.states:
                slots.release(request_id)

    def fork(self, request_id: str, new_request_id: str | None = None) -> str:
        """Clone a sequence in every group (blocks shared, copy on write); returns the new id.

        The clone gets fresh state slots: copying the engine's state rows is the engine's part.
        """
        with self.lock:
            srcs = [g.sequences.running(request_id) for g in self.groups]
            new_id = new_request_id or f"{request_id}#fork{self.own_counts['forks'] + 1}"
            if new_id in self:
                raise SequenceExists(new_id)
            for slots in self.states:
                slots.check_free(1)
            for group, src in zip(self.groups, srcs):
                seq = group.admission.fork(src, new_id)
                seq.live_from = src.live_from
            for slots in self.states:
                slots.take(new_id)
            self.own_counts["forks"] += 1
            return new_id

    # -- growth ----------------------------------------------------------------------

    def _drop_and_check(self, per_group: list[tuple[KvGroup, list[Sequence]]], needed: int) -> None:
        """Release what fell out of reach, unless the step still would not fit: then change nothing."""
        drops = [(g, g.planned_drops(seqs)) for g, seqs in per_group]
        free = self.pool.num_free
        if any(planned for _, planned in drops):
            free += freed_by(drops, self.pool.ref)
        if needed > free:
            self.own_counts["allocation_failures"] += 1
            raise OutOfBlocks(needed, free)
        for group, planned in drops:
            for seq, upto in planned:
                group.drop(seq, upto)

    def append_slots(self, request_ids: Seq[str], token_ids: Seq[int] | None = None) -> HybridMetadata:
        """The decode step: one new token per sequence in every group; returns every group's metadata."""
        with self.lock:
            if len(set(request_ids)) != len(request_ids):
                raise InvalidArgument("a request id appears twice in one batch")
            if token_ids is not None and len(token_ids) != len(request_ids):
                raise InvalidArgument("token_ids must hold one token per request")
            per_group = [(g, g.sequences.find_many(request_ids)) for g in self.groups]
            self._drop_and_check(per_group, sum(g.growth.append_need(seqs) for g, seqs in per_group))
            metas = tuple(g.growth.append_checked(request_ids, seqs, token_ids) for g, seqs in per_group)
            return HybridMetadata(self.layout, metas)

    def extend(self, request_id: str, additional_tokens: int, token_ids: Seq[int] | None = None) -> None:
        self.extend_batch([request_id], [additional_tokens], None if token_ids is None else [token_ids])

    def extend_batch(self, request_ids: Seq[str], counts: Seq[int] | None = None,
                     token_ids: Seq[Seq[int] | None] | None = None, *, release: bool = True) -> None:
        """Reserve slots for a scheduler step (chunked prefill, speculative tokens) in every group; all or nothing.

        Before reserving, sliding and chunked groups release what no query
        from the current length on can read. ``release=False`` keeps those
        blocks for this step: for a step that still computes tokens already
        reserved (a prompt admitted and extended by drafts before its first
        forward), whose queries read further back.
        """
        with self.lock:
            if len(set(request_ids)) != len(request_ids):
                raise InvalidArgument("a request id appears twice in one batch")
            sizes = [1] * len(request_ids) if counts is None else [int(c) for c in counts]
            if len(sizes) != len(request_ids) or (token_ids is not None and len(token_ids) != len(request_ids)):
                raise InvalidArgument("request_ids, counts and token_ids must have the same length")
            per_group = [(g, [g.sequences.running(r) for r in request_ids]) for g in self.groups]
            needs = [g.growth.reserve_need(seqs, sizes, token_ids) for g, seqs in per_group]
            self._drop_and_check(per_group if release else [], sum(needed for needed, _ in needs))
            for (group, seqs), (_, widest) in zip(per_group, needs):
                group.growth.reserve_checked(seqs, sizes, token_ids, widest)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Roll back the last ``num_tokens`` tokens in every group (rejected speculative tokens)."""
        with self.lock:
            seqs = [g.sequences.running(request_id) for g in self.groups]
            if not 0 <= num_tokens <= seqs[0].num_tokens:
                raise OutOfBounds(seqs[0].num_tokens - num_tokens, seqs[0].num_tokens)
            for group, seq in zip(self.groups, seqs):
                group.check_rollback(seq, num_tokens)
            for group, seq in zip(self.groups, seqs):
                group.growth.trim(seq, num_tokens)

    # -- export ----------------------------------------------------------------------

    def batch_metadata(self, request_ids: Seq[str], query_lens: Seq[int] | None = None) -> HybridMetadata:
        """Every group's kernel metadata for a batch whose last ``query_lens[i]`` tokens are new (default 1)."""
        with self.lock:
            bs = self.config.block_size
            if query_lens is not None and len(query_lens) == len(request_ids):
                for group in self.groups:
                    for rid, q in zip(request_ids, query_lens):
                        seq = group.sequences.running(rid)
                        if seq.num_tokens - int(q) < seq.live_from * bs:
                            raise InvalidArgument(
                                f"{rid!r}: {q} new tokens reach back past what group {group.cache_group.index} "
                                f"still holds (its blocks before {seq.live_from} were released)")
            metas = tuple(g.sequences.metadata(request_ids, query_lens, bs) for g in self.groups)
            return HybridMetadata(self.layout, metas)

    def explain_prefix(self, token_ids: Seq[int], cache_salt: str | None = None) -> PrefixExplanation:
        """What a request with this prompt would reuse now, group by group, and why each stops where it does."""
        with self.lock:
            request = AllocationRequest("explain", token_ids=tuple(int(t) for t in token_ids), cache_salt=cache_salt)
            return explain(self.groups, self.layout.state_groups, request, self.groups[0].prefix.config)

    # -- checks ----------------------------------------------------------------------

    def check_invariants(self, *, raise_on_error: bool = True) -> list[str]:
        """Every leaked or miscounted block, mismatched group, or misplaced null block (empty when all is well)."""
        with self.lock:
            problems = self.pool.check_invariants()
            owners: Counter[int] = Counter({self.null_block: 1})
            ids = set(self.request_ids())
            null = self.null_block
            for group in self.groups:
                if set(group.sequences.ids()) != ids:
                    problems.append(f"group {group.cache_group.index} holds other sequences than group 0")
                for seq in group.sequences:
                    owners.update(seq.blocks)
                    problems.extend(self._check_sequence(group, seq, null))
            for block in range(self.config.num_blocks):
                if self.pool.ref[block] != owners[block]:
                    problems.append(f"block {block}: ref count {self.pool.ref[block]}, owners {owners[block]}")
            for slots in self.states:
                if set(slots.owner) != ids or len(set(slots.owner.values())) != len(slots.owner):
                    problems.append(f"state slots of layers {list(slots.group.layers)} do not match the sequences")
            if problems and raise_on_error:
                raise InvariantViolation(problems)
            return problems

    def _check_sequence(self, group: KvGroup, seq: Sequence, null: int) -> list[str]:
        problems = []
        where = f"{seq.request_id!r} in group {group.cache_group.index}"
        if seq.num_tokens != self.groups[0].sequences.find(seq.request_id).num_tokens:
            problems.append(f"{where}: length differs from group 0")
        if any(b != null for b in seq.blocks[:seq.live_from]) or null in seq.blocks[seq.live_from:]:
            problems.append(f"{where}: null block outside the released prefix")
        if len(seq.blocks) != -(-seq.num_tokens // self.config.block_size):
            problems.append(f"{where}: {len(seq.blocks)} blocks for {seq.num_tokens} tokens")
        row = group.sequences.tables.tables[seq.row, :len(seq.blocks)].tolist()
        if row != seq.blocks:
            problems.append(f"{where}: table row differs from the block list")
        return problems
