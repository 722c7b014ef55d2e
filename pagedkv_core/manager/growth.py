"""Growing and shrinking sequences: the decode step, batch extension, rollback.

``append_slots`` is the hot path of a serving loop, so it is written out
rather than routed through :meth:`Growth.extend_batch`: one pass to validate,
one to commit, and the slot mapping collected on the way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from itertools import repeat

import numpy as np

from ..blocks.metadata import BatchMetadata, build_batch_metadata
from ..blocks.pool import BlockPool
from ..contract.storage import BlockStorage
from ..errors import InvalidArgument, OutOfBlocks, OutOfBounds, SequenceNotResident
from .prefix import PrefixIndex
from .records import SeqState, Sequence
from .sequences import SequenceTable

__all__ = ["Growth"]

RUNNING = SeqState.RUNNING


class Growth:
    """Reserves slots for new tokens (with copy-on-write of a shared last block) and rolls them back."""

    def __init__(self, pool: BlockPool, sequences: SequenceTable, prefix: PrefixIndex, storage: BlockStorage,
                 counters: Counter[str], clock: Callable[[], float]) -> None:
        self.pool = pool
        self.sequences = sequences
        self.prefix = prefix
        self.storage = storage
        self.counters = counters
        self.clock = clock
        self.block_size = prefix.block_size

    def append_slots(self, request_ids: Seq[str],  # noqa: C901 - the hot path, written out on purpose
                     token_ids: Seq[int] | None = None) -> BatchMetadata:
        """The decode step: one new token for each sequence; returns the step's kernel metadata."""
        seqs = self.sequences.find_many(request_ids)
        if len(set(request_ids)) != len(seqs):
            raise InvalidArgument("a request id appears twice in one batch")
        if token_ids is not None and len(token_ids) != len(seqs):
            raise InvalidArgument("token_ids must hold one token per request")
        needed = self.append_need(seqs)
        if needed > self.pool.num_free:
            raise OutOfBlocks(needed, self.pool.num_free)
        return self.append_checked(request_ids, seqs, token_ids)

    def append_checked(self, request_ids: Seq[str], seqs: list[Sequence],
                       token_ids: Seq[int] | None) -> BatchMetadata:
        """Commit a decode step whose batch :meth:`append_need` validated and whose blocks are free."""
        pool, ref, cached, bs = self.pool, self.pool.ref, self.pool.block_hash, self.block_size
        tables, now, hash_full = self.sequences.tables, self.clock(), self.prefix.hash_full_blocks
        allocate_one, append_to_row = pool.allocate_one, tables.append
        slots: list[int] = []
        row_list: list[int] = []
        add_slot, add_row = slots.append, row_list.append
        cow_src: list[int] = []
        cow_dst: list[int] = []
        for seq, token in zip(seqs, repeat(None) if token_ids is None else token_ids):
            n, blocks = seq.num_tokens, seq.blocks
            offset = n % bs
            if offset:
                block = blocks[-1]
                if ref[block] > 1 or cached[block] is not None:  # shared or cached partly filled block: copy
                    cow_src.append(block)
                    copy = allocate_one()
                    pool.release_copied(block)
                    block = copy
                    cow_dst.append(block)
                    blocks[-1] = block
                    tables.tables[seq.row, len(blocks) - 1] = block
            else:
                block = allocate_one()
                append_to_row(seq.row, len(blocks), block)
                blocks.append(block)
            add_slot(block * bs + offset)
            add_row(seq.row)
            seq.num_tokens = n + 1
            seq.last_access = now
            seq.access_count += 1
            tokens = seq.token_ids
            if tokens is not None:
                if token is None:  # ids unknown: this sequence stops feeding the prefix cache
                    seq.token_ids = seq.root = None
                else:
                    tokens.append(token)
                    if offset == bs - 1:
                        hash_full(seq)
        rows = np.array(row_list, np.int64)
        tables.lens[rows] += 1
        if cow_src:
            self.storage.copy_blocks(cow_src, cow_dst)
            self.counters["cow_copies"] += len(cow_src)
        return build_batch_metadata(tuple(request_ids), tables.tables, tables.lens, rows, None, bs,
                                    np.array(slots, np.int32))

    def append_need(self, seqs: list[Sequence]) -> int:
        """Free blocks a decode step of ``seqs`` takes; raises for every other reason it would fail."""
        ref, cached, bs, width = self.pool.ref, self.pool.block_hash, self.block_size, self.sequences.max_width
        needed = 0
        for seq in seqs:
            if seq.state is not RUNNING:
                raise SequenceNotResident(seq.request_id, seq.state.value)
            offset = seq.num_tokens % bs
            if offset == 0:
                if len(seq.blocks) >= width:
                    raise OutOfBounds(seq.num_tokens, width * bs)
                needed += 1
            elif ref[seq.blocks[-1]] > 1 or cached[seq.blocks[-1]] is not None:  # copy on write
                needed += 1
        return needed

    def extend_batch(self, request_ids: Seq[str], counts: Seq[int] | None = None,
                     token_ids: Seq[Seq[int] | None] | None = None) -> None:
        """Reserve slots for a whole scheduler step at once; all or nothing.

        ``counts=None`` means one token per sequence. A shared, partly filled
        last block is copied first (copy-on-write), all copies in one storage call.
        """
        seqs = [self.sequences.running(r) for r in request_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise InvalidArgument("a request id appears twice in one batch")
        sizes = [1] * len(seqs) if counts is None else [int(c) for c in counts]
        if len(sizes) != len(seqs) or (token_ids is not None and len(token_ids) != len(seqs)):
            raise InvalidArgument("request_ids, counts and token_ids must have the same length")
        self._reserve(seqs, sizes, token_ids)

    def _reserve(self, seqs: list[Sequence], counts: list[int], token_ids: Seq[Seq[int] | None] | None) -> None:
        needed, widest = self.reserve_need(seqs, counts, token_ids)
        if needed > self.pool.num_free:
            raise OutOfBlocks(needed, self.pool.num_free)
        self.reserve_checked(seqs, counts, token_ids, widest)

    def reserve_checked(self, seqs: list[Sequence], counts: list[int], token_ids: Seq[Seq[int] | None] | None,
                        widest: int) -> None:
        """Reserve slots whose need :meth:`reserve_need` computed and the caller saw to be free."""
        bs = self.block_size
        cow_src: list[int] = []
        cow_dst: list[int] = []
        tables = self.sequences.tables
        tables.ensure_width(widest)
        table, lens, used, now = tables.tables, tables.lens, tables.used, self.clock()
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            seq.last_access = now
            seq.access_count += 1
            if not n:
                continue
            blocks, row = seq.blocks, seq.row
            if seq.num_tokens % bs and self.pool.must_copy(blocks[-1]):
                (fresh,) = self.pool.allocate(1)
                cow_src.append(blocks[-1])
                cow_dst.append(fresh)
                self.pool.release_copied(blocks[-1])  # other owners, or the prefix cache, keep it
                blocks[-1] = fresh
                table[row, len(blocks) - 1] = fresh
            total = seq.num_tokens + n
            grow = -(-total // bs) - len(blocks)
            if grow:
                fresh_blocks = self.pool.allocate(grow)
                table[row, len(blocks):len(blocks) + grow] = fresh_blocks
                blocks.extend(fresh_blocks)
                used[row] = len(blocks)
            seq.num_tokens = total
            lens[row] = total
            if seq.token_ids is not None:
                tokens = None if token_ids is None else token_ids[i]
                if tokens is None:  # ids unknown: this sequence stops feeding the prefix cache
                    seq.token_ids, seq.root = None, None
                else:
                    seq.token_ids.extend(tokens)
                    self.prefix.hash_full_blocks(seq)
        if cow_src:
            self.storage.copy_blocks(cow_src, cow_dst)
            self.counters["cow_copies"] += len(cow_src)

    def reserve_need(self, seqs: list[Sequence], counts: list[int],
                     token_ids: Seq[Seq[int] | None] | None) -> tuple[int, int]:
        """Free blocks a reservation takes and the widest row it needs; raises for every other reason it would fail."""
        bs, width = self.block_size, self.sequences.max_width
        needed = widest = 0
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if n < 0:
                raise InvalidArgument(f"cannot extend {seq.request_id!r} by {n} tokens")
            total = seq.num_tokens + n
            blocks = -(-total // bs)
            if blocks > width:
                raise OutOfBounds(total - 1, width * bs)
            widest = max(widest, blocks)
            needed += blocks - len(seq.blocks)
            if n and seq.num_tokens % bs and self.pool.must_copy(seq.blocks[-1]):
                needed += 1
            given = None if token_ids is None else token_ids[i]
            if given is not None and len(given) != n:
                raise InvalidArgument(f"{seq.request_id!r}: {len(given)} token ids for {n} tokens")
        return needed, widest

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back the last ``num_tokens`` tokens (rejected speculative tokens)."""
        if not 0 <= num_tokens <= seq.num_tokens:
            raise OutOfBounds(seq.num_tokens - num_tokens, seq.num_tokens)
        bs = self.block_size
        total = seq.num_tokens - num_tokens
        keep = -(-total // bs)
        dropped = seq.blocks[keep:]
        del seq.blocks[keep:]
        self.pool.free(reversed(dropped))
        if total % bs and self.pool.ref[seq.blocks[-1]] == 1:
            self.pool.unregister(seq.blocks[-1])  # about to be overwritten: no longer that prefix
        del seq.hashes[total // bs:]
        if seq.token_ids is not None:
            del seq.token_ids[total:]
        self.sequences.set_blocks(seq, seq.blocks, total)
