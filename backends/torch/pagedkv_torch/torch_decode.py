"""Paged decode with torch ops (the CPU kernel; also the fallback on CUDA/MPS without Triton).

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

On the CPU the per-tile matmuls go through NumPy on zero-copy views of the
same buffers: for these shapes (4 x 128 times 128 x 64 per sequence and KV
head) NumPy's matmul runs two to three times faster than ``torch.bmm``
(measured in docs/benchmarks-torch.md). Other devices use ``torch.matmul`` on a
head-major copy of the tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedkv_core.attention import AttentionParams, BatchIndex

from .convert import take
from .plan_base import TorchPlanBase
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


@dataclass(frozen=True, slots=True)
class _Group:
    """Rows decoded together: ``rows`` (original batch positions), ``width`` visible blocks of the longest."""

    rows: torch.Tensor
    width: int
    hidden: torch.Tensor  # bool [rows, width * block_size]: slots a row must not see
    tiles: tuple[_Tile, ...]


class TorchDecodePlan(TorchPlanBase):
    """One decode step: tiles, gather ids and masks are computed once; ``run`` per layer."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 tile_bytes: int = DEFAULT_TILE_BYTES) -> None:
        super().__init__(storage, index, params)
        bs, w = self.block_size, params.sliding_window
        t = index.seq_lens - 1  # each query's position
        first = np.zeros_like(t) if w is None else np.maximum(t - w + 1, 0) // bs
        nvis = t // bs + 1 - first
        order = np.argsort(-nvis, kind="stable")
        t, first, nvis = t[order], first[order], nvis[order]
        self.block_bytes = bs * self.num_kv_heads * self.head_dim * 4
        self.tile_rows = max(1, min(max(1, index.batch), tile_bytes // self.block_bytes))
        self.tile_cols = max(1, tile_bytes // (self.tile_rows * self.block_bytes))
        self.groups: list[_Group] = []
        r = 0
        while r < index.batch:
            width = int(nvis[r])
            end = r + max(1, min(index.batch - r, GROUP_SLOTS // (width * bs)))
            self.groups.append(self._group(order[r:end], t[r:end], first[r:end], nvis[r:end]))
            r = end
        self.on_cpu = self.device.type == "cpu"

    def _group(self, rows: np.ndarray, t: np.ndarray, first: np.ndarray, nvis: np.ndarray) -> _Group:
        bs, w, dev = self.block_size, self.params.sliding_window, self.device
        tables = self.index.block_tables[rows]
        width = int(nvis[0])
        cols = first[:, None] + np.arange(width)[None, :]
        used = np.arange(width)[None, :] < nvis[:, None]
        ids = np.where(used, np.take_along_axis(tables, np.minimum(cols, tables.shape[1] - 1), axis=1), 0)
        pos = first[:, None] * bs + np.arange(width * bs)[None, :]
        hidden = pos > t[:, None]
        if w is not None:
            hidden |= pos <= t[:, None] - w
        tiles = []
        for c0 in range(0, width, self.tile_cols):
            c1 = min(width, c0 + self.tile_cols)
            active = int(np.count_nonzero(nvis > c0))  # sorted: the rows that reach column c0 come first
            for r0 in range(0, active, self.tile_rows):
                r1 = min(active, r0 + self.tile_rows)
                tile_ids = torch.from_numpy(np.ascontiguousarray(ids[r0:r1, c0:c1]).reshape(-1)).to(dev)
                tiles.append(_Tile(r0, r1, c0, c1, tile_ids))
        return _Group(torch.from_numpy(rows).to(dev), width, torch.from_numpy(hidden).to(dev), tuple(tiles))

    @torch.no_grad()
    def run(self, q, layer: int) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype."""
        q, layer, num_q_heads = self.check(q, layer)
        out = torch.empty_like(q)
        pools, scales = self.storage.pools(layer), self.storage.scales(layer)
        for group in self.groups:
            out[group.rows] = self._run_group(group, q, num_q_heads, pools, scales).to(q.dtype)
        return out

    def _run_group(self, g: _Group, q: torch.Tensor, num_q_heads: int, pools, scales) -> torch.Tensor:
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
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        total = s.sum(dim=-1, keepdim=True)
        acc = torch.zeros(rows, kv, group, dim, dtype=torch.float32, device=self.device)
        for tile in g.tiles:  # V pass
            values = self._tile(pools[1], None if scales is None else scales[1], tile)
            self._accumulate(acc[tile.r0:tile.r1], s[tile.r0:tile.r1, :, :, tile.c0 * bs:tile.c1 * bs], values)
        return (acc / total).view(rows, num_q_heads, dim)

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
        shape = (self.tile_rows * self.tile_cols, self.block_size, self.num_kv_heads, self.head_dim)
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
