"""Paged attention over MLX block pools: plan once per step, run per layer.

``plan`` validates the batch with the core's ``check_batch`` (typed errors,
before any work) and hands it to ``plan_index``, whose plan bounds-checks the
index again (``check_index_bounds``: it may be hand-made), lays it out on the host (:class:`BatchLayout`: visible
blocks per sequence, masks) and builds one of two kernels, chosen per device
by measurement (``docs/benchmarks-mlx.md``):

* ``host`` (default on ``cpu``): NumPy over zero-copy views of the pools,
  :mod:`pagedkv_mlx.kernel_host`. On Linux it runs a decode batch several
  times faster than MLX's own gather + fused SDPA on the CPU.
* ``mlx`` (default on ``gpu``): a graph of MLX operations, gather through the
  block table + ``mx.fast.scaled_dot_product_attention``,
  :mod:`pagedkv_mlx.kernel_mlx`; the path for Metal.

Both follow the conventions of :mod:`pagedkv_core.contract.attention` and are checked
against the float64 oracle on every dtype, with every feature: sliding
window, soft-cap, chunked-local attention (``chunk_size``: the layout keeps
only the blocks of a query's chunk) and attention sinks (``run(q, layer,
sinks=)``, validated here once per call, then handed to the kernel as
float32 host logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
import numpy as np

from pagedkv_core.contract.attention import (
    AttentionBase,
    AttentionParams,
    BatchIndex,
    check_index_bounds,
    check_params,
    check_query,
    check_sinks,
)
from pagedkv_core.contract.cascade import check_cascade
from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument

from .arrays import FLOAT_MX, bf16_bits_to_f32, dtype_name, host_view
from .kernel_host import HostKernel
from .kernel_mlx import GraphKernel
from .layout import BatchLayout
from .storage import MlxStorage

if TYPE_CHECKING:
    from pagedkv_core.blocks.cascade import CascadeLayout

    from .cascade import MlxCascadePlan

__all__ = ["MlxAttention", "MlxPlan", "KernelName", "check_mlx_query", "host_float32", "host_sinks"]

Array = Any  # mx.array
KernelName = Literal["auto", "host", "mlx"]


def host_float32(q: Array) -> np.ndarray:
    """``q`` (MLX float) as a float32 NumPy array: a view for float32, else a converted copy."""
    view = host_view(q)
    if q.dtype == mx.bfloat16:
        return bf16_bits_to_f32(view)
    return view.astype(np.float32, copy=False)


def host_sinks(sinks: Any, num_q_heads: int) -> np.ndarray:
    """Validate a layer's sink logits and return them as float32 NumPy ``[num_q_heads]``.

    Takes an ``mx.array`` or a host ``numpy.ndarray`` of any float dtype
    (the contract's two forms); both kernels want host logits (the host
    kernel computes on NumPy, the graph kernel checks whether they are
    exact in its dtype), and a non-finite logit is refused, since it would
    turn its head's every output into NaN or zeros.
    """
    if isinstance(sinks, mx.array):
        if sinks.dtype not in (*FLOAT_MX, mx.float64):
            raise DTypeMismatch(f"sinks must hold floats, got {dtype_name(sinks.dtype)}")
        check_sinks(tuple(sinks.shape), num_q_heads)
        host = np.array(sinks.astype(mx.float32) if sinks.dtype != mx.float64 else sinks)
    elif isinstance(sinks, np.ndarray):
        if sinks.dtype.kind != "f":
            raise DTypeMismatch(f"sinks must hold floats, got dtype {sinks.dtype}")
        check_sinks(sinks.shape, num_q_heads)
        host = sinks
    else:
        raise DeviceMismatch(f"mlx attention needs sinks as an mx.array or numpy.ndarray, got {type(sinks).__name__}")
    with np.errstate(over="ignore"):
        logits = host.astype(np.float32)
    if not np.isfinite(logits).all():  # checked after the cast: a float64 logit past float32's range is refused too
        bad = int(np.flatnonzero(~np.isfinite(logits))[0])
        raise InvalidArgument(f"sinks must be finite (in float32, the softmax's dtype), got {host[bad]} at head {bad}")
    return logits


def check_mlx_query(storage: MlxStorage, index: BatchIndex, q: Any) -> int:
    """``q``'s number of query heads, after refusing a query of the wrong type, dtype or shape."""
    if not isinstance(q, mx.array):
        raise DeviceMismatch(f"mlx attention needs q as an mx.array, got {type(q).__name__}")
    allowed = FLOAT_MX if storage.quantized else (storage.mx_dtype,)
    if q.dtype not in allowed:
        names = " or ".join(dtype_name(a) for a in allowed)
        raise DTypeMismatch(f"q must be {names} for a {storage.config.dtype} pool, got {dtype_name(q.dtype)}")
    return check_query(tuple(q.shape), index, storage.config)


class MlxPlan:
    """A validated batch with its layout and kernel, reused by every layer of the step.

    The host kernel owns scratch buffers: run a plan on one thread at a time.
    """

    def __init__(self, storage: MlxStorage, index: BatchIndex, params: AttentionParams, kernel: str) -> None:
        # the layout and both kernels gather through these ids unchecked (MLX's take does not bounds-check)
        index = check_index_bounds(index, storage.config)
        self.storage, self.index, self.params, self.kernel_name = storage, index, check_params(params), kernel
        self.layout = BatchLayout.build(index, storage.config.block_size, params)
        self.kernel: HostKernel | GraphKernel | None = None  # None: no sequence has a query
        if self.layout.rows and kernel == "host":
            self.kernel = HostKernel(self.layout, storage.config, params, bf16=storage.mx_dtype == mx.bfloat16)
        elif self.layout.rows:
            self.kernel = GraphKernel(self.layout, storage.config, params, cpu=storage.device == "cpu")

    def run(self, q: Array, layer: int, *, sinks: Array | np.ndarray | None = None) -> Array:
        """Attention of ``q [num_queries, num_q_heads, head_dim]`` (mx.array) over ``layer``.

        ``q`` has the pool's dtype (float16/bfloat16/float32 for int8 pools);
        the output has ``q``'s shape and dtype. ``sinks``: this layer's sink
        logits, ``[num_q_heads]`` finite floats as an ``mx.array`` or NumPy
        array of any float dtype, or ``None``. The ``host`` kernel returns an
        evaluated array, the ``mlx`` kernel a lazy one.
        """
        num_q_heads = check_mlx_query(self.storage, self.index, q)
        layer = self.storage.checks.layer(layer)
        sink = None if sinks is None else host_sinks(sinks, num_q_heads)
        if self.kernel is None:
            return mx.zeros(q.shape, q.dtype)
        storage = self.storage
        if isinstance(self.kernel, GraphKernel):
            with mx.stream(storage.mx_device):
                scales = None if storage.k_scale is None else (storage.k_scale, storage.v_scale)
                return self.kernel.run(q, (storage.k, storage.v), scales, layer, sink)
        k, v, ks, vs = storage.host_views()  # views: dropped when this call returns
        out = np.empty(q.shape, np.float32)
        self.kernel.run(host_float32(q), (k[layer], v[layer]), None if ks is None else (ks[layer], vs[layer]), out,
                        sink)
        # converted by the constructor, on the host: an astype node costs an evaluation (~30 us for bfloat16)
        result = mx.array(out, dtype=q.dtype)
        mx.eval(result)
        return result


class MlxAttention(AttentionBase):
    """Paged decode and prefill over an :class:`MlxStorage` (float32/float16/bfloat16 and int8 pools).

    ``kernel``: ``"auto"`` (``host`` on ``cpu``, ``mlx`` on ``gpu``), or force one.
    """

    storage_type = MlxStorage

    def __init__(self, kernel: KernelName = "auto") -> None:
        if kernel not in ("auto", "host", "mlx"):
            raise InvalidArgument(f"kernel must be 'auto', 'host' or 'mlx', got {kernel!r}")
        self.kernel = kernel

    def plan_index(self, storage: MlxStorage, index: BatchIndex, params: AttentionParams) -> MlxPlan:
        """Prepare a batch for every layer; ``index`` may be hand-made (the plan bounds-checks it).

        ``plan`` (inherited) takes the raw arrays — integer NumPy or MLX
        arrays, or lists; ``query_start_loc=None`` means decode — validates
        them once and calls this.
        """
        self.check_storage(storage)
        kernel = self.kernel if self.kernel != "auto" else ("host" if storage.device == "cpu" else "mlx")
        return MlxPlan(storage, index, params, kernel)

    def plan_cascade(self, storage: MlxStorage, index: BatchIndex, params: AttentionParams,
                     layout: CascadeLayout) -> MlxPlan | MlxCascadePlan:
        """A decode step whose groups read their shared blocks once (host kernel, see :mod:`.cascade`).

        The ``mlx`` graph kernel and int8 pools plan the batch as usual (same result).
        """
        from .cascade import MlxCascadePlan

        config = self.check_storage(storage)
        index = check_index_bounds(index, config)
        params = check_params(params)
        layout = check_cascade(layout, index.block_tables, index.seq_lens, index.is_decode, config,
                               sliding_window=params.sliding_window, chunk_size=params.chunk_size)
        kernel = self.kernel if self.kernel != "auto" else ("host" if storage.device == "cpu" else "mlx")
        if kernel != "host" or storage.quantized or not layout.num_groups:
            return self.plan_index(storage, index, params)
        rest = layout.ungrouped_rows()
        rest_plan = MlxPlan(storage, index.decode_rows(rest), params, "host") if rest.size else None
        return MlxCascadePlan(storage, index, params, layout, rest_plan, rest)
