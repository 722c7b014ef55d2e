"""Launch geometry of the attention kernels, from host index arrays only (no device, no cupy).

The decode kernel splits each sequence's visible context into pieces of
``split_len`` tokens so that small batches still fill the GPU
(flash-decoding); the device recomputes each sequence's split count with the
same formula (``decode_range``/``num_splits_for`` in kernels.cu), which is
what lets a grid sized by the longest sequence skip the missing splits of the
others. Prefill tiles each sequence's queries into groups of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import group_tile

__all__ = [
    "THREADS",
    "MIN_SPLIT_LEN",
    "SPLIT_ALIGN",
    "TARGET_BLOCKS_PER_SM",
    "PREFILL_ROWS",
    "DecodeGeometry",
    "PrefillGeometry",
    "decode_visible",
    "decode_geometry",
    "prefill_geometry",
]

THREADS = 128
MIN_SPLIT_LEN = 256          # shorter splits cost more in the reduction than they win
SPLIT_ALIGN = 64             # split lengths are multiples of this many tokens
TARGET_BLOCKS_PER_SM = 16    # enough resident warps to keep loads in flight
PREFILL_ROWS = 32            # (query token, head) rows per prefill block


@dataclass(frozen=True, slots=True)
class DecodeGeometry:
    """Grid of ``pagedkv_decode``: ``(batch * max_splits, num_kv_heads * chunks)``."""

    group_tile: int
    chunks: int
    split_len: int
    max_splits: int
    grid: tuple[int, int]
    reduce_grid: tuple[int, int]


@dataclass(frozen=True, slots=True)
class PrefillGeometry:
    """Grid of ``pagedkv_prefill``: ``(num_tiles, num_kv_heads * chunks)``; tile arrays int32 ``[num_tiles]``."""

    heads_per_block: int
    tokens_per_tile: int
    chunks: int
    tile_seq: np.ndarray
    tile_q0: np.ndarray
    grid: tuple[int, int]


def decode_visible(seq_lens: np.ndarray, window: int, chunk: int = 0) -> np.ndarray:
    """Keys the decode query (position ``t = seq_len - 1``) sees: from its window's or chunk's start to ``t``.

    ``min(seq_len, window)`` with a window, ``t % chunk + 1`` with a chunk,
    the smaller with both; ``seq_len`` with neither (0 means none). The
    device's ``decode_range`` computes the same range, so both agree on
    each sequence's split count.
    """
    lens = np.asarray(seq_lens, dtype=np.int64)
    visible = np.minimum(lens, window) if window > 0 else lens
    if chunk > 0:
        visible = np.minimum(visible, (lens - 1) % chunk + 1)
    return visible


def decode_geometry(seq_lens: np.ndarray, window: int, num_kv_heads: int, num_q_heads: int,
                    num_sms: int, chunk: int = 0) -> DecodeGeometry:
    """Split lengths and grids for one decode batch (``window``, ``chunk`` 0 mean none)."""
    batch = int(np.asarray(seq_lens).shape[0])
    group = num_q_heads // num_kv_heads
    tile = group_tile(group)
    chunks = -(-group // tile)
    longest = int(decode_visible(seq_lens, window, chunk).max()) if batch else 0
    base_blocks = max(1, batch * num_kv_heads * chunks)
    wanted = max(1, -(-TARGET_BLOCKS_PER_SM * num_sms // base_blocks))
    split_len = max(MIN_SPLIT_LEN, -(-longest // wanted))
    split_len = -(-split_len // SPLIT_ALIGN) * SPLIT_ALIGN
    max_splits = max(1, -(-longest // split_len))
    return DecodeGeometry(tile, chunks, split_len, max_splits,
                          (batch * max_splits, num_kv_heads * chunks), (batch, num_q_heads))


def prefill_geometry(query_lens: np.ndarray, num_kv_heads: int, num_q_heads: int) -> PrefillGeometry:
    """Query tiles for one prefill batch: each tile holds ``tokens_per_tile`` queries of one sequence."""
    group = num_q_heads // num_kv_heads
    heads = min(group, PREFILL_ROWS)
    tokens = PREFILL_ROWS // heads
    chunks = -(-group // heads)
    lens = np.asarray(query_lens, dtype=np.int64)
    per_seq = -(-lens // tokens)
    tile_seq = np.repeat(np.arange(lens.size, dtype=np.int32), per_seq)
    first = np.cumsum(per_seq) - per_seq
    tile_q0 = ((np.arange(tile_seq.size) - np.repeat(first, per_seq)) * tokens).astype(np.int32)
    return PrefillGeometry(heads, tokens, chunks, tile_seq, tile_q0, (int(tile_seq.size), num_kv_heads * chunks))
