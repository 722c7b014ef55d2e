"""Cascade (shared-prefix) decode for MLX pools on the CPU: a group's shared blocks are read once.

The host kernel already computes on zero-copy NumPy views of the MLX pools,
so the cascade does too: the shared arithmetic is
:class:`pagedkv_core.contract.host_cascade.HostCascade` (the NumPy backend's
as well), fed bfloat16 pools through the bit shift that widens them to
float32. Rows in no group run the ordinary host kernel into the same output
buffer. On Metal (the ``mlx`` graph kernel) and for int8 pools the batch is
planned as usual, which gives the same result.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionParams, BatchIndex
from pagedkv_core.contract.host_cascade import HostCascade, Widen

from .arrays import bf16_bits_to_f32
from .attention import MlxPlan, check_mlx_query, host_float32, host_sinks
from .storage import MlxStorage

__all__ = ["MlxCascadePlan"]


def _to_float32(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float32, copy=False)


class MlxCascadePlan:
    """A decode step on the host kernel whose groups read their shared blocks once; ``run`` per layer."""

    def __init__(self, storage: MlxStorage, index: BatchIndex, params: AttentionParams, layout: CascadeLayout,
                 rest_plan: MlxPlan | None, rest_rows: np.ndarray) -> None:
        self.storage, self.index, self.params = storage, index, params
        self.rest_plan, self.rest_rows = rest_plan, rest_rows
        self.cascade = HostCascade(index, layout, storage.config.block_size, np.float32)
        self._widen: Widen = bf16_bits_to_f32 if storage.mx_dtype == mx.bfloat16 else _to_float32

    def run(self, q: Any, layer: int, *, sinks: Any = None) -> Any:
        """Attention of ``q [batch, num_q_heads, head_dim]`` (mx.array, the pool's dtype) over ``layer``."""
        storage, config = self.storage, self.storage.config
        num_q_heads = check_mlx_query(storage, self.index, q)
        layer = storage.checks.layer(layer)
        sink = None if sinks is None else host_sinks(sinks, num_q_heads)
        h, d = config.num_kv_heads, config.head_dim
        rep = num_q_heads // h
        qh = host_float32(q)
        out = np.empty(q.shape, np.float32)
        k, v, _, _ = storage.host_views()  # views: dropped when this call returns
        pools = (k[layer], v[layer])
        rest = self.rest_rows
        if self.rest_plan is not None and self.rest_plan.kernel is not None:
            rest_out = np.empty((rest.size, num_q_heads, d), np.float32)
            self.rest_plan.kernel.run(np.ascontiguousarray(qh[rest]), pools, None, rest_out, sink)
            out[rest] = rest_out
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        qs = (qh * np.float32(mult)).reshape(q.shape[0], h, rep, d)
        sink_heads = None if sink is None else sink.reshape(1, h, rep)
        out[self.cascade.grouped] = self.cascade.attend(qs, pools, self._widen, p.soft_cap, sink_heads)
        result = mx.array(out, dtype=q.dtype)
        mx.eval(result)
        return result
