"""The live sequences: their records by request id and the block-table rows behind them.

It owns both, so a record's blocks and its table row change together: every
change of a sequence's block list goes through :meth:`SequenceTable.set_blocks`
(or the decode step's in-place appends, which update the row alongside).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator
from collections.abc import Sequence as Sequence_
from typing import Any

import numpy as np

from ..blocks.metadata import BatchMetadata, build_batch_metadata
from ..blocks.tables import TableArrays
from ..errors import InvalidArgument, SequenceNotResident, UnknownSequence
from .records import SeqState, Sequence

__all__ = ["SequenceTable"]


class SequenceTable:
    """Records by request id, in admission order, and the int32 tables kernels read."""

    def __init__(self, max_blocks_per_seq: int) -> None:
        self.tables = TableArrays(max_blocks_per_seq)
        self._records: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._records.values())

    def ids(self) -> list[str]:
        return list(self._records)

    @property
    def max_width(self) -> int:
        """Blocks a sequence may hold at most (``CacheConfig.max_blocks_per_seq``)."""
        return self.tables.max_width

    def get(self, request_id: str) -> Sequence | None:
        return self._records.get(request_id)

    def find(self, request_id: str) -> Sequence:
        """The record of ``request_id``, or :class:`UnknownSequence`."""
        seq = self._records.get(request_id)
        if seq is None:
            raise UnknownSequence(request_id)
        return seq

    def find_many(self, request_ids: Sequence_[str]) -> list[Sequence]:
        """The records of a batch, in order (one dict lookup each: the decode step's path)."""
        records = self._records
        try:
            return [records[r] for r in request_ids]
        except KeyError as exc:
            raise UnknownSequence(exc.args[0]) from None

    def running(self, request_id: str) -> Sequence:
        """The record of a sequence whose blocks are on the device, or :class:`SequenceNotResident`."""
        seq = self.find(request_id)
        if seq.state is not SeqState.RUNNING:
            raise SequenceNotResident(request_id, seq.state.value)
        return seq

    def add(self, request_id: str, blocks: list[int], num_tokens: int, *, priority: int, now: float,
            root: Hashable | None, token_ids: list[int] | None = None, hashes: list[Hashable] | None = None,
            cached_tokens: int = 0, dropped_tokens: int = 0, **state: Any) -> Sequence:
        """Register a new sequence holding ``blocks`` (the caller took their references) and give it a row.

        ``state``: the host-tier fields of a sequence that arrives swapped out
        (``state``, ``host``, ``host_blocks``, ``host_lossy``).
        """
        row = self.tables.acquire()
        self.tables.set_row(row, blocks, num_tokens)
        seq = Sequence(request_id, row, blocks, num_tokens, priority, next(self._arrivals), now, root,
                       token_ids=token_ids, hashes=list(hashes or ()), cached_tokens=cached_tokens,
                       dropped_tokens=dropped_tokens, **state)
        self._records[request_id] = seq
        return seq

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence and recycle its row (its blocks are the caller's to release)."""
        del self._records[seq.request_id]
        self.tables.release(seq.row)

    def set_blocks(self, seq: Sequence, blocks: list[int], num_tokens: int | None = None) -> None:
        """Replace a sequence's block list (and token count), row included."""
        seq.blocks = blocks
        if num_tokens is not None:
            seq.num_tokens = num_tokens
        self.tables.set_row(seq.row, blocks, seq.num_tokens)

    def metadata(self, request_ids: Sequence_[str], query_lens: Sequence_[int] | None,
                 block_size: int) -> BatchMetadata:
        """Kernel metadata for running sequences whose last ``query_lens[i]`` tokens are new (default: 1 each)."""
        seqs = [self.running(r) for r in request_ids]
        rows = np.fromiter((s.row for s in seqs), np.int64, len(seqs))
        if query_lens is None:
            qlens = np.ones(len(seqs), np.int32)
        else:
            qlens = np.asarray(query_lens, np.int32)
            if qlens.shape != (len(seqs),) or (qlens < 0).any():
                raise InvalidArgument("query_lens must be one non-negative count per request")
        if (qlens > self.tables.lens[rows]).any():
            raise InvalidArgument("a sequence has more new tokens than cached tokens")
        return build_batch_metadata(tuple(request_ids), self.tables.tables, self.tables.lens, rows,
                                    None if query_lens is None else qlens, block_size)

    def replace_block(self, seq: Sequence, index: int, block: int) -> None:
        """Put ``block`` at logical ``index`` of a sequence (record and row): the window's null-block swap."""
        seq.blocks[index] = block
        self.tables.tables[seq.row, index] = block
