"""Paged decode with torch ops: the fallback where the compiled CPU kernel was not built, and CUDA/MPS without Triton.

Decode is memory-bound: the cost is reading each K/V block once. Rows (one
query per sequence) are sorted longest first and cut into *tiles* of
``tile_rows`` sequences x ``tile_cols`` blocks, about ``tile_bytes`` of
float32 K, so a tile stays in cache between its gather and its matmuls. A
tile's blocks are gathered through the block table into one reused buffer
(``index_select`` of whole blocks, memcpy speed), widened to float32 there
(bfloat16/float16 read half the bytes from memory, int8 a quarter, and its
per-(block, head) scales are applied in the tile), and one batched matmul
scores every query head of each KV head against it: the grouped formulation
``[rows, kv_heads, group, dim] x [rows, kv_heads, dim, tokens]``, so a block
is read once for its whole query-head group and repeated K/V never exists.
Scores of a group of rows are small (``rows * q_heads * slots`` float32), so
the softmax runs once, vectorised, between a K pass and a V pass.

Sorting means the sequences still active in a column of blocks are a prefix
of the rows, and a sliding window shifts each row to its first visible
block, so ragged batches and windows waste no work on padding. The Python
loop is over tiles (``total K bytes / tile_bytes``), never tokens.

Chunked-local attention moves a row's first visible position to its
chunk's start (or its window's, the later): the plan rebases each row's
block table at the block holding that position, so blocks before it are
never gathered, and masks the slots of that first block before it. Sinks
join the one softmax: the row maximum includes the sink, and ``exp(sink -
max)`` is added to the denominator (no value, no extra pass).

On the CPU the per-tile matmuls go through NumPy on zero-copy views of the
same buffers: for these shapes (4 x 128 times 128 x 64 per sequence and KV
head) NumPy's matmul runs two to three times faster than ``torch.bmm``
(measured in docs/benchmarks-torch.md). Other devices use ``torch.matmul`` on a
head-major copy of the tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagedkv_core.contract.attention import AttentionParams, BatchIndex
from pagedkv_core.contract.tiles import DecodeGroup, plan_decode_tiles

from .convert import take
from .plan_base import TorchPlanBase, first_visible
from .storage import TorchStorage

__all__ = ["TorchDecodePlan", "DEFAULT_TILE_BYTES", "GROUP_SLOTS"]

DEFAULT_TILE_BYTES = 2 << 20
"""Float32 bytes of one gathered tile of K (or V); 1-4 MiB measured alike, 2 MiB kept (docs/benchmarks-torch.md)."""
GROUP_SLOTS = 1 << 16
"""Rows x key slots of one group of rows; bounds the score buffer (x num_q_heads x 4 bytes)."""


@dataclass(frozen=True, slots=True)
class _Tile:
    """Rows ``r0:r1`` (sorted order, within the group) and visible-block columns ``c0:c1``; ``ids`` their blocks."""

    r0: int
    r1: int
    c0: int
    c1: int
    ids: torch.Tensor  # int64 [(r1 - r0) * (c1 - c0)]
    hidden: torch.Tensor | None = None  # bool [r1 - r0, (c1 - c0) * block_size, 1, 1]; None: every slot visible


@dataclass(frozen=True, slots=True)
class _Group:
    """Rows decoded together: ``rows`` (original batch positions), ``width`` visible blocks of the longest."""

    rows: torch.Tensor
    width: int
    hidden: torch.Tensor  # bool [rows, width * block_size]: slots a row must not see
    tiles: tuple[_Tile, ...]


def _hidden_slots(hidden: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """A tile's hidden slots as a mask over its gathered values, or None when it hides none (the common tile)."""
    if not hidden.any():
        return None
    return torch.from_numpy(np.ascontiguousarray(hidden[:, :, None, None])).to(device)


class TorchDecodePlan(TorchPlanBase):
    """One decode step: tiles, gather ids and masks are computed once; ``run`` per layer."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 tile_bytes: int = DEFAULT_TILE_BYTES) -> None:
        super().__init__(storage, index, params)
        index = self.index  # the checked int64 copy, not the caller's arrays
        self.block_bytes = self.block_size * self.num_kv_heads * self.head_dim * 4
        dev = self.device
        if params.chunk_size is None:
            planned = plan_decode_tiles(index, np.arange(index.batch), self.block_size, params.sliding_window,
                                        self.block_bytes, tile_bytes, GROUP_SLOTS)
        else:
            planned = self._chunked_tiles(index, tile_bytes)
        bs = self.block_size
        self.groups: list[_Group] = [
            _Group(torch.from_numpy(g.rows).to(dev), g.width, torch.from_numpy(g.hidden).to(dev), tuple(
                _Tile(t.r0, t.r1, t.c0, t.c1, torch.from_numpy(t.ids.reshape(-1)).to(dev),
                      _hidden_slots(g.hidden[t.r0:t.r1, t.c0 * bs:t.c1 * bs], dev)) for t in g.tiles))
            for g in planned
        ]
        self.buffer_blocks = max((t.ids.numel() for g in self.groups for t in g.tiles), default=1)
        self.on_cpu = self.device.type == "cpu"

    def _chunked_tiles(self, index: BatchIndex, tile_bytes: int) -> list[DecodeGroup]:
        """Tiles of a chunked batch: each row's table rebased at the block of its first visible position.

        The shared planner knows windows only; a row whose visible range
        starts at ``first`` (its chunk's start or its window's) is handed to
        it as the sequence that begins at block ``first // block_size``, with
        no window, and the slots of that block before ``first`` are hidden
        here. Rows keep their batch positions, so nothing else changes.
        """
        bs = self.block_size
        t = index.seq_lens - 1
        first = first_visible(t, self.params)
        shift = first // bs
        width = index.block_tables.shape[1]
        cols = np.minimum(shift[:, None] + np.arange(width)[None, :], max(width - 1, 0))
        tables = np.take_along_axis(index.block_tables, cols, axis=1) if width else index.block_tables
        rebased = BatchIndex(tables, index.seq_lens - shift * bs, index.query_start_loc, index.query_lens, True)
        skip = first - shift * bs  # slots of a row's first block before its first visible position
        groups = plan_decode_tiles(rebased, np.arange(index.batch), bs, None, self.block_bytes, tile_bytes,
                                   GROUP_SLOTS)
        return [DecodeGroup(g.rows, g.width, g.hidden | (np.arange(g.width * bs)[None, :] < skip[g.rows, None]),
                            g.tiles) for g in groups]

    @torch.no_grad()
    def run(self, q, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device).
        """
        q, layer, num_q_heads = self.check(q, layer)
        sink = self.sinks(sinks, num_q_heads)
        if sink is not None:
            sink = sink.view(1, self.num_kv_heads, num_q_heads // self.num_kv_heads, 1)
        out = torch.empty_like(q)
        pools, scales = self.storage.pools(layer), self.storage.scales(layer)
        for group in self.groups:
            out[group.rows] = self._run_group(group, q, num_q_heads, pools, scales, sink).to(q.dtype)
        return out

    def _run_group(self, g: _Group, q: torch.Tensor, num_q_heads: int, pools, scales,
                   sink: torch.Tensor | None) -> torch.Tensor:
        acc, _, total = self.group_state(g, q, num_q_heads, pools, scales, sink)
        return (acc / total).view(g.rows.numel(), num_q_heads, self.head_dim)

    def group_state(self, g: _Group, q: torch.Tensor, num_q_heads: int, pools, scales,
                    sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One group's softmax state: ``acc [rows, kv, group, dim]`` (weighted values, not divided), its ``max``
        and ``sum [rows, kv, group, 1]``; a cascade plan merges it with another level's by log-sum-exp."""
        kv, dim, bs = self.num_kv_heads, self.head_dim, self.block_size
        group, rows, slots = num_q_heads // kv, g.rows.numel(), g.width * bs
        qg = (q.index_select(0, g.rows).float() * self.params.scale).view(rows, kv, group, dim)
        s = torch.empty(rows, kv, group, slots, dtype=torch.float32, device=self.device)
        for tile in g.tiles:  # K pass: scores of every query head of a KV head against the tile
            keys = self._tile(pools[0], None if scales is None else scales[0], tile)
            self._scores(s[tile.r0:tile.r1, :, :, tile.c0 * bs:tile.c1 * bs], qg[tile.r0:tile.r1], keys)
        if self.params.soft_cap is not None:
            cap = self.params.soft_cap
            s.div_(cap).tanh_().mul_(cap)
        s.masked_fill_(g.hidden[:, None, None, :], float("-inf"))
        top = s.amax(dim=-1, keepdim=True)
        if sink is not None:
            top = torch.maximum(top, sink)
        s.sub_(top).exp_()
        total = s.sum(dim=-1, keepdim=True)
        if sink is not None:
            total += (sink - top).exp_()
        acc = torch.zeros(rows, kv, group, dim, dtype=torch.float32, device=self.device)
        for tile in g.tiles:  # V pass
            values = self._tile(pools[1], None if scales is None else scales[1], tile)
            if tile.hidden is not None:  # a hidden slot may hold NaN/Inf from another owner: 0 * NaN = NaN
                values.masked_fill_(tile.hidden, 0)
            self._accumulate(acc[tile.r0:tile.r1], s[tile.r0:tile.r1, :, :, tile.c0 * bs:tile.c1 * bs], values)
        return acc, top, total

    def _tile(self, pool: torch.Tensor, scales: torch.Tensor | None, tile: _Tile) -> torch.Tensor:
        """The tile's blocks as float32 ``[rows, cols * block_size, kv_heads, dim]`` (a reused buffer)."""
        n = tile.ids.numel()
        raw = self._buffer("raw", pool.dtype, n)
        take(pool, 0, tile.ids, out=raw)
        wide = raw if pool.dtype == torch.float32 else self._buffer("wide", torch.float32, n).copy_(raw)
        if scales is not None:
            wide.mul_(scales.index_select(0, tile.ids)[:, None, :, None])
        return wide.view(tile.r1 - tile.r0, -1, self.num_kv_heads, self.head_dim)

    def _buffer(self, name: str, dtype: torch.dtype, blocks: int) -> torch.Tensor:
        shape = (self.buffer_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        key = f"_{name}"
        buf = getattr(self, key, None)
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            setattr(self, key, buf)
        return buf[:blocks]

    def _scores(self, out: torch.Tensor, qg: torch.Tensor, keys: torch.Tensor) -> None:
        """``out [r, kv, group, tokens] = qg [r, kv, group, dim] @ keys [r, tokens, kv, dim]^T``."""
        if self.on_cpu:
            np.matmul(qg.numpy(), keys.numpy().transpose(0, 2, 3, 1), out=out.numpy())
        else:
            out.copy_(torch.matmul(qg, keys.permute(0, 2, 3, 1).contiguous()))

    def _accumulate(self, acc: torch.Tensor, p: torch.Tensor, values: torch.Tensor) -> None:
        """``acc [r, kv, group, dim] += p [r, kv, group, tokens] @ values [r, tokens, kv, dim]``."""
        if self.on_cpu:
            acc.numpy()[...] += np.matmul(p.numpy(), values.numpy().transpose(0, 2, 1, 3))
        else:
            acc.add_(torch.matmul(p, values.transpose(1, 2).contiguous()))
