"""What every attention plan of the torch backend shares: the checked batch, the parameters, the query checks."""

from __future__ import annotations

from typing import Any

import torch

from pagedkv_core.contract.attention import (
    AttentionParams,
    BatchIndex,
    check_index_bounds,
    check_index_shapes,
    check_params,
    check_query,
)
from pagedkv_core.errors import DTypeMismatch

from .convert import native_tensor
from .storage import TorchStorage

__all__ = ["TorchPlanBase", "QUERY_DTYPES_FOR_QUANTIZED"]

QUERY_DTYPES_FOR_QUANTIZED = (torch.float16, torch.bfloat16, torch.float32)


class TorchPlanBase:
    """Holds a checked batch; ``check`` validates one layer's query before any kernel runs.

    A plan may be built from a hand-made index (``TorchAttention.plan_index``,
    or a plan class called directly), so the constructor checks it:
    :func:`check_index_bounds` (every id and length in range) unless the
    class's kernel checks ids and lengths itself (``KERNEL_CHECKS_BOUNDS``,
    the compiled CPU decode), where only the shapes it sizes buffers by are
    checked here. Either way the plan keeps int64 copies of the index arrays.
    """

    KERNEL_CHECKS_BOUNDS = False
    """True where the kernel checks every block id and length before reading (then only shapes are checked here)."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        self.storage = storage
        config = storage.config
        self.index = check_index_shapes(index) if self.KERNEL_CHECKS_BOUNDS else check_index_bounds(index, config)
        self.params = check_params(params)
        self.device = storage.torch_device
        c = storage.config
        self.num_kv_heads, self.head_dim, self.block_size = c.num_kv_heads, c.head_dim, c.block_size

    def check(self, q: Any, layer: int) -> tuple[torch.Tensor, int, int]:
        """Validate ``q [num_queries, num_q_heads, head_dim]``; return (q, layer, num_q_heads).

        Float pools need ``q`` in the pool's dtype; quantized pools take
        float16, bfloat16 or float32 queries.
        """
        layer = self.storage.checks.layer(layer)
        q = native_tensor(q, "q", self.device)
        num_q_heads = check_query(tuple(q.shape), self.index, self.storage.config)
        if self.storage.quantized:
            if q.dtype not in QUERY_DTYPES_FOR_QUANTIZED:
                raise DTypeMismatch(f"q for a {self.storage.config.dtype} pool must be float16, bfloat16 or "
                                    f"float32, got {q.dtype}")
        elif q.dtype != self.storage.dtype:
            raise DTypeMismatch(f"q has dtype {q.dtype}, the pool holds {self.storage.dtype}")
        return q, layer, num_q_heads
