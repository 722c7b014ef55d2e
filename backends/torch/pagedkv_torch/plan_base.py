"""What every attention plan of the torch backend shares: the checked batch, the parameters, the query and sink checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedkv_core.contract.attention import (
    AttentionParams,
    BatchIndex,
    check_index_bounds,
    check_index_shapes,
    check_params,
    check_query,
    check_sinks,
)
from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument

from .convert import native_tensor, same_device
from .storage import TorchStorage

__all__ = ["TorchPlanBase", "QUERY_DTYPES_FOR_QUANTIZED", "first_visible"]

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

    def sinks(self, sinks: Any, num_q_heads: int) -> torch.Tensor | None:
        """A layer's sink logits as a contiguous float32 ``[num_q_heads]`` tensor on the plan's device.

        ``sinks``: ``None`` (no sinks), a host NumPy array (any float dtype,
        on any device's plan) or a float tensor on the plan's device. Checked
        on every ``run``, before any kernel, because they change per layer:
        the shape (``check_sinks``), and finiteness after the cast to float32
        (a logit of inf or NaN, or one float32 cannot hold, would turn its
        head's every output into NaN or zeros; refused, ``InvalidArgument``).
        A device tensor's check waits for the device (one small reduction).
        """
        if sinks is None:
            return None
        if isinstance(sinks, np.ndarray):
            if sinks.dtype.kind != "f":
                raise DTypeMismatch(f"sinks must hold floats, got dtype {sinks.dtype}")
            check_sinks(sinks.shape, num_q_heads)
            with np.errstate(over="ignore"):
                host = np.ascontiguousarray(sinks, dtype=np.float32)
            if not np.isfinite(host).all():
                bad = int(np.flatnonzero(~np.isfinite(host))[0])
                raise InvalidArgument(f"sinks must be finite float32 values, got {sinks[bad]} at head {bad}")
            t = torch.from_numpy(host)
            return t if self.device.type == "cpu" else t.to(self.device)
        if not isinstance(sinks, torch.Tensor):
            raise DTypeMismatch(f"sinks must be a torch.Tensor or a NumPy array, got {type(sinks).__name__}")
        if not same_device(sinks.device, self.device):
            raise DeviceMismatch(f"sinks are on {sinks.device}, the storage is on {self.device}")
        if not sinks.is_floating_point():
            raise DTypeMismatch(f"sinks must hold floats, got dtype {sinks.dtype}")
        check_sinks(tuple(sinks.shape), num_q_heads)
        t = sinks.detach().to(torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            bad = int(torch.nonzero(~torch.isfinite(t))[0, 0])
            raise InvalidArgument(f"sinks must be finite float32 values, got {float(sinks[bad])} at head {bad}")
        return t


def first_visible(t: np.ndarray, params: AttentionParams) -> np.ndarray:
    """The first key position queries at positions ``t`` (int64) see: their window's start or chunk's, the later.

    Causality bounds the other end (``<= t``), so ``[first_visible(t), t]``
    is a causal query's whole range: the kernels start reading there and
    skip every block before it.
    """
    first = np.zeros_like(t)
    if params.sliding_window is not None:
        first = np.maximum(first, t - params.sliding_window + 1)
    if params.chunk_size is not None:
        first = np.maximum(first, t // params.chunk_size * params.chunk_size)
    return first
