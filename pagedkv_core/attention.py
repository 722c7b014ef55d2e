"""The attention half of the backend contract, and the checks every backend shares.

Conventions (one everywhere, see docs/backends.md):

* ``scale`` defaults to ``1 / sqrt(head_dim)``; scores are ``scale * q.k``.
* ``soft_cap = c``: scores become ``c * tanh(scores / c)`` after scaling,
  before masking and softmax.
* ``sliding_window = w``: the query at position ``t`` sees keys at ``p`` with
  ``t - w < p <= t``. ``None``: no window.
* A sequence with ``seq_len`` cached tokens and ``n`` queries has them at
  positions ``seq_len - n ... seq_len - 1`` (chunked prefill over a cached prefix).
* GQA: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.
* Softmax in float32 or wider; the output has the query's dtype.

A backend implements :meth:`Attention.plan` (batch-only work, done once per
step for all layers, FlashInfer's plan/run) and the returned plan's ``run``;
:class:`AttentionBase` derives the one-call ``decode``/``prefill`` from them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import CacheConfig
from .errors import InvalidArgument, OutOfBounds, ShapeMismatch
from .storage import BlockStorage, as_index_array

__all__ = [
    "AttentionParams",
    "BatchIndex",
    "Attention",
    "AttentionPlan",
    "AttentionBase",
    "check_batch",
    "check_query",
]

Array = Any


@dataclass(frozen=True, slots=True)
class AttentionParams:
    """Scalar parameters of one attention call, validated once."""

    scale: float
    causal: bool = True
    sliding_window: int | None = None
    soft_cap: float | None = None

    @classmethod
    def make(
        cls,
        head_dim: int,
        *,
        scale: float | None = None,
        causal: bool = True,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> AttentionParams:
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        if not math.isfinite(scale) or scale <= 0:
            raise InvalidArgument(f"scale must be a positive finite number, got {scale}")
        if sliding_window is not None and (not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1):
            raise InvalidArgument(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        if soft_cap is not None and (not math.isfinite(soft_cap) or soft_cap <= 0):
            raise InvalidArgument(f"soft_cap must be a positive finite number or None, got {soft_cap!r}")
        return cls(float(scale), bool(causal), None if sliding_window is None else int(sliding_window),
                   None if soft_cap is None else float(soft_cap))


@dataclass(frozen=True, slots=True)
class BatchIndex:
    """Validated host index arrays of one batch (int64 NumPy).

    ``block_tables [batch, max_blocks]``, ``seq_lens [batch]``,
    ``query_start_loc [batch + 1]`` (``arange(batch + 1)`` for decode),
    ``query_lens [batch]``.
    """

    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    query_lens: np.ndarray
    is_decode: bool

    @property
    def batch(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.query_start_loc[-1])


def check_batch(
    config: CacheConfig,
    block_tables: Any,
    seq_lens: Any,
    query_start_loc: Any | None = None,
) -> BatchIndex:
    """Validate a batch's index arrays against a pool; never trust a block id.

    Every block id a sequence's ``seq_len`` reaches must lie inside the pool,
    so no kernel can be asked to read outside it.
    """
    tables = as_index_array(block_tables, "block_tables")
    lens = as_index_array(seq_lens, "seq_lens")
    if tables.ndim != 2:
        raise ShapeMismatch(f"block_tables must be [batch, max_blocks], got shape {tables.shape}")
    if lens.shape != (tables.shape[0],):
        raise ShapeMismatch(f"seq_lens must be [{tables.shape[0]}], got shape {lens.shape}")
    if (lens < 0).any():
        raise InvalidArgument(f"seq_lens must be >= 0, got {int(lens.min())}")
    capacity = tables.shape[1] * config.block_size
    if lens.size and int(lens.max()) > capacity:
        raise OutOfBounds(int(lens.max()) - 1, capacity)
    blocks_used = -(-lens // config.block_size)
    used = np.arange(tables.shape[1])[None, :] < blocks_used[:, None]
    bad = used & ((tables < 0) | (tables >= config.num_blocks))
    if bad.any():
        from .errors import InvalidBlock

        row, col = np.argwhere(bad)[0]
        raise InvalidBlock(int(tables[row, col]), config.num_blocks, f"block_tables[{row}, {col}]")
    if query_start_loc is None:
        qsl = np.arange(lens.size + 1, dtype=np.int64)
        is_decode = True
        if (lens < 1).any():
            raise InvalidArgument("decode needs seq_lens >= 1 (the current token is in the cache)")
    else:
        qsl = as_index_array(query_start_loc, "query_start_loc")
        is_decode = False
        if qsl.shape != (lens.size + 1,):
            raise ShapeMismatch(f"query_start_loc must be [{lens.size + 1}], got shape {qsl.shape}")
        if qsl[0] != 0 or (np.diff(qsl) < 0).any():
            raise InvalidArgument("query_start_loc must start at 0 and never decrease")
    qlens = np.diff(qsl)
    if (qlens > lens).any():
        i = int(np.argmax(qlens > lens))
        raise InvalidArgument(f"sequence {i} has {int(qlens[i])} queries but only {int(lens[i])} cached tokens")
    return BatchIndex(tables, lens, qsl, qlens, is_decode)


def check_query(q_shape: tuple[int, ...], index: BatchIndex, config: CacheConfig) -> int:
    """Validate a query's shape; return the number of query heads."""
    if len(q_shape) != 3 or q_shape[2] != config.head_dim or q_shape[0] != index.num_queries:
        raise ShapeMismatch(
            f"q must be [{index.num_queries}, num_q_heads, {config.head_dim}], got {tuple(q_shape)}"
        )
    num_q_heads = int(q_shape[1])
    if num_q_heads < config.num_kv_heads or num_q_heads % config.num_kv_heads:
        raise ShapeMismatch(
            f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={config.num_kv_heads}"
        )
    return num_q_heads


@runtime_checkable
class AttentionPlan(Protocol):
    """Batch-dependent work done once per step; ``run`` per layer."""

    def run(self, q: Array, layer: int) -> Array:
        """``q: [num_queries, num_q_heads, head_dim]`` -> output of the same shape and dtype."""


@runtime_checkable
class Attention(Protocol):
    """Paged attention over a backend's storage."""

    def plan(
        self,
        storage: BlockStorage,
        block_tables: Array,
        seq_lens: Array,
        query_start_loc: Array | None = None,
        *,
        causal: bool = True,
        scale: float | None = None,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> AttentionPlan:
        """Prepare a batch. ``query_start_loc=None`` means decode (one query per sequence)."""

    def decode(
        self,
        q: Array,
        storage: BlockStorage,
        layer: int,
        block_tables: Array,
        seq_lens: Array,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> Array:
        """``q: [batch, num_q_heads, head_dim]``; ``block_tables: int32 [batch, max_blocks]``; ``seq_lens: int32 [batch]``."""

    def prefill(
        self,
        q: Array,
        storage: BlockStorage,
        layer: int,
        block_tables: Array,
        seq_lens: Array,
        query_start_loc: Array,
        *,
        causal: bool = True,
        scale: float | None = None,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> Array:
        """``q: [total_queries, num_q_heads, head_dim]``; ``query_start_loc: int32 [batch + 1]``."""


class AttentionBase(ABC):
    """Derives the one-call forms from ``plan``; a backend subclasses this and writes ``plan``."""

    @abstractmethod
    def plan(self, storage, block_tables, seq_lens, query_start_loc=None, *, causal=True, scale=None,
             sliding_window=None, soft_cap=None) -> AttentionPlan:
        """See :meth:`Attention.plan`."""

    def decode(self, q, storage, layer, block_tables, seq_lens, *, scale=None, sliding_window=None,
               soft_cap=None):
        plan = self.plan(storage, block_tables, seq_lens, None, scale=scale,
                         sliding_window=sliding_window, soft_cap=soft_cap)
        return plan.run(q, layer)

    def prefill(self, q, storage, layer, block_tables, seq_lens, query_start_loc, *, causal=True,
                scale=None, sliding_window=None, soft_cap=None):
        plan = self.plan(storage, block_tables, seq_lens, query_start_loc, causal=causal, scale=scale,
                         sliding_window=sliding_window, soft_cap=soft_cap)
        return plan.run(q, layer)
