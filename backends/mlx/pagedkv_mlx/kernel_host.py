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
* **prefill** loops over sequences (its work is quadratic in length, the loop
  is free): it gathers the sequence's visible K/V once, then runs query tiles
  whose scores fit the budget, each over the keys it can see. With a chunk
  size, tiles end at chunk boundaries, so a tile's keys are its own chunk's.

Attention sinks (one logit per query head) join each softmax's denominator
as ``exp(sink - max)``, the max taken over the scores and the sink.

GQA never repeats K/V: query heads are viewed as ``[num_kv_heads, group]``.
Scores and softmax are float32; float16/bfloat16/int8 blocks are converted
(int8 dequantized with its per-(block, head) scales) in the gathered tile.
"""

from __future__ import annotations

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.attention import AttentionParams

from .arrays import bf16_bits_to_f32
from .layout import BatchLayout, first_visible

__all__ = ["HostKernel", "TILE_BYTES", "SCORE_ELEMS"]

TILE_BYTES = 1 << 20
"""Bytes (float32) of one gathered decode tile of K or V: about one L2 cache."""
SCORE_ELEMS = 1 << 22
"""Float32 elements of one score buffer (16 MiB): bounds decode row groups and prefill query tiles."""


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


class HostKernel:
    """Runs one layer of a planned batch on NumPy views; the plan builds it once per step."""

    def __init__(self, layout: BatchLayout, config: CacheConfig, params: AttentionParams, bf16: bool) -> None:
        self.layout, self.config, self.params = layout, config, params
        self.decode = layout.max_queries <= 1
        self._gather_k = _Gather(config, bf16)
        self._gather_v = _Gather(config, bf16)
        self._hidden = layout.hidden(slice(None), 0, 1) if self.decode else None  # [rows, 1, width * bs]

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

    def _decode(self, q: np.ndarray, mult: float, k: tuple, v: tuple, out: np.ndarray,
                sink: np.ndarray | None) -> None:
        lay, c = self.layout, self.config
        h, d, bs = c.num_kv_heads, c.head_dim, c.block_size
        num_q_heads = q.shape[1]
        group, slots = num_q_heads // h, lay.width * bs
        block_bytes = bs * h * d * 4
        per_group = max(1, SCORE_ELEMS // (num_q_heads * slots))
        for g0 in range(0, lay.rows, per_group):
            g1 = min(lay.rows, g0 + per_group)
            rows, ids, nblocks = g1 - g0, lay.ids[g0:g1], lay.num_blocks[g0:g1]
            qg = np.multiply(q[lay.q_start[g0:g1]], mult, dtype=np.float32).reshape(rows, h, group, d)
            tile_rows = max(1, min(rows, TILE_BYTES // block_bytes))
            tile_cols = max(1, TILE_BYTES // (tile_rows * block_bytes))
            tiles = []
            for c0 in range(0, lay.width, tile_cols):
                c1 = min(lay.width, c0 + tile_cols)
                active = int(np.count_nonzero(nblocks > c0))  # rows are sorted: a prefix is active
                tiles += [(r0, min(active, r0 + tile_rows), c0, c1) for r0 in range(0, active, tile_rows)]
            s = np.empty((rows, h, group, slots), np.float32)  # slots no tile writes are masked below
            for r0, r1, c0, c1 in tiles:
                keys = self._gather_k(*k, ids[r0:r1, c0:c1]).reshape(r1 - r0, -1, h, d)
                np.matmul(qg[r0:r1], keys.transpose(0, 2, 3, 1), out=s[r0:r1, :, :, c0 * bs:c1 * bs])
            denom = self._softmax(s, self._hidden[g0:g1, :, None, :], sink)
            acc = np.zeros((rows, h, group, d), np.float32)
            part = np.empty_like(acc)
            for r0, r1, c0, c1 in tiles:
                values = self._gather_v(*v, ids[r0:r1, c0:c1]).reshape(r1 - r0, -1, h, d)
                np.matmul(s[r0:r1, :, :, c0 * bs:c1 * bs], values.transpose(0, 2, 1, 3), out=part[r0:r1])
                acc[r0:r1] += part[r0:r1]
            acc /= denom
            out[lay.q_start[g0:g1]] = acc.reshape(rows, num_q_heads, d)

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
