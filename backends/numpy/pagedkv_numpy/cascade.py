"""Cascade (shared-prefix) decode over NumPy pools: a group's shared blocks are read once for all its queries.

Without it, 32 sequences that share a 2,048-token prompt read those keys 32
times, each time in a matrix-vector product. Here a group's shared blocks
are gathered once and multiplied with all the group's queries at once (one
matrix-matrix product per KV head, where BLAS runs near its peak); each
sequence then attends over its own suffix, and the two partial results are
merged with their log-sum-exps (FlashInfer's ``merge_state``), attention
sinks joining the denominator once. Rows in no group run the ordinary
decode plan. Quantized pools are planned the ordinary way (same result).
"""

from __future__ import annotations

import numpy as np

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionParams, BatchIndex, check_query
from pagedkv_core.errors import DTypeMismatch

from .attention import sink_logits
from .storage import NumpyStorage

__all__ = ["NumpyCascadePlan"]

KEY_TILE = 1024
"""Keys per step of the online softmax: bounds the score buffer to heads x queries x KEY_TILE."""


def _heads_first(pool: np.ndarray, ids: np.ndarray, h: int, d: int, dtype: type) -> np.ndarray:
    """The blocks ``ids`` of a pool as one contiguous ``[h, tokens, d]`` array (what BLAS reads fastest)."""
    return np.ascontiguousarray(pool[ids].reshape(-1, h, d).transpose(1, 0, 2), dtype=dtype)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, soft_cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of ``q [h, n, d]`` (already scaled) over ``k, v [h, L, d]``: (``out [h, n, d]``, ``lse [h, n]``).

    Tiled online softmax; ``L = 0`` gives zeros and ``lse = -inf`` (no keys).
    ``k`` is read through a transposed view, which BLAS takes without a copy.
    """
    h, n, d = q.shape
    m = np.full((h, n), -np.inf, q.dtype)
    denom = np.zeros((h, n), q.dtype)
    acc = np.zeros((h, n, d), q.dtype)
    for t0 in range(0, k.shape[1], KEY_TILE):
        s = q @ k[:, t0:t0 + KEY_TILE].transpose(0, 2, 1)
        if soft_cap is not None:
            np.tanh(s, out=s)
            s *= soft_cap
        m_new = np.maximum(m, s.max(axis=-1))
        correction = np.exp(m - m_new)
        s -= m_new[..., None]
        np.exp(s, out=s)
        denom = denom * correction + s.sum(axis=-1)
        acc = acc * correction[..., None] + s @ v[:, t0:t0 + KEY_TILE]
        m = m_new
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom[..., None] > 0, acc / denom[..., None], 0)
        lse = m + np.log(denom)
    return out, lse


def _suffix_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, hidden: np.ndarray | None,
                   soft_cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Every grouped row over its own suffix at once: ``q [r, h, rep, d]``, ``k, v [r, h, T, d]``.

    ``hidden [r, 1, 1, T]``: slots a row does not own (its suffix is shorter,
    or they precede its first own token); their scores are -inf and their
    values zero, so a NaN left there by another owner cannot leak.
    Returns (``out [r, h, rep, d]``, ``lse [r, h, rep]``).
    """
    s = q @ k.transpose(0, 1, 3, 2)
    if soft_cap is not None:
        np.tanh(s, out=s)
        s *= soft_cap
    if hidden is not None:
        s = np.where(hidden, -np.inf, s)
        v = np.where(hidden.transpose(0, 1, 3, 2), 0, v)
    top = s.max(axis=-1)
    finite = np.where(np.isfinite(top), top, 0)
    s -= finite[..., None]
    np.exp(s, out=s)
    denom = s.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom[..., None] > 0, (s @ v) / denom[..., None], 0)
        lse = finite + np.log(denom)
    return out, lse


class NumpyCascadePlan:
    """A decode step whose groups read their shared blocks once; ``run`` per layer like any plan."""

    def __init__(self, storage: NumpyStorage, index: BatchIndex, params: AttentionParams, layout: CascadeLayout,
                 rest_plan: object | None, rest_rows: np.ndarray) -> None:
        self.storage = storage
        self.index = index
        self.params = params
        self.cdtype = np.float64 if storage.np_dtype == np.float64 else np.float32
        self.rest_plan = rest_plan
        self.rest_rows = rest_rows
        bs, tables, lens = storage.config.block_size, index.block_tables, index.seq_lens
        self.groups = [layout.group(g) for g in range(layout.num_groups)]
        # the suffix level, planned once: every grouped row's own blocks, padded to the widest
        self.grouped = np.concatenate([rows for rows, _ in self.groups])
        start = layout.shared_tokens[self.grouped]
        first, end = start // bs, -(-lens[self.grouped] // bs)
        width = int((end - first).max())
        cols = np.minimum(first[:, None] + np.arange(width)[None, :], end[:, None] - 1)
        self.suffix_ids = np.take_along_axis(tables[self.grouped], cols, axis=1)  # padding repeats a row's last block
        pos = (first * bs)[:, None] + np.arange(width * bs)[None, :]
        hidden = (pos < start[:, None]) | (pos >= lens[self.grouped][:, None]) | (
            np.arange(width * bs)[None, :] >= ((end - first) * bs)[:, None])
        self.suffix_hidden = hidden[:, None, None, :] if hidden.any() else None

    def run(self, q: np.ndarray, layer: int, *, sinks: np.ndarray | None = None) -> np.ndarray:
        """Attention of ``q [batch, num_q_heads, head_dim]`` over ``layer``; same shape and dtype out."""
        config = self.storage.config
        if not isinstance(q, np.ndarray):
            raise DTypeMismatch(f"q must be a numpy.ndarray, got {type(q).__name__}")
        num_q_heads = check_query(q.shape, self.index, config)
        layer = self.storage.checks.layer(layer)
        h, d = config.num_kv_heads, config.head_dim
        rep = num_q_heads // h
        sink_heads = None if sinks is None else sink_logits(sinks, num_q_heads, self.cdtype).reshape(1, h, rep)
        out = np.empty(q.shape, q.dtype)
        if self.rest_plan is not None:
            options = {} if sinks is None else {"sinks": sinks}
            out[self.rest_rows] = self.rest_plan.run(q[self.rest_rows], layer, **options)  # type: ignore[attr-defined]
        if not self.groups:
            return out
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        k_pool, v_pool = self.storage.pools(layer)
        qs = (q.astype(self.cdtype) * mult).reshape(q.shape[0], h, rep, d)
        o_a = np.empty((self.grouped.size, h, rep, d), self.cdtype)
        lse_a = np.empty((self.grouped.size, h, rep), self.cdtype)
        at = 0
        for rows, ids in self.groups:  # the shared level: one matrix-matrix product per KV head and group
            k = _heads_first(k_pool, ids, h, d, self.cdtype)
            v = _heads_first(v_pool, ids, h, d, self.cdtype)
            qg = qs[rows].transpose(1, 0, 2, 3).reshape(h, rows.size * rep, d)
            o, lse = _attend(qg, k, v, p.soft_cap)
            o_a[at:at + rows.size] = o.reshape(h, rows.size, rep, d).transpose(1, 0, 2, 3)
            lse_a[at:at + rows.size] = lse.reshape(h, rows.size, rep).transpose(1, 0, 2)
            at += rows.size
        r = self.grouped.size
        k = np.ascontiguousarray(k_pool[self.suffix_ids].reshape(r, -1, h, d).transpose(0, 2, 1, 3), self.cdtype)
        v = np.ascontiguousarray(v_pool[self.suffix_ids].reshape(r, -1, h, d).transpose(0, 2, 1, 3), self.cdtype)
        o_b, lse_b = _suffix_attend(qs[self.grouped], k, v, self.suffix_hidden, p.soft_cap)
        top = np.maximum(lse_a, lse_b)
        if sink_heads is not None:
            top = np.maximum(top, sink_heads)
        w_a, w_b = np.exp(lse_a - top), np.exp(lse_b - top)
        denom = w_a + w_b + (0 if sink_heads is None else np.exp(sink_heads - top))
        merged = (o_a * w_a[..., None] + o_b * w_b[..., None]) / denom[..., None]
        out[self.grouped] = merged.reshape(r, num_q_heads, d)
        return out
