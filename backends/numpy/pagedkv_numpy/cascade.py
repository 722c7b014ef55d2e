"""Cascade (shared-prefix) decode over NumPy pools: a group's shared blocks are read once for all its queries.

The arithmetic is :class:`pagedkv_core.contract.host_cascade.HostCascade`
(shared with the MLX backend's CPU kernel); this plan validates the query,
runs rows in no group through the ordinary decode plan and converts the
pool's dtype to the compute dtype. Quantized pools are planned the ordinary
way (same result).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionParams, BatchIndex, check_query
from pagedkv_core.contract.host_cascade import HostCascade
from pagedkv_core.errors import DTypeMismatch

from .attention import sink_logits
from .storage import NumpyStorage

__all__ = ["NumpyCascadePlan"]


def _widen(rows: np.ndarray, dtype: type) -> np.ndarray:
    return rows.astype(dtype, copy=False)


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
        self.cascade = HostCascade(index, layout, storage.config.block_size, self.cdtype)
        self._widen = partial(_widen, dtype=self.cdtype)

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
        if not self.cascade.groups:
            return out
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        qs = (q.astype(self.cdtype) * mult).reshape(q.shape[0], h, rep, d)
        out[self.cascade.grouped] = self.cascade.attend(qs, self.storage.pools(layer), self._widen, p.soft_cap,
                                                        sink_heads)
        return out
