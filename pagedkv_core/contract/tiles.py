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

__all__ = ["DecodeTile", "DecodeGroup", "plan_decode_tiles", "HiddenParts", "hidden_parts", "clear_hidden"]


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


HiddenParts = tuple[np.ndarray, np.ndarray] | None
"""Hidden parts of a gathered decode tile: ``(blocks, slots)``, flat indices of whole hidden blocks and of
the hidden slots of partly hidden ones (``None``: nothing hidden)."""


def hidden_parts(hidden: np.ndarray, block_size: int) -> HiddenParts:
    """Where a tile's gathered K/V must be zeroed, from its ``hidden [rows, cols * block_size]`` mask.

    A slot a row must not see may hold anything (NaN, Inf: another
    sequence's or a previous owner's values); a score of ``-inf`` gives it
    weight 0, but ``0 * NaN`` is still NaN, so its values must be gone
    before the matmul. Whole hidden blocks (a short row's padding) come as
    flat block indices and the hidden slots of partly hidden blocks (a last
    block's unused tail, slots before a window or chunk) as flat slot
    indices, so zeroing writes exactly the hidden bytes, each a contiguous
    run: no pass over the tile. Planned once per step.
    """
    rows, slots = hidden.shape
    per_block = hidden.reshape(rows, slots // block_size, block_size)
    whole = np.logical_and.reduce(per_block, axis=2)
    partial = np.logical_or.reduce(per_block, axis=2) & ~whole
    if not whole.any() and not partial.any():
        return None
    return np.flatnonzero(whole.reshape(-1)), np.flatnonzero((per_block & partial[:, :, None]).reshape(-1))


def clear_hidden(tile: np.ndarray, parts: HiddenParts, block_size: int) -> np.ndarray:
    """Zero the hidden parts of a gathered host ``tile [rows, slots, heads, d]`` (contiguous scratch) in place."""
    if parts is not None:
        blocks, slots = parts
        rows, n, h, d = tile.shape
        if blocks.size:
            tile.reshape(rows * n // block_size, block_size * h * d)[blocks] = 0
        if slots.size:
            tile.reshape(rows * n, h * d)[slots] = 0
    return tile
