"""The ``mlx`` attention kernel: a graph of MLX operations (the ``gpu`` default).

The batch's visible blocks are gathered through the padded block table
(integer indexing of the pool, one gather for all rows), laid out as
``[rows, num_kv_heads, keys, head_dim]`` and handed to
``mx.fast.scaled_dot_product_attention`` with a boolean mask: GQA is native
there (K/V are never repeated) and its softmax is float32 whatever the input
dtype. A soft-cap has to act on the scores, which the fused kernel never
exposes, so with ``soft_cap`` the scores are computed by a grouped matmul
(query heads viewed as ``[num_kv_heads, group]``) in float32.

Attention sinks go to the fused kernel's ``sinks`` argument where this MLX
has one (0.29 and later) and the sink logits are exact in the attention's
dtype (the kernel takes them in q's dtype; rounding a float32 logit to
bfloat16 would change the result); otherwise, and with a soft-cap, the
grouped float32 path adds ``exp(sink - max)`` to its denominator. A
chunk size only changes the mask and which blocks the layout keeps.

Queries are padded per row to the longest row and processed in tiles whose
score matrix fits a budget, so a long prefill never materialises all scores.

The gather reads every row's ``width`` blocks whole: the unused tail of a
sequence's last block and a short row's padding (block 0) come along, and
they hold whatever another sequence or a previous owner left, possibly NaN
or Inf. The mask gives them weight 0, but ``0 * NaN`` is NaN, so the
gathered K and V are zeroed (``mx.where``) in every slot no query of the
row sees; a batch with no such slot (full last blocks, equal lengths, no
window) skips that pass.

Evaluation point: ``run`` evaluates the gathered K/V before building the
attention, which releases the pools (see :mod:`pagedkv_mlx.storage`); the
output is returned lazily so MLX can fuse it with what the caller does next.
On Linux's CPU device this kernel is correct but slow (MLX's CPU gather);
``docs/benchmarks-mlx.md`` has the figures.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.attention import AttentionParams

from .int8 import dequantize_blocks
from .layout import BatchLayout

__all__ = ["GraphKernel", "TILE_SLOTS", "fused_takes_sinks"]

Array = Any  # mx.array

TILE_SLOTS = 1 << 19
"""(query, key slot) pairs of one query tile over all rows; its float32 scores take this x num_q_heads x 4 bytes."""


@cache
def fused_takes_sinks() -> bool:
    """Whether this MLX's ``mx.fast.scaled_dot_product_attention`` has the ``sinks`` argument (MLX >= 0.29).

    An older one refuses the keyword when called, before building anything.
    """
    z = mx.zeros((1, 1, 1, 1))
    try:
        mx.fast.scaled_dot_product_attention(z, z, z, scale=1.0, sinks=mx.zeros((1,)))
    except TypeError:
        return False
    return True


class GraphKernel:
    """Runs one layer of a planned batch as MLX operations; the plan builds it once per step."""

    def __init__(self, layout: BatchLayout, config: CacheConfig, params: AttentionParams, cpu: bool) -> None:
        self.layout, self.config, self.params, self.cpu = layout, config, params, cpu
        bs = config.block_size
        self.ids = mx.array(layout.ids.astype(np.int32))  # [rows, width]
        rows, qmax = layout.rows, layout.max_queries
        keys = max(1, layout.width * bs)
        self.q_tile = max(1, min(qmax, TILE_SLOTS // (keys * rows)))
        i = np.arange(qmax)[None, :]
        valid = i < layout.q_count[:, None]  # [rows, qmax]
        self.q_rows = mx.array(np.where(valid, layout.q_start[:, None] + i, 0).astype(np.int32))
        self.tiles = [(q0, min(qmax, q0 + self.q_tile)) for q0 in range(0, qmax, self.q_tile)]
        hidden = [layout.hidden(slice(None), q0, q1) for q0, q1 in self.tiles]  # [rows, qt, keys] each
        self.visible = [mx.array(~part)[:, None] for part in hidden]
        unseen = np.logical_and.reduce([part.all(axis=1) for part in hidden])  # [rows, keys]: no query sees it
        # K/V [rows, heads, keys, d] are zeroed where False; None: every slot is seen by some query
        self.seen = mx.array(~unseen)[:, None, :, None] if unseen.any() else None
        # output row j of q comes from padded position (row, i) of the tiles' concatenation
        order = np.empty(int(valid.sum()), np.int64)
        order[(layout.q_start[:, None] + i)[valid]] = np.flatnonzero(valid.reshape(-1))
        self.order = mx.array(order.astype(np.int32))

    def _kv(self, pool: Array, scales: Array | None, layer: int, dtype: Any) -> Array:
        """Gather the rows' blocks: ``[rows, num_kv_heads, width * block_size, head_dim]`` in ``dtype``.

        ``pool [num_layers, num_blocks, block_size, heads, d]``, ``scales
        [num_layers, num_blocks, heads]``: indexing layer and blocks in one
        step gathers about 2.5x faster on MLX's CPU than from a layer slice.
        """
        c = self.config
        blocks = pool[layer, self.ids]  # [rows, width, bs, heads, d]
        if scales is not None:
            blocks = dequantize_blocks(blocks, scales[layer, self.ids])
        rows = self.layout.rows
        kv = blocks.astype(dtype).reshape(rows, -1, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        if self.seen is not None:  # slots no query sees may hold NaN/Inf, which a weight of 0 does not cancel
            kv = mx.where(self.seen, kv, mx.array(0, dtype))
        # MLX's CPU SDPA runs several times slower on this strided view than a copy plus the contiguous case
        return mx.contiguous(kv) if self.cpu else kv

    def run(self, q: Array, pools: tuple[Array, Array], scales: tuple[Array, Array] | None, layer: int,
            sinks: np.ndarray | None = None) -> Array:
        """``q [num_queries, num_q_heads, d]`` (MLX) over ``layer`` of the whole ``pools`` (and int8 ``scales``).

        ``sinks``: float32 NumPy ``[num_q_heads]`` sink logits (validated),
        or ``None``. Returns the output in ``q``'s dtype, lazily. For float
        pools the attention runs in the pool dtype (float32 softmax); int8
        pools, a soft-cap, and sinks the fused kernel cannot take exactly
        run in float32.
        """
        p = self.params
        quantized = scales is not None
        dtype = mx.float32 if quantized or p.soft_cap is not None else pools[0].dtype
        fused = p.soft_cap is None and (sinks is None or self._fused_sinks_exact(sinks, dtype))
        if not fused:
            dtype = mx.float32
        sink = None if sinks is None else mx.array(sinks).astype(dtype)
        ks, vs = (None, None) if scales is None else scales
        k, v = self._kv(pools[0], ks, layer, dtype), self._kv(pools[1], vs, layer, dtype)
        mx.eval(k, v)  # the reads of the pools are done: nothing holds them any more
        num_q_heads, d = q.shape[1], q.shape[2]
        qc = q.astype(dtype)
        parts = []
        for (q0, q1), visible in zip(self.tiles, self.visible):
            qt = qc[self.q_rows[:, q0:q1]].transpose(0, 2, 1, 3)  # [rows, q_heads, qt, d]
            if not fused:
                o = self._grouped(qt, k, v, visible, sink)
            elif sink is None:
                o = mx.fast.scaled_dot_product_attention(qt, k, v, scale=p.scale, mask=visible)
            else:
                o = mx.fast.scaled_dot_product_attention(qt, k, v, scale=p.scale, mask=visible, sinks=sink)
            parts.append(o.transpose(0, 2, 1, 3))  # [rows, qt, q_heads, d]
        o = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        return o.reshape(-1, num_q_heads, d)[self.order].astype(q.dtype)

    @staticmethod
    def _fused_sinks_exact(sinks: np.ndarray, dtype: Any) -> bool:
        """Whether the fused kernel can take ``sinks`` in ``dtype`` (it has the argument, and no logit rounds)."""
        if not fused_takes_sinks():
            return False
        return bool((np.array(mx.array(sinks).astype(dtype).astype(mx.float32)) == sinks).all())

    def _grouped(self, qt: Array, k: Array, v: Array, visible: Array, sink: Array | None) -> Array:
        """Attention by grouped matmul in float32, with the soft-cap and sinks: ``qt [rows, q_heads, n, d]`` -> same."""
        p, h = self.params, self.config.num_kv_heads
        rows, num_q_heads, n, d = qt.shape
        group = num_q_heads // h
        qg = qt.reshape(rows, h, group * n, d)
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        s = (qg @ k.swapaxes(-1, -2)) * mult  # [rows, h, group * n, keys]
        if p.soft_cap is not None:
            s = p.soft_cap * mx.tanh(s)
        s = mx.where(visible[:, :, None], s.reshape(rows, h, group, n, -1), -mx.inf)
        if sink is None:
            w = mx.softmax(s, axis=-1)
        else:  # the sink counts in the max and the denominator, and brings no value
            logit = sink.reshape(1, h, group, 1, 1)
            top = mx.maximum(mx.max(s, axis=-1, keepdims=True), logit)
            e = mx.exp(s - top)
            w = e / (mx.sum(e, axis=-1, keepdims=True) + mx.exp(logit - top))
        return (w.reshape(rows, h, group * n, -1) @ v).reshape(rows, num_q_heads, n, d)
