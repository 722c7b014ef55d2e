"""Cascade (shared-prefix) decode on host (NumPy) pools, shared by the CPU kernels of several backends.

Without it, 32 sequences that share a 2,048-token prompt read those keys 32
times, each time in a matrix-vector product. Here a group's shared blocks
are gathered once and multiplied with all the group's queries at once (one
matrix-matrix product per KV head, where BLAS runs near its peak); each
sequence then attends over its own suffix, and the two partial results are
merged with their log-sum-exps (FlashInfer's ``merge_state``), attention
sinks joining the denominator once.

A backend hands in its pools as NumPy arrays (the NumPy backend's own, or
zero-copy views of another library's host memory) and a ``widen`` function
that turns gathered pool rows into the compute dtype (``astype`` for NumPy
dtypes, a bit shift for bfloat16 held as ``uint16``). Rows in no group, the
validation of queries and the output's type stay with the backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..blocks.cascade import CascadeLayout
from .attention import BatchIndex

__all__ = ["HostCascade", "Widen"]

KEY_TILE = 1024
"""Keys per step of the online softmax: bounds the score buffer to heads x queries x KEY_TILE."""

Widen = Callable[[np.ndarray], np.ndarray]
"""C-contiguous gathered pool rows -> the same values as a C-contiguous array of the compute dtype."""


def _heads_first(pool: np.ndarray, ids: np.ndarray, h: int, d: int, widen: Widen) -> np.ndarray:
    """The blocks ``ids`` of a pool as one contiguous ``[h, tokens, d]`` array (what BLAS reads fastest)."""
    return widen(np.ascontiguousarray(pool[ids].reshape(-1, h, d).transpose(1, 0, 2)))


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
    with np.errstate(invalid="ignore", over="ignore"):  # poison in hidden slots: masked just below
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


class HostCascade:
    """The grouped rows of a cascade decode step, planned once and attended per layer.

    ``grouped``: the batch rows of every group, in group order; :meth:`attend`
    returns their outputs in that order. ``cdtype``: the compute dtype
    (float32, or float64 for float64 pools).
    """

    def __init__(self, index: BatchIndex, layout: CascadeLayout, block_size: int, cdtype: type) -> None:
        self.cdtype = cdtype
        bs, tables, lens = block_size, index.block_tables, index.seq_lens
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

    def attend(self, qs: np.ndarray, pools: tuple[np.ndarray, np.ndarray], widen: Widen, soft_cap: float | None,
               sink_heads: np.ndarray | None) -> np.ndarray:
        """Outputs ``[grouped, h * rep, d]`` (``cdtype``) of the grouped rows.

        ``qs [batch, h, rep, d]``: the whole batch's queries in ``cdtype``,
        scaled (and divided by the soft-cap when there is one); ``pools``:
        one layer's K and V pools ``[blocks, block_size, h, d]``;
        ``sink_heads [1, h, rep]`` or ``None``.
        """
        k_pool, v_pool = pools
        _, h, rep, d = qs.shape
        o_a: np.ndarray = np.empty((self.grouped.size, h, rep, d), self.cdtype)
        lse_a: np.ndarray = np.empty((self.grouped.size, h, rep), self.cdtype)
        at = 0
        for rows, ids in self.groups:  # the shared level: one matrix-matrix product per KV head and group
            k = _heads_first(k_pool, ids, h, d, widen)
            v = _heads_first(v_pool, ids, h, d, widen)
            qg = qs[rows].transpose(1, 0, 2, 3).reshape(h, rows.size * rep, d)
            o, lse = _attend(qg, k, v, soft_cap)
            o_a[at:at + rows.size] = o.reshape(h, rows.size, rep, d).transpose(1, 0, 2, 3)
            lse_a[at:at + rows.size] = lse.reshape(h, rows.size, rep).transpose(1, 0, 2)
            at += rows.size
        r = self.grouped.size
        k = widen(np.ascontiguousarray(k_pool[self.suffix_ids].reshape(r, -1, h, d).transpose(0, 2, 1, 3)))
        v = widen(np.ascontiguousarray(v_pool[self.suffix_ids].reshape(r, -1, h, d).transpose(0, 2, 1, 3)))
        o_b, lse_b = _suffix_attend(qs[self.grouped], k, v, self.suffix_hidden, soft_cap)
        top = np.maximum(lse_a, lse_b)
        if sink_heads is not None:
            top = np.maximum(top, sink_heads)
        w_a, w_b = np.exp(lse_a - top), np.exp(lse_b - top)
        denom = w_a + w_b + (0 if sink_heads is None else np.exp(sink_heads - top))
        merged: np.ndarray = (o_a * w_a[..., None] + o_b * w_b[..., None]) / denom[..., None]
        return merged.reshape(r, h * rep, d)
