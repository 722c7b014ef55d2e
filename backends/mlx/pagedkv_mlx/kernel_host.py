"""The ``host`` attention kernel: NumPy over zero-copy views of the MLX pools (the ``cpu`` default).

Why NumPy on MLX's CPU device: measured on Linux (``docs/benchmarks-mlx.md``), MLX's
CPU gather (``mx.take`` or integer indexing) moves at most about 1.5 GB/s, so gathering
a batch's K/V cost more than the attention, and the fused SDPA falls back to
unfused CPU ops. NumPy reads the pools in place through the buffer protocol
(no copy), gathers whole blocks with ``np.take`` into a tile that stays in
the L2 cache, and multiplies it while hot, so the pool is read from memory
once. On unified memory (Apple silicon) the views cost nothing either; there
the ``gpu`` device uses :mod:`pagedkv_mlx.kernel_mlx` instead.

* **decode** runs rows (sequences, most visible blocks first) in groups whose
  score buffer fits a budget, and tiles each group's visible blocks by
  columns; a ragged batch gathers only the rows still active in a column.
  A tile reads whole blocks, so it also reads slots its row must not see:
  the unused tail of a sequence's last block and the padding (block 0) of a
  row shorter than the tile. They hold whatever another sequence or a
  previous owner left, possibly NaN or Inf, which a weight of 0 does not
  cancel (``0 * NaN = NaN``): the gathered K and V are zeroed there before
  the matmuls (exactly those slots, planned once per step; a tile of full
  blocks costs nothing extra), and their scores are ``-inf``.
* **prefill** loops over sequences (its work is quadratic in length, the loop
  is free): it gathers the sequence's visible K/V once, then runs query tiles
  whose scores fit the budget, each over the keys it can see. With a chunk
  size, tiles end at chunk boundaries, so a tile's keys are its own chunk's.

Attention sinks (one logit per query head) join each softmax's denominator
as ``exp(sink - max)``, the max taken over the scores and the sink.

GQA never repeats K/V: query heads are viewed as ``[num_kv_heads, group]``.
Scores and softmax are float32; float16/bfloat16/int8 blocks are converted
(int8 dequantized with its per-(block, head) scales) in the gathered tile.
NumPy has no bfloat16, and widening a gathered bfloat16 tile in place order
costs two passes over the full float32 tile, which made bfloat16 decode
about 2x slower than float32. So bfloat16 decode (even head dims) gathers the
pool as uint32 words of two dims each and splits them into even and odd
head-dim halves, each an exact float32 array made by one contiguous pass
over half the data (:meth:`_Gather.split`); the query is split the same
way, and every matmul runs over both halves at once. Prefill, compute-bound,
widens the tile as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.attention import AttentionParams
from pagedkv_core.contract.tiles import HiddenParts, clear_hidden, hidden_parts

from .arrays import bf16_bits_to_f32
from .layout import BatchLayout, first_visible

__all__ = ["HostKernel", "TILE_BYTES", "SCORE_ELEMS"]

TILE_BYTES = 1 << 20
"""Bytes (float32) of one gathered decode tile of K or V: about one L2 cache."""
SCORE_ELEMS = 1 << 22
"""Float32 elements of one score buffer (16 MiB): bounds decode row groups and prefill query tiles."""


_HIGH_HALF = np.uint32(0xFFFF0000)
"""Keeps the high bfloat16 of a uint32 word of two: the odd dim's float32 bits."""


class _Gather:
    """Gathers whole blocks of a flat pool ``[num_blocks, elems]`` into float32 scratch.

    ``bf16`` says the pool holds bfloat16 bits (uint16); ``scales`` (int8
    pools) are ``[num_blocks, num_kv_heads]``.
    """

    def __init__(self, config: CacheConfig, bf16: bool) -> None:
        self.block_shape = (config.block_size, config.num_kv_heads, config.head_dim)
        self.elems = int(np.prod(self.block_shape))
        self.bf16 = bf16
        self._raw: np.ndarray | None = None
        self._f32 = np.empty(0, np.float32)
        self._halves = np.empty((2, 0), np.uint32)  # split(): even dims, and the gathered words -> odd dims
        self._views: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}  # split()'s views of it, by ids shape

    def __call__(self, pool: np.ndarray, scales: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
        """Blocks ``ids [...]`` as float32 ``[..., block_size, num_kv_heads, head_dim]`` (scratch: use before the next call)."""
        n = ids.size * self.elems
        shape = (*ids.shape, *self.block_shape)
        if self._raw is None or self._raw.dtype != pool.dtype or self._raw.size < n:
            self._raw = np.empty(max(n, self.elems), pool.dtype)
        raw = self._raw[:n].reshape(*ids.shape, self.elems)
        np.take(pool, ids, axis=0, out=raw, mode="clip")  # clip: no buffering; MlxPlan bounds-checked the ids
        if pool.dtype == np.float32:
            return raw.reshape(shape)
        if self._f32.size < n:
            self._f32 = np.empty(n, np.float32)
        out = self._f32[:n].reshape(shape)
        if self.bf16:
            bf16_bits_to_f32(raw.reshape(shape), out=out)
        else:
            np.copyto(out, raw.reshape(shape))
        if scales is not None:
            out *= np.take(scales, ids, axis=0, mode="clip")[..., None, :, None]
        return out

    def split(self, words: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Blocks ``ids [rows, cols]`` of a bfloat16 pool as float32 head-dim halves (scratch, as ``__call__``).

        ``words [num_blocks, elems / 2]``: the pool's uint16 bits viewed as
        uint32, so word ``j`` of a (token, head) holds dims ``2j`` (low half)
        and ``2j + 1`` (high half). Returns ``[2, rows, cols * block_size,
        num_kv_heads, head_dim / 2]``: ``[0]`` the even dims (the words
        shifted left by 16), ``[1]`` the odd dims (the words with their low
        half cleared, in place), both exact float32 bit patterns.

        Why halves: widening a gathered tile to float32 in its own order (a
        uint16 -> uint32 cast, then a shift) takes two passes over the
        full-size tile, and NumPy has no single pass that interleaves; these
        are two contiguous passes over half-size arrays, so the tile is ready
        for about what the float32 gather alone costs. The decode contracts
        each half with the matching half of the query (:meth:`HostKernel._decode`).
        """
        views = self._views.get(ids.shape)
        if views is None:  # a decode has a few tile shapes, each run once per layer: make their views once
            half = self.elems // 2
            n = ids.size * half
            if self._halves.shape[1] < n:
                self._halves = np.empty((2, n), np.uint32)
                self._views.clear()
            even, odd = self._halves[0, :n], self._halves[1, :n]
            _, heads, d = self.block_shape
            halves = self._halves[:, :n].view(np.float32).reshape(2, ids.shape[0], -1, heads, d // 2)
            views = self._views[ids.shape] = (odd.reshape(*ids.shape, half), even, odd, halves)
        gathered, even, odd, halves = views
        np.take(words, ids, axis=0, out=gathered, mode="clip")  # clip: no buffering; MlxPlan bounds-checked the ids
        np.left_shift(odd, 16, out=even)
        np.bitwise_and(odd, _HIGH_HALF, out=odd)
        return halves


@dataclass(frozen=True, slots=True)
class _DecodeGroup:
    """Rows ``g0:g1`` of the layout decoded together, their tiles and each tile's hidden parts.

    ``tiles[i] = (r0, r1, c0, c1)``: rows ``r0:r1`` of the group (the rows
    still active at column ``c0``) and visible-block columns ``c0:c1``;
    ``clears[i]``: what to zero in that tile's gathered K and V.
    """

    g0: int
    g1: int
    tiles: tuple[tuple[int, int, int, int], ...]
    clears: tuple[HiddenParts, ...]


class HostKernel:
    """Runs one layer of a planned batch on NumPy views; the plan builds it once per step."""

    def __init__(self, layout: BatchLayout, config: CacheConfig, params: AttentionParams, bf16: bool) -> None:
        self.layout, self.config, self.params = layout, config, params
        self.decode = layout.max_queries <= 1
        self._gather_k = _Gather(config, bf16)
        self._gather_v = _Gather(config, bf16)
        self._hidden = layout.hidden(slice(None), 0, 1) if self.decode else None  # [rows, 1, width * bs]
        self._groups: dict[int, list[_DecodeGroup]] = {}  # decode groups by number of query heads
        # bfloat16 decode tiles come as even/odd head-dim halves, each converted in one contiguous pass
        self._split = bf16 and self.decode and config.head_dim % 2 == 0

    def _decode_groups(self, num_q_heads: int) -> list[_DecodeGroup]:
        """Row groups (score buffer within ``SCORE_ELEMS``) and their tiles (about ``TILE_BYTES`` of K each).

        They depend on the batch and the number of query heads only, so they
        are planned on the first layer's run and reused by the others.
        """
        if num_q_heads in self._groups:
            return self._groups[num_q_heads]
        lay, c = self.layout, self.config
        h, d, bs = c.num_kv_heads, c.head_dim, c.block_size
        assert self._hidden is not None
        hidden = self._hidden[:, 0]  # [rows, width * bs]
        block_bytes = bs * h * d * 4
        per_group = max(1, SCORE_ELEMS // (num_q_heads * lay.width * bs))
        groups = []
        for g0 in range(0, lay.rows, per_group):
            g1 = min(lay.rows, g0 + per_group)
            rows, nblocks = g1 - g0, lay.num_blocks[g0:g1]
            tile_rows = max(1, min(rows, TILE_BYTES // block_bytes))
            tile_cols = max(1, TILE_BYTES // (tile_rows * block_bytes))
            tiles = []
            for c0 in range(0, lay.width, tile_cols):
                c1 = min(lay.width, c0 + tile_cols)
                active = int(np.count_nonzero(nblocks > c0))  # rows are sorted: a prefix is active
                tiles += [(r0, min(active, r0 + tile_rows), c0, c1) for r0 in range(0, active, tile_rows)]
            clears = tuple(hidden_parts(hidden[g0 + r0:g0 + r1, c0 * bs:c1 * bs], bs) for r0, r1, c0, c1 in tiles)
            groups.append(_DecodeGroup(g0, g1, tuple(tiles), clears))
        self._groups[num_q_heads] = groups
        return groups

    def run(self, q: np.ndarray, pools: tuple[np.ndarray, np.ndarray],
            scales: tuple[np.ndarray, np.ndarray] | None, out: np.ndarray,
            sinks: np.ndarray | None = None) -> None:
        """Attention of float32 ``q [num_queries, num_q_heads, d]`` into float32 ``out`` (same shape).

        ``pools``: one layer's K and V ``[num_blocks, block_size, heads, d]``
        as stored (float32/float16, uint16 bfloat16 bits, int8); ``scales``:
        float32 ``[num_blocks, heads]`` each for int8 pools, else ``None``;
        ``sinks``: float32 ``[num_q_heads]`` sink logits (validated), or ``None``.
        """
        k, v = (p.reshape(p.shape[0], -1) for p in pools)
        ks, vs = (None, None) if scales is None else scales
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        sink = None if sinks is None else sinks.reshape(self.config.num_kv_heads, -1)  # [heads, group]
        if self.decode:
            if self._split:  # bfloat16 bits as uint32 words of two dims each (_Gather.split)
                k, v = k.view(np.uint32), v.view(np.uint32)
            self._decode(q, mult, (k, ks), (v, vs), out, None if sink is None else sink[None, :, :, None])
        else:
            self._prefill(q, mult, (k, ks), (v, vs), out, None if sink is None else sink[:, None, :, None])

    def _softmax(self, s: np.ndarray, hidden: np.ndarray, sink: np.ndarray | None) -> np.ndarray:
        """Soft-cap, mask and exponentiate ``s [..., keys]`` in place; return the row sums.

        ``sink`` (broadcastable to ``s[..., :1]``): the sink logits, which
        count in the max and the sums but bring no value.
        """
        if self.params.soft_cap is not None:
            np.tanh(s, out=s)
            s *= self.params.soft_cap
        np.copyto(s, -np.inf, where=hidden)
        top = s.max(axis=-1, keepdims=True)
        if sink is not None:
            top = np.maximum(top, sink)
        s -= top
        np.exp(s, out=s)
        denom = s.sum(axis=-1, keepdims=True)
        if sink is not None:
            denom += np.exp(sink - top)
        return denom

    def _tile(self, gather: _Gather, kv: tuple[np.ndarray, np.ndarray | None], ids: np.ndarray,
              clear: HiddenParts) -> np.ndarray:
        """One gathered decode tile of K or V, hidden slots zeroed.

        ``[rows, slots, heads, d]`` float32; a split bfloat16 pool's come as
        ``[2, rows, slots, heads, d / 2]`` head-dim halves (:meth:`_Gather.split`,
        ``kv[0]`` then being the pool's uint32 words).
        """
        pool, scales = kv
        if self._split:
            halves = gather.split(pool, ids)
            if clear is not None:
                clear_hidden(halves[0], clear, self.config.block_size)
                clear_hidden(halves[1], clear, self.config.block_size)
            return halves
        c = self.config
        return clear_hidden(gather(pool, scales, ids).reshape(ids.shape[0], -1, c.num_kv_heads, c.head_dim), clear,
                      c.block_size)

    def _decode(self, q: np.ndarray, mult: float, k: tuple, v: tuple, out: np.ndarray,
                sink: np.ndarray | None) -> None:
        """Decode groups into ``out``.

        With split bfloat16 tiles (``[2, ...]`` head-dim halves) the query is
        split the same way and each matmul runs over both halves at once: the
        two halves' scores add up to the scores, their values give the even
        and odd dims of the output, interleaved at the end.
        """
        lay, c = self.layout, self.config
        h, d, bs = c.num_kv_heads, c.head_dim, c.block_size
        num_q_heads = q.shape[1]
        group, slots = num_q_heads // h, lay.width * bs
        split = self._split
        assert self._hidden is not None
        for g in self._decode_groups(num_q_heads):
            rows, ids = g.g1 - g.g0, lay.ids[g.g0:g.g1]
            qg = np.multiply(q[lay.q_start[g.g0:g.g1]], mult, dtype=np.float32).reshape(rows, h, group, d)
            s = np.empty((rows, h, group, slots), np.float32)  # slots no tile writes are masked below
            if split:  # [2, rows, h, group, d / 2] query halves; one tile's scores of each half
                qg = np.stack((qg[..., 0::2], qg[..., 1::2]))
                widest = max((r1 - r0, c1 - c0) for r0, r1, c0, c1 in g.tiles)
                pair = np.empty((2, widest[0], h, group, widest[1] * bs), np.float32)
            for (r0, r1, c0, c1), clear in zip(g.tiles, g.clears):
                cols = slice(c0 * bs, c1 * bs)
                keys = self._tile(self._gather_k, k, ids[r0:r1, c0:c1], clear)
                if split:
                    both = pair[:, :r1 - r0, :, :, :(c1 - c0) * bs]
                    np.matmul(qg[:, r0:r1], keys.transpose(0, 1, 3, 4, 2), out=both)
                    np.add(both[0], both[1], out=s[r0:r1, :, :, cols])
                else:
                    np.matmul(qg[r0:r1], keys.transpose(0, 2, 3, 1), out=s[r0:r1, :, :, cols])
            denom = self._softmax(s, self._hidden[g.g0:g.g1, :, None, :], sink)
            shape = (2, rows, h, group, d // 2) if split else (rows, h, group, d)
            acc = np.empty(shape, np.float32)
            part = np.empty_like(acc)
            for (r0, r1, c0, c1), clear in zip(g.tiles, g.clears):
                values = self._tile(self._gather_v, v, ids[r0:r1, c0:c1], clear)
                weights = s[r0:r1, :, :, c0 * bs:c1 * bs]
                first = c0 == 0  # the first column of tiles writes the accumulator, the others add to it
                target = (acc if first else part)[..., r0:r1, :, :, :]
                np.matmul(weights, values.swapaxes(-2, -3), out=target)
                if not first:
                    acc[..., r0:r1, :, :, :] += target
            if split:
                halves, acc = acc, np.empty((rows, h, group, d), np.float32)
                acc[..., 0::2], acc[..., 1::2] = halves
            acc /= denom
            out[lay.q_start[g.g0:g.g1]] = acc.reshape(rows, num_q_heads, d)

    def _prefill(self, q: np.ndarray, mult: float, k: tuple, v: tuple, out: np.ndarray,
                 sink: np.ndarray | None) -> None:
        lay, c, p = self.layout, self.config, self.params
        h, d, bs = c.num_kv_heads, c.head_dim, c.block_size
        num_q_heads = q.shape[1]
        group = num_q_heads // h
        upper, chunk = p.causal or p.sliding_window is not None, p.chunk_size
        for r in range(lay.rows):
            n, seq_len, q0 = int(lay.q_count[r]), int(lay.seq_len[r]), int(lay.q_start[r])
            nb, key0 = int(lay.num_blocks[r]), int(lay.first_block[r]) * bs
            ids = lay.ids[r, :nb]
            keys = self._gather_k(*k, ids).reshape(-1, h, d).transpose(1, 2, 0)  # [h, d, slots]
            values = self._gather_v(*v, ids).reshape(-1, h, d).transpose(1, 0, 2)  # [h, slots, d]
            qh = np.multiply(q[q0:q0 + n].reshape(n, h, group, d).transpose(1, 0, 2, 3), mult, dtype=np.float32)
            tile = max(1, SCORE_ELEMS // (num_q_heads * nb * bs))
            i0 = 0
            while i0 < n:
                t_lo = seq_len - n + i0
                i1 = min(n, i0 + tile)
                if chunk is not None:  # end the tile at its chunk's end: its keys are that one chunk's
                    i1 = min(i1, (t_lo // chunk + 1) * chunk - (seq_len - n))
                t_hi = seq_len - n + i1 - 1
                last = seq_len if chunk is None else min(seq_len, (t_lo // chunk + 1) * chunk)
                j1 = (t_hi + 1 if upper else last) - key0
                j0 = max(0, int(first_visible(np.asarray(t_lo), p)) - key0)
                s = np.matmul(qh[:, i0:i1].reshape(h, -1, d), keys[:, :, j0:j1])  # [h, (i, g), keys]
                s = s.reshape(h, i1 - i0, group, j1 - j0)
                hidden = lay.hidden(slice(r, r + 1), i0, i1, width=nb)[0, :, j0:j1]
                denom = self._softmax(s, hidden[None, :, None, :], sink)
                acc = np.matmul(s.reshape(h, -1, j1 - j0), values[:, j0:j1]).reshape(h, i1 - i0, group, d)
                acc /= denom
                out[q0 + i0:q0 + i1] = acc.transpose(1, 0, 2, 3).reshape(i1 - i0, num_q_heads, d)
                i0 = i1
