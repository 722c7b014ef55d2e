"""Growing and shrinking sequences: the decode step, batch extension, rollback.

Part of :class:`~pagedkv_core.manager.facade.PagedKvCacheManager`, split out to keep
modules small; it relies on the manager's lock, pool and tables."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from ..blocks.metadata import BatchMetadata, build_batch_metadata
from ..errors import InvalidArgument, OutOfBlocks, OutOfBounds, SequenceNotResident, UnknownSequence
from .records import SeqState, Sequence

RUNNING = SeqState.RUNNING


class GrowthMixin:
    """Reserving slots for new tokens (with copy-on-write) and rolling them back."""

    def extend(self, request_id: str, additional_tokens: int, token_ids: Seq[int] | None = None) -> None:
        """Reserve slots for ``additional_tokens`` more tokens (their ids enable prefix caching)."""
        self.extend_batch([request_id], [additional_tokens], None if token_ids is None else [token_ids])

    def append_slots(self, request_ids: Seq[str], token_ids: Seq[int] | None = None) -> BatchMetadata:
        """The decode step: one new token for each sequence; returns the step's kernel metadata.

        This is the hot path of a serving loop, so it is written out rather
        than routed through :meth:`extend_batch`: one pass to validate, one
        to commit, and the slot mapping collected on the way.
        """
        with self._mutating():
            try:
                seqs = [self._seqs[r] for r in request_ids]
            except KeyError as exc:
                raise UnknownSequence(exc.args[0]) from None
            if len(set(request_ids)) != len(seqs):
                raise InvalidArgument("a request id appears twice in one batch")
            if token_ids is not None and len(token_ids) != len(seqs):
                raise InvalidArgument("token_ids must hold one token per request")
            pool, ref, bs, width = self.pool, self.pool.ref, self.config.block_size, self.tables.max_width
            needed = 0
            for seq in seqs:
                if seq.state is not RUNNING:
                    raise SequenceNotResident(seq.request_id, seq.state.value)
                offset = seq.num_tokens % bs
                if offset == 0:
                    if len(seq.blocks) >= width:
                        raise OutOfBounds(seq.num_tokens, width * bs)
                    needed += 1
                elif ref[seq.blocks[-1]] > 1:
                    needed += 1
            if needed > pool.num_free:
                raise OutOfBlocks(needed, pool.num_free)
            tables, now = self.tables, self.clock()
            slots = [0] * len(seqs)
            cow_src: list[int] = []
            cow_dst: list[int] = []
            for i, seq in enumerate(seqs):
                n, blocks = seq.num_tokens, seq.blocks
                offset = n % bs
                if offset == 0:
                    block = pool.allocate_one()
                    tables.append(seq.row, len(blocks), block)
                    blocks.append(block)
                else:
                    block = blocks[-1]
                    if ref[block] > 1:  # shared partly filled block: copy on write
                        cow_src.append(block)
                        ref[block] -= 1
                        block = pool.allocate_one()
                        cow_dst.append(block)
                        blocks[-1] = block
                        tables.tables[seq.row, len(blocks) - 1] = block
                slots[i] = block * bs + offset
                seq.num_tokens = n + 1
                seq.last_access = now
                seq.access_count += 1
                if seq.token_ids is not None:
                    if token_ids is None:
                        seq.token_ids, seq.root = None, None
                    else:
                        seq.token_ids.append(token_ids[i])
                        if offset == bs - 1:
                            self._hash_full_blocks(seq)
            rows = np.fromiter([seq.row for seq in seqs], np.int64, len(seqs))
            self.tables.lens[rows] += 1
            if cow_src:
                self.storage.copy_blocks(cow_src, cow_dst)
                self.counters["cow_copies"] += len(cow_src)
            return build_batch_metadata(tuple(request_ids), tables.tables, tables.lens, rows, None, bs,
                                        np.array(slots, np.int32))

    def extend_batch(self, request_ids: Seq[str], counts: Seq[int] | None = None,
                     token_ids: Seq[Seq[int] | None] | None = None) -> None:
        """Reserve slots for a whole scheduler step at once; all or nothing.

        ``counts=None`` means one token per sequence. A shared, partly filled
        last block is copied first (copy-on-write), all copies in one storage call.
        """
        with self._mutating():
            seqs = [self._running(r) for r in request_ids]
            if len(set(map(id, seqs))) != len(seqs):
                raise InvalidArgument("a request id appears twice in one batch")
            counts = [1] * len(seqs) if counts is None else [int(c) for c in counts]
            if len(counts) != len(seqs) or (token_ids is not None and len(token_ids) != len(seqs)):
                raise InvalidArgument("request_ids, counts and token_ids must have the same length")
            self._reserve(seqs, counts, token_ids)

    def _reserve(self, seqs: list[Sequence], counts: list[int], token_ids) -> None:
        bs, width, ref = self.config.block_size, self.tables.max_width, self.pool.ref
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
            if n and seq.num_tokens % bs and ref[seq.blocks[-1]] > 1:
                needed += 1
            if token_ids is not None and token_ids[i] is not None and len(token_ids[i]) != n:
                raise InvalidArgument(f"{seq.request_id!r}: {len(token_ids[i])} token ids for {n} tokens")
        if needed > self.pool.num_free:
            raise OutOfBlocks(needed, self.pool.num_free)
        cow_src: list[int] = []
        cow_dst: list[int] = []
        self.tables.ensure_width(widest)
        table, lens, used, now = self.tables.tables, self.tables.lens, self.tables.used, self.clock()
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            seq.last_access = now
            seq.access_count += 1
            if not n:
                continue
            blocks, row = seq.blocks, seq.row
            if seq.num_tokens % bs and ref[blocks[-1]] > 1:
                (fresh,) = self.pool.allocate(1)
                cow_src.append(blocks[-1])
                cow_dst.append(fresh)
                ref[blocks[-1]] -= 1  # still >= 1: other owners keep it
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
                    self._hash_full_blocks(seq)
        if cow_src:
            self.storage.copy_blocks(cow_src, cow_dst)
            self.counters["cow_copies"] += len(cow_src)

    def _hash_full_blocks(self, seq: Sequence) -> None:
        bs, hashes, tokens = self.config.block_size, seq.hashes, seq.token_ids
        while len(hashes) < len(tokens) // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.root
            block_hash = self.hasher.next(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(block_hash)
            self.pool.register(seq.blocks[i], block_hash, parent if i else None)
            if self.remote is not None:
                self.remote.note(seq.root, (block_hash,))

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Roll back the last ``num_tokens`` tokens (rejected speculative tokens)."""
        with self._mutating():
            seq = self._running(request_id)
            if not 0 <= num_tokens <= seq.num_tokens:
                raise OutOfBounds(seq.num_tokens - num_tokens, seq.num_tokens)
            bs = self.config.block_size
            total = seq.num_tokens - num_tokens
            keep = -(-total // bs)
            dropped = seq.blocks[keep:]
            del seq.blocks[keep:]
            self.pool.free(reversed(dropped))
            if total % bs and self.pool.ref[seq.blocks[-1]] == 1:
                self.pool.unregister(seq.blocks[-1])  # about to be overwritten: no longer that prefix
            seq.num_tokens = total
            del seq.hashes[total // bs:]
            if seq.token_ids is not None:
                del seq.token_ids[total:]
            self.tables.set_row(seq.row, seq.blocks, total)

