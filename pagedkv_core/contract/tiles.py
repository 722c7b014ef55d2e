"""Host-side planning of a tiled paged decode, shared by the CPU kernels of several backends.

A decode query at position ``t = seq_len - 1`` sees the blocks from its
window's first one to its last. Sequences are sorted longest first and
grouped (at most ``group_slots`` key slots per group, so score buffers stay
bounded); each group's visible blocks are cut into tiles of about
``tile_bytes`` of K (rows × block columns) that a kernel gathers into a
reused buffer and multiplies while the tile is still in cache. This module
only computes the index arrays; the backends do the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import BatchIndex

__all__ = ["DecodeTile", "DecodeGroup", "plan_decode_tiles"]


@dataclass(frozen=True, slots=True)
class DecodeTile:
    """Rows ``r0:r1`` (within the group, sorted) and visible-block columns ``c0:c1``; ``ids [r1-r0, c1-c0]`` int64."""

    r0: int
    r1: int
    c0: int
    c1: int
    ids: np.ndarray


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Sequences decoded together.

    ``rows``: their positions in the batch, longest first; ``width``: visible
    blocks of the longest; ``hidden [rows, width * block_size]``: True for key
    slots a query must not see (past its own length, or before its window).
    """

    rows: np.ndarray
    width: int
    hidden: np.ndarray
    tiles: tuple[DecodeTile, ...]


def plan_decode_tiles(index: BatchIndex, rows: np.ndarray, block_size: int, sliding_window: int | None,
                      block_bytes: int, tile_bytes: int, group_slots: int) -> list[DecodeGroup]:
    """Groups and tiles for the decode queries of batch rows ``rows`` (each with ``seq_len >= 1``)."""
    bs, w = block_size, sliding_window
    t = index.seq_lens[rows] - 1
    first = np.zeros_like(t) if w is None else np.maximum(t - w + 1, 0) // bs
    nvis = t // bs + 1 - first
    order = np.argsort(-nvis, kind="stable")
    rows, t, first, nvis = rows[order], t[order], first[order], nvis[order]
    groups, r = [], 0
    while r < rows.size:
        width = int(nvis[r])
        end = r + max(1, min(rows.size - r, group_slots // (width * bs)))
        groups.append(_group(index, rows[r:end], t[r:end], first[r:end], nvis[r:end], bs, w, block_bytes,
                             tile_bytes))
        r = end
    return groups


def _group(index: BatchIndex, rows: np.ndarray, t: np.ndarray, first: np.ndarray, nvis: np.ndarray, bs: int,
           w: int | None, block_bytes: int, tile_bytes: int) -> DecodeGroup:
    width = int(nvis[0])
    tables = index.block_tables[rows]
    cols = first[:, None] + np.arange(width)[None, :]
    used = np.arange(width)[None, :] < nvis[:, None]
    ids = np.where(used, np.take_along_axis(tables, np.minimum(cols, tables.shape[1] - 1), axis=1), 0)
    pos = first[:, None] * bs + np.arange(width * bs)[None, :]
    hidden = pos > t[:, None]
    if w is not None:
        hidden |= pos <= t[:, None] - w
    tile_rows = max(1, min(rows.size, tile_bytes // block_bytes))
    tile_cols = max(1, tile_bytes // (tile_rows * block_bytes))
    tiles = []
    for c0 in range(0, width, tile_cols):
        c1 = min(width, c0 + tile_cols)
        active = int(np.count_nonzero(nvis > c0))  # sorted: the rows that reach column c0 come first
        for r0 in range(0, active, tile_rows):
            r1 = min(active, r0 + tile_rows)
            tiles.append(DecodeTile(r0, r1, c0, c1, np.ascontiguousarray(ids[r0:r1, c0:c1])))
    return DecodeGroup(rows, width, hidden, tuple(tiles))
