"""What every attention plan of the torch backend shares: the batch, the parameters, the query checks."""

from __future__ import annotations

from typing import Any

import torch

from pagedkv_core.attention import AttentionParams, BatchIndex, check_query
from pagedkv_core.errors import DTypeMismatch

from .convert import native_tensor
from .storage import TorchStorage

__all__ = ["TorchPlanBase", "QUERY_DTYPES_FOR_QUANTIZED"]

QUERY_DTYPES_FOR_QUANTIZED = (torch.float16, torch.bfloat16, torch.float32)


class TorchPlanBase:
    """Holds a validated batch; ``check`` validates one layer's query before any kernel runs."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        self.storage = storage
        self.index = index
        self.params = params
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
