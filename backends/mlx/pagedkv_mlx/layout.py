"""Host-side layout of one batch: which blocks each sequence's queries can see, and the masks.

Computed once per step in ``plan`` from the validated :class:`BatchIndex`
(int64 NumPy, O(batch) Python work) and shared by every layer and by both
attention kernels. Only sequences with at least one query become rows, and a
row keeps only the blocks its queries can see: with a sliding window ``w``
the blocks before position ``first_query - w + 1`` are dropped, so a decode
step reads ``ceil(w / block_size) + 1`` blocks per sequence at most; with a
chunk ``c`` (chunked-local attention) so are the blocks before the first
query's chunk, so a decode step reads only its own chunk's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedkv_core.contract.attention import AttentionParams, BatchIndex

__all__ = ["BatchLayout", "first_visible"]


def first_visible(t: np.ndarray, params: AttentionParams) -> np.ndarray:
    """The first position a query at ``t`` (int array, ``>= 0``) sees: the later of its window's and chunk's starts.

    Both bounds grow with ``t``, so for a run of queries the first one's
    bound is where the run's keys start: what the layout and the prefill
    tiles cut at.
    """
    first = np.zeros_like(t)
    if params.sliding_window is not None:
        first = np.maximum(first, t - params.sliding_window + 1)
    if params.chunk_size is not None:
        first = np.maximum(first, t // params.chunk_size * params.chunk_size)
    return first


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """Rows of a batch, sorted by visible blocks (most first), with their padded block tables.

    ``seqs [rows]``: batch index of each row; ``q_start``/``q_count [rows]``:
    its queries' first row in ``q`` and how many; ``seq_len [rows]``;
    ``first_block [rows]``: logical index of its first visible block;
    ``num_blocks [rows]``: visible blocks; ``ids [rows, width]``: their
    physical ids, padded with block 0 (always a valid id; padding is masked).
    Every id in ``ids`` lies inside the pool (``check_batch`` validated them).
    """

    seqs: np.ndarray
    q_start: np.ndarray
    q_count: np.ndarray
    seq_len: np.ndarray
    first_block: np.ndarray
    num_blocks: np.ndarray
    ids: np.ndarray
    block_size: int
    params: AttentionParams

    @classmethod
    def build(cls, index: BatchIndex, block_size: int, params: AttentionParams) -> BatchLayout:
        seqs = np.flatnonzero(index.query_lens > 0)
        seq_len, count = index.seq_lens[seqs], index.query_lens[seqs]
        first = first_visible(seq_len - count, params) // block_size
        nblocks = -(-seq_len // block_size) - first
        order = np.argsort(-nblocks, kind="stable")
        seqs, seq_len, count, first, nblocks = seqs[order], seq_len[order], count[order], first[order], nblocks[order]
        width = int(nblocks.max(initial=0))
        cols = first[:, None] + np.arange(width)[None, :]
        used = np.arange(width)[None, :] < nblocks[:, None]
        tables = index.block_tables[seqs]
        if tables.shape[1]:
            ids = np.where(used, np.take_along_axis(tables, np.minimum(cols, tables.shape[1] - 1), axis=1), 0)
        else:
            ids = np.zeros((seqs.size, width), np.int64)
        return cls(seqs, index.query_start_loc[seqs], count, seq_len, first, nblocks, ids, block_size, params)

    @property
    def rows(self) -> int:
        return int(self.seqs.size)

    @property
    def width(self) -> int:
        """Blocks per row of ``ids`` (the most any row sees)."""
        return int(self.ids.shape[1])

    @property
    def max_queries(self) -> int:
        return int(self.q_count.max(initial=0))

    def hidden(self, rows: slice | np.ndarray, q0: int, q1: int, width: int | None = None) -> np.ndarray:
        """True where query ``i`` in ``q0:q1`` of a row must not see key slot ``j``: ``[rows, q1 - q0, width * bs]``.

        Slot ``j`` is position ``(first_block + j // bs) * bs + j % bs``;
        query ``i`` is at ``seq_len - q_count + i``. Padding queries
        (``i >= q_count``) see slot 0 only, so their softmax stays finite
        (their output is discarded).
        """
        bs, p = self.block_size, self.params
        width = self.width if width is None else width
        seq_len, count = self.seq_len[rows][:, None, None], self.q_count[rows][:, None, None]
        pos = self.first_block[rows][:, None, None] * bs + np.arange(width * bs)[None, None, :]
        i = np.arange(q0, q1)[None, :, None]
        t = seq_len - count + i
        hidden = pos >= seq_len
        if p.causal or p.sliding_window is not None:
            hidden = hidden | (pos > t)
        if p.sliding_window is not None:
            hidden = hidden | (pos <= t - p.sliding_window)
        if p.chunk_size is not None:
            hidden = hidden | (pos // p.chunk_size != t // p.chunk_size)
        padding = i >= count
        if padding.any():
            slot0 = np.arange(width * bs)[None, None, :] == 0
            hidden = np.where(padding, ~slot0, hidden)
        return hidden
