"""Paged attention over a :class:`CupyStorage` with the CUDA kernels of ``kernels.cu``.

``plan`` validates the batch (``check_batch``) and hands it to
``plan_index``, whose plan bounds-checks the index again on the host
(``check_index_bounds``: it may be hand-made, and the kernels skip an
out-of-range id silently rather than fail) and uploads its index arrays once
per step; the plan's ``run(q, layer)`` only launches kernels, so a model
calls it once per layer. A batch whose sequences each have exactly one query
runs the split-K decode kernel (plus its reduction when a context was split);
any other batch runs the prefill kernel. Both take a chunk size
(chunked-local attention: it moves where each query's keys start, so
blocks before its chunk are never read) and, per ``run``, the layer's
attention sinks, uploaded as float32 after a check (shape, finite values).
"""

from __future__ import annotations

from typing import Any

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
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, UnsupportedOperation

from .convert import bf16_bits_to_float32, contiguous
from .kernels import MAX_HEAD_DIM, ModuleKey, decode_name, prefill_name, reduce_name
from .launch import THREADS, DecodeGeometry, PrefillGeometry, decode_geometry, prefill_geometry
from .storage import CupyStorage

__all__ = ["CupyAttention", "CupyAttentionPlan"]

QUERY_DTYPES = ("float16", "bfloat16", "float32")


class CupyAttention(AttentionBase):
    """Paged decode and prefill with CUDA kernels (``plan``, ``decode`` and ``prefill`` derive from :meth:`plan_index`).

    ``plan`` (inherited) takes ``block_tables``: int ``[batch, max_blocks]``;
    ``seq_lens``: int ``[batch]`` (cached tokens, queries included);
    ``query_start_loc``: int ``[batch + 1]`` or None for decode — host NumPy
    or device arrays — validates them once and calls :meth:`plan_index`.
    """

    storage_type = CupyStorage

    def plan_index(self, storage: CupyStorage, index: BatchIndex, params: AttentionParams) -> CupyAttentionPlan:
        """Check and upload a batch; ``index`` may be hand-made (the plan bounds-checks it on the host)."""
        config = self.check_storage(storage)
        if config.head_dim > MAX_HEAD_DIM:
            raise UnsupportedOperation(f"cupy attention supports head_dim <= {MAX_HEAD_DIM}, got {config.head_dim}")
        return CupyAttentionPlan(storage, index, params)


class CupyAttentionPlan:
    """One batch's device index arrays and launch geometry; ``run`` per layer."""

    def __init__(self, storage: CupyStorage, index: BatchIndex, params: AttentionParams) -> None:
        # the kernels skip ids outside the pool silently (a wrong result, not an error): refuse them here
        index = check_index_bounds(index, storage.config)
        self.storage = storage
        self.index = index
        self.params = check_params(params)
        self.is_decode = index.num_queries == index.batch and bool((index.query_lens == 1).all())
        rt = storage.runtime
        c = storage.config
        blocks_used = -(-index.seq_lens // c.block_size)
        used = np.arange(index.block_tables.shape[1])[None, :] < blocks_used[:, None]
        tables = np.where(used, index.block_tables, -1).astype(np.int32)  # never pass ids the batch does not use
        self.tables = rt.upload(np.ascontiguousarray(tables))
        self.seq_lens = rt.upload(index.seq_lens.astype(np.int32))
        self.query_start_loc = None if self.is_decode else rt.upload(index.query_start_loc.astype(np.int32))
        self.window = params.sliding_window or 0
        self.soft_cap = params.soft_cap or 0.0
        self.chunk = params.chunk_size or 0
        self._geometry: dict[int, Any] = {}
        self._dummy = rt.zeros((1,), np.float32)

    def run(self, q: Any, layer: int, *, sinks: Any = None) -> Any:
        """``q: [num_queries, num_q_heads, head_dim]`` on the storage's device -> output of the same shape and dtype.

        Float pools need ``q`` in the pool's dtype; int8 pools take float16,
        bfloat16 or float32 queries. ``sinks``: optional ``[num_q_heads]``
        float sink logits of this layer (host NumPy or a device array).
        """
        storage, rt, xp = self.storage, self.storage.runtime, self.storage.xp
        layer = storage.checks.layer(layer)
        q = rt.native(q, "q")
        num_q_heads = check_query(tuple(q.shape), self.index, storage.config)
        q_dtype = rt.dtype_name(q.dtype)
        kv_dtype = storage.config.dtype
        if kv_dtype == "int8":
            if q_dtype not in QUERY_DTYPES:
                raise DTypeMismatch(f"q must be float16, bfloat16 or float32 for an int8 pool, got {q_dtype}")
        elif q_dtype != kv_dtype:
            raise DTypeMismatch(f"q must have the pool's dtype {kv_dtype}, got {q_dtype}")
        with rt.activate():
            sink = self._sinks(sinks, num_q_heads)
            q = contiguous(xp, q)
            out = xp.empty_like(q)
            if self.index.num_queries == 0:
                return out
            if self.is_decode:
                self._decode(out, q, layer, num_q_heads, q_dtype, kv_dtype, sink)
            else:
                self._prefill(out, q, layer, num_q_heads, q_dtype, kv_dtype, sink)
        return out

    def _sinks(self, sinks: Any, num_q_heads: int) -> tuple[Any, np.int32]:
        """A layer's sinks as the kernels' ``(float32 device array, has_sinks)`` (a dummy and 0 for none).

        Host NumPy or a device array of any float dtype (bfloat16 included),
        ``[num_q_heads]``; refused before any launch if a value is not finite
        in float32 (it would turn its head's outputs into NaN or zeros). A
        device array's check waits for the device (one small reduction).
        """
        if sinks is None:
            return self._dummy, np.int32(0)
        rt = self.storage.runtime
        host = isinstance(sinks, np.ndarray)
        array = sinks if host else rt.native(sinks, "sinks")
        xp = np if host else rt.xp
        name = rt.dtype_name(array.dtype)  # DTypeMismatch for what no kernel reads
        if name == "int8":
            raise DTypeMismatch(f"sinks must hold floats, got dtype {name}")
        check_sinks(tuple(array.shape), num_q_heads)
        with np.errstate(over="ignore"):
            values = (bf16_bits_to_float32(xp, array.view(xp.uint16)) if name == "bfloat16"
                      else xp.ascontiguousarray(array, dtype=xp.float32))
        finite = xp.isfinite(values)
        if not bool(finite.all()):
            bad = int(xp.flatnonzero(~finite)[0])
            raise InvalidArgument(f"sinks must be finite float32 values, got {float(values[bad])} at head {bad}")
        return (rt.upload(np.ascontiguousarray(values)) if host else xp.ascontiguousarray(values)), np.int32(1)

    # -- launches ------------------------------------------------------------

    def _pool_args(self, layer: int) -> tuple[Any, ...]:
        s = self.storage
        scales = s.scales(layer) or (self._dummy, self._dummy)
        return (s.k[layer], s.v[layer], scales[0], scales[1], self.tables, self.seq_lens)

    def _shape_args(self, num_q_heads: int) -> tuple[np.int32, ...]:
        c = self.storage.config
        return (np.int32(self.index.block_tables.shape[1]), np.int32(c.num_blocks), np.int32(c.block_size),
                np.int32(c.num_kv_heads), np.int32(num_q_heads))

    def _decode(self, out: Any, q: Any, layer: int, num_q_heads: int, q_dtype: str, kv_dtype: str,
                sink: tuple[Any, np.int32]) -> None:
        storage, rt = self.storage, self.storage.runtime
        c = storage.config
        geo, part_o, part_ml = self._decode_geometry(num_q_heads)
        key = ModuleKey("decode", q_dtype, kv_dtype, c.head_dim)
        rt.launch(key, decode_name(q_dtype, kv_dtype, c.head_dim, geo.group_tile), geo.grid, (THREADS,), (
            out, part_o, part_ml, q, *self._pool_args(layer), *self._shape_args(num_q_heads),
            np.int32(geo.split_len), np.int32(geo.max_splits), np.float32(self.params.scale),
            np.int32(self.window), np.float32(self.soft_cap), np.int32(self.chunk), *sink))
        if geo.max_splits > 1:
            rt.launch(key, reduce_name(q_dtype, c.head_dim), geo.reduce_grid, (THREADS,), (
                out, part_o, part_ml, self.seq_lens, np.int32(num_q_heads), np.int32(geo.split_len),
                np.int32(geo.max_splits), np.int32(self.window), np.int32(self.chunk), *sink))

    def _decode_geometry(self, num_q_heads: int) -> tuple[DecodeGeometry, Any, Any]:
        """Geometry and split buffers for this head count, made once and reused by every layer."""
        found = self._geometry.get(num_q_heads)
        if found is None:
            storage = self.storage
            c = storage.config
            geo = decode_geometry(self.index.seq_lens, self.window, c.num_kv_heads, num_q_heads,
                                  storage.runtime.num_sms, self.chunk)
            if geo.max_splits > 1:
                rows = self.index.batch * num_q_heads * geo.max_splits
                part_o = storage.runtime.zeros((rows * c.head_dim,), np.float32)
                part_ml = storage.runtime.zeros((rows * 2,), np.float32)
            else:
                part_o = part_ml = self._dummy
            found = self._geometry[num_q_heads] = (geo, part_o, part_ml)
        return found

    def _prefill(self, out: Any, q: Any, layer: int, num_q_heads: int, q_dtype: str, kv_dtype: str,
                 sink: tuple[Any, np.int32]) -> None:
        storage, rt = self.storage, self.storage.runtime
        c = storage.config
        geo, tile_seq, tile_q0 = self._prefill_geometry(num_q_heads)
        key = ModuleKey("prefill", q_dtype, kv_dtype, c.head_dim)
        rt.launch(key, prefill_name(q_dtype, kv_dtype, c.head_dim), geo.grid, (THREADS,), (
            out, q, *self._pool_args(layer), self.query_start_loc, tile_seq, tile_q0,
            *self._shape_args(num_q_heads), np.int32(geo.heads_per_block), np.int32(geo.tokens_per_tile),
            np.float32(self.params.scale), np.int32(self.params.causal), np.int32(self.window),
            np.float32(self.soft_cap), np.int32(self.chunk), *sink))

    def _prefill_geometry(self, num_q_heads: int) -> tuple[PrefillGeometry, Any, Any]:
        found = self._geometry.get(num_q_heads)
        if found is None:
            c, rt = self.storage.config, self.storage.runtime
            geo = prefill_geometry(self.index.query_lens, c.num_kv_heads, num_q_heads)
            found = self._geometry[num_q_heads] = (geo, rt.upload(geo.tile_seq), rt.upload(geo.tile_q0))
        return found
