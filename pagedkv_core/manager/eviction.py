"""Eviction: victims chosen by the policy, swapped out, dropped, or trimmed by a window.

Part of :class:`~pagedkv_core.manager.facade.PagedKvCacheManager`, split out to keep
modules small; it relies on the manager's lock, pool and tables."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from ..errors import InvalidArgument
from ..policy.eviction import EvictionCandidate, SequenceInfo
from ..stats import EvictionResult
from .records import SeqState, Sequence

RUNNING = SeqState.RUNNING


class EvictionMixin:
    """Frees memory as the eviction policy chooses."""

    def sequence_infos(self) -> list[SequenceInfo]:
        """Snapshots of the running sequences, as eviction policies see them."""
        with self._lock:
            ref = self.pool.ref
            return [
                SequenceInfo(s.request_id, s.num_tokens, len(s.blocks), sum(1 for b in s.blocks if ref[b] == 1),
                             s.priority, s.last_access, s.access_count, s.arrival)
                for s in self._seqs.values() if s.state is RUNNING
            ]

    def select_eviction_candidates(self, required_bytes: int) -> list[EvictionCandidate]:
        required = -(-int(required_bytes) // self.config.bytes_per_block)
        return self.policy.select_eviction_candidates(required, self.sequence_infos())

    def record_access(self, request_id: str) -> None:
        """Mark a sequence as used now (LRU/LFU read this)."""
        with self._lock:
            seq = self._sequence(request_id)
            seq.last_access = self.clock()
            seq.access_count += 1
            self.policy.record_access(request_id, seq.last_access)

    def evict(self, required_blocks: int | None = 1, *, swap: bool = True) -> EvictionResult:
        """Free at least ``required_blocks`` blocks as the policy chooses.

        Whole-sequence victims are swapped to the host tier when it has room
        (and ``swap``), else dropped: their handles become invalid. Window
        policies cut blocks out of sequences instead.
        """
        with self._mutating():
            free_before = self.pool.num_free
            swapped, dropped, trimmed = [], [], []
            for cand in self.policy.select_eviction_candidates(required_blocks, self.sequence_infos()):
                seq = self._running(cand.request_id)
                if cand.blocks is not None:
                    trimmed.append((seq.request_id, self._cut_blocks(seq, cand.blocks)))
                elif swap and len(seq.blocks) <= self.host_capacity - self.host_used:
                    self.swap_out(seq.request_id)
                    swapped.append(seq.request_id)
                else:
                    self._release(seq)
                    dropped.append(seq.request_id)
                self.counters["eviction_count"] += 1
            return EvictionResult(tuple(swapped), tuple(dropped), tuple(trimmed), self.pool.num_free - free_before)

    def evict_to_threshold(self, utilization: float, *, swap: bool = True) -> EvictionResult:
        """Evict until at most ``utilization`` of the pool is in use."""
        if not 0 <= utilization <= 1:
            raise InvalidArgument(f"utilization must be in [0, 1], got {utilization}")
        with self._lock:
            excess = self.pool.num_used - int(utilization * self.config.num_blocks)
            if excess <= 0:
                return EvictionResult((), (), (), 0)
            return self.evict(excess, swap=swap)

    def trim_window(self, request_id: str, policy) -> int:
        """Apply a window policy (StreamingLLM, sliding window) to one sequence; return tokens removed."""
        with self._mutating():
            seq = self._running(request_id)
            return self._cut_blocks(seq, tuple(policy.cut(seq.num_tokens)))

    def _cut_blocks(self, seq: Sequence, logical: Seq[int]) -> int:
        bs = self.config.block_size
        cut = sorted(set(logical))
        if not cut:
            return 0
        if cut[0] < 0 or cut[-1] >= seq.num_tokens // bs or cut[-1] >= len(seq.blocks) - 1:
            raise InvalidArgument(f"can only cut full blocks before the last one of {seq.request_id!r}")
        removed = [seq.blocks[i] for i in cut]
        cut_set = set(cut)
        seq.blocks = [b for i, b in enumerate(seq.blocks) if i not in cut_set]
        self.pool.free(reversed(removed))
        tokens = len(cut) * bs
        seq.num_tokens -= tokens
        seq.dropped_tokens += tokens
        seq.root, seq.token_ids, seq.hashes = None, None, []  # no longer a prefix of its own tokens
        self.tables.set_row(seq.row, seq.blocks, seq.num_tokens)
        return tokens

