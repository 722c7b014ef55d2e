"""Eviction: victims chosen by the policy, swapped out, dropped, or trimmed by a window."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq

from ..blocks.pool import BlockPool
from ..errors import InvalidArgument
from ..policy.eviction import EvictionCandidate, EvictionPolicy, SequenceInfo, WindowPolicy
from ..stats import EvictionResult
from .admission import Admission
from .host_tier import HostTier
from .records import SeqState, Sequence
from .sequences import SequenceTable

__all__ = ["Evictor"]

RUNNING = SeqState.RUNNING


class Evictor:
    """Frees memory as the eviction policy chooses."""

    def __init__(self, policy: EvictionPolicy, pool: BlockPool, sequences: SequenceTable, admission: Admission,
                 host_tier: HostTier, counters: Counter[str], clock: Callable[[], float]) -> None:
        self.policy = policy
        self.pool = pool
        self.sequences = sequences
        self.admission = admission
        self.host_tier = host_tier
        self.counters = counters
        self.clock = clock
        self.block_size = pool.block_size

    def sequence_infos(self) -> list[SequenceInfo]:
        """Snapshots of the running sequences, as eviction policies see them."""
        ref = self.pool.ref
        return [
            SequenceInfo(s.request_id, s.num_tokens, len(s.blocks), sum(1 for b in s.blocks if ref[b] == 1),
                         s.priority, s.last_access, s.access_count, s.arrival)
            for s in self.sequences if s.state is RUNNING
        ]

    def candidates(self, required_blocks: int) -> list[EvictionCandidate]:
        return self.policy.select_eviction_candidates(required_blocks, self.sequence_infos())

    def record_access(self, seq: Sequence) -> None:
        """Mark a sequence as used now (LRU/LFU read this)."""
        seq.last_access = self.clock()
        seq.access_count += 1
        self.policy.record_access(seq.request_id, seq.last_access)

    def evict(self, required_blocks: int | None = 1, *, swap: bool = True) -> EvictionResult:
        """Free at least ``required_blocks`` blocks as the policy chooses.

        Whole-sequence victims are swapped to the host tier when it has room
        (and ``swap``), else dropped: their handles become invalid. Window
        policies cut blocks out of sequences instead.
        """
        free_before = self.pool.num_free
        swapped: list[str] = []
        dropped: list[str] = []
        trimmed: list[tuple[str, int]] = []
        for cand in self.policy.select_eviction_candidates(required_blocks, self.sequence_infos()):
            seq = self.sequences.running(cand.request_id)
            if cand.blocks is not None:
                trimmed.append((seq.request_id, self.cut_blocks(seq, cand.blocks)))
            elif swap and len(seq.blocks) <= self.host_tier.room:
                self.host_tier.swap_out(seq)
                swapped.append(seq.request_id)
            else:
                self.admission.release(seq)
                dropped.append(seq.request_id)
            self.counters["eviction_count"] += 1
        return EvictionResult(tuple(swapped), tuple(dropped), tuple(trimmed), self.pool.num_free - free_before)

    def evict_to_threshold(self, utilization: float, *, swap: bool = True) -> EvictionResult:
        """Evict until at most ``utilization`` of the pool is in use."""
        if not 0 <= utilization <= 1:
            raise InvalidArgument(f"utilization must be in [0, 1], got {utilization}")
        excess = self.pool.num_used - int(utilization * self.pool.num_blocks)
        if excess <= 0:
            return EvictionResult((), (), (), 0)
        return self.evict(excess, swap=swap)

    def trim_window(self, seq: Sequence, policy: WindowPolicy) -> int:
        """Apply a window policy (StreamingLLM, sliding window) to one sequence; return tokens removed."""
        return self.cut_blocks(seq, tuple(policy.cut(seq.num_tokens)))

    def cut_blocks(self, seq: Sequence, logical: Seq[int]) -> int:
        """Cut full blocks (logical indices, none the last) out of a sequence; return the tokens removed."""
        bs = self.block_size
        cut = sorted(set(logical))
        if not cut:
            return 0
        if cut[0] < 0 or cut[-1] >= seq.num_tokens // bs or cut[-1] >= len(seq.blocks) - 1:
            raise InvalidArgument(f"can only cut full blocks before the last one of {seq.request_id!r}")
        removed = [seq.blocks[i] for i in cut]
        cut_set = set(cut)
        kept = [b for i, b in enumerate(seq.blocks) if i not in cut_set]
        self.pool.free(reversed(removed))
        tokens = len(cut) * bs
        seq.dropped_tokens += tokens
        seq.root, seq.token_ids, seq.hashes = None, None, []  # no longer a prefix of its own tokens
        self.sequences.set_blocks(seq, kept, seq.num_tokens - tokens)
        return tokens
