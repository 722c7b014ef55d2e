"""The attention half of the backend contract, and the checks every backend shares.

Conventions (one everywhere, see docs/backends.md):

* ``scale`` defaults to ``1 / sqrt(head_dim)``; scores are ``scale * q.k``.
* ``soft_cap = c``: scores become ``c * tanh(scores / c)`` after scaling,
  before masking and softmax.
* ``sliding_window = w``: the query at position ``t`` sees keys at ``p`` with
  ``t - w < p <= t``. ``None``: no window.
* ``chunk_size = c`` (chunked-local attention, Llama 4's
  ``attention_chunk_size``): the query at ``t`` sees only keys of its own
  chunk, ``p // c == t // c`` (and ``p <= t`` when causal). Combines with a
  window: both masks apply. ``None``: no chunking.
* ``sinks`` (learned attention sinks, gpt-oss): one logit per query head,
  given to ``run``; it joins the softmax's denominator as ``exp(sink)``
  (compared with the scaled, capped scores) and brings no value, so
  ``out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink))``.
* A sequence with ``seq_len`` cached tokens and ``n`` queries has them at
  positions ``seq_len - n ... seq_len - 1`` (chunked prefill over a cached prefix).
* GQA: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.
* Softmax in float32 or wider; the output has the query's dtype.

A backend subclasses :class:`AttentionBase` and implements ``plan_index``
(batch-only work, done once per step for all layers, FlashInfer's plan/run)
and the returned plan's ``run``; the base class derives ``plan`` (which
validates the raw arrays once with :func:`check_batch`) and the one-call
``decode``/``prefill`` from them.

``plan_index`` is the lowest public kernel entry: it takes a
:class:`BatchIndex` as given (an engine that builds its metadata with the
manager may call it to skip the conversion), so whatever it is handed, a
backend must never read outside its pool. Each backend either runs the
shared :func:`check_index_bounds` on the index or checks the ids inside its
kernel (the torch backend's compiled CPU decode does), raising the same
typed errors either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..blocks.cascade import CascadeLayout
from ..config import CacheConfig
from ..errors import DeviceMismatch, DTypeMismatch, InvalidArgument, InvalidBlock, OutOfBounds, ShapeMismatch
from .cascade import check_cascade
from .storage import BlockStorage, as_index_array

__all__ = [
    "AttentionParams",
    "BatchIndex",
    "Attention",
    "AttentionPlan",
    "AttentionBase",
    "check_batch",
    "check_index_shapes",
    "check_index_bounds",
    "check_params",
    "check_query",
    "check_sinks",
]

Array = Any


@dataclass(frozen=True, slots=True)
class AttentionParams:
    """Scalar parameters of one attention call.

    Validated on construction (not only in :meth:`make`), so a hand-made
    instance handed to ``plan_index`` cannot carry a value a kernel would
    turn into garbage (a negative scale, a window of zero).
    """

    scale: float
    causal: bool = True
    sliding_window: int | None = None
    soft_cap: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise InvalidArgument(f"scale must be a positive finite number, got {self.scale}")
        for name in ("sliding_window", "chunk_size"):
            w = getattr(self, name)
            if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 1):
                raise InvalidArgument(f"{name} must be a positive int or None, got {w!r}")
        cap = self.soft_cap
        if cap is not None and (not _is_real(cap) or not math.isfinite(cap) or cap <= 0):
            raise InvalidArgument(f"soft_cap must be a positive finite number or None, got {cap!r}")

    @classmethod
    def make(
        cls,
        head_dim: int,
        *,
        scale: float | None = None,
        causal: bool = True,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        chunk_size: int | None = None,
    ) -> AttentionParams:
        """Resolve the default scale (``1 / sqrt(head_dim)``), validate, and normalise to Python scalars."""
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        given = cls(scale, causal, sliding_window, soft_cap, chunk_size)  # __post_init__ validates them as given
        return cls(float(given.scale), bool(given.causal),
                   None if given.sliding_window is None else int(given.sliding_window),
                   None if given.soft_cap is None else float(given.soft_cap),
                   None if given.chunk_size is None else int(given.chunk_size))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class BatchIndex:
    """Host index arrays of one batch (int64 NumPy).

    ``block_tables [batch, max_blocks]``, ``seq_lens [batch]``,
    ``query_start_loc [batch + 1]`` (``arange(batch + 1)`` for decode),
    ``query_lens [batch]`` (``diff(query_start_loc)``). :func:`check_batch`
    returns a validated one; a hand-made one is checked again by every
    ``plan_index`` (:func:`check_index_bounds`, or inside the kernel).
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

    def decode_rows(self, rows: np.ndarray) -> BatchIndex:
        """The decode batch of ``rows`` alone: how a cascade plan hands its rows in no group to the ordinary plan."""
        return BatchIndex(self.block_tables[rows], self.seq_lens[rows], np.arange(rows.size + 1, dtype=np.int64),
                          np.ones(rows.size, np.int64), True)


def check_batch(
    config: CacheConfig,
    block_tables: Any,
    seq_lens: Any,
    query_start_loc: Any | None = None,
) -> BatchIndex:
    """Validate a batch's index arrays against a pool; never trust a block id.

    Converts the arrays (NumPy, lists, torch or CuPy tensors, any int dtype)
    to int64 host arrays, then applies :func:`check_index_bounds`: every
    block id a sequence's ``seq_len`` reaches must lie inside the pool, so no
    kernel can be asked to read outside it. The result is recognised by
    :func:`check_index_bounds` (``plan_index``), which does not check it twice.
    """
    tables = _owned(as_index_array(block_tables, "block_tables"), block_tables)
    lens = _owned(as_index_array(seq_lens, "seq_lens"), seq_lens)
    qsl = (np.arange(lens.shape[0] + 1 if lens.ndim == 1 else 1, dtype=np.int64) if query_start_loc is None
           else _owned(as_index_array(query_start_loc, "query_start_loc"), query_start_loc))
    _check_shapes(tables, lens, qsl)
    return _check_values(_check_structure(tables, lens, qsl, None, query_start_loc is None), config)


def _owned(array: np.ndarray, given: Any) -> np.ndarray:
    """``array`` read-only, copied first unless the conversion already made it a fresh, unshared array."""
    if array is given or not array.flags.owndata or not array.flags.c_contiguous:  # shared with the caller
        array = np.array(array, dtype=np.int64, order="C")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, slots=True)
class _CheckedIndex(BatchIndex):
    """An index a check passed: its arrays are read-only copies the check made.

    ``checked`` records ``(num_blocks, block_size, is_decode, *arrays)`` as
    checked (``num_blocks = -1``: shapes only). The index is trusted again
    only while its fields are those very arrays, still read-only, and the
    pool geometry matches, so ``dataclasses.replace`` with other arrays, or
    an index reused on a smaller pool, is checked afresh.
    """

    checked: tuple[Any, ...] = ()

    def passed(self, num_blocks: int | None, block_size: int | None) -> bool:
        """Whether this index passed the bounds check for that pool (``None, None``: the shape check)."""
        if len(self.checked) != 7:
            return False
        blocks, size, decode, *arrays = self.checked
        if num_blocks is not None and (blocks, size) != (num_blocks, block_size):
            return False
        mine = (self.block_tables, self.seq_lens, self.query_start_loc, self.query_lens)
        return decode == self.is_decode and all(a is b and not a.flags.writeable for a, b in zip(mine, arrays))


def _check_shapes(tables: np.ndarray, lens: np.ndarray, qsl: np.ndarray) -> None:
    if tables.ndim != 2:
        raise ShapeMismatch(f"block_tables must be [batch, max_blocks], got shape {tables.shape}")
    if lens.shape != (tables.shape[0],):
        raise ShapeMismatch(f"seq_lens must be [{tables.shape[0]}], got shape {lens.shape}")
    if qsl.shape != (lens.size + 1,):
        raise ShapeMismatch(f"query_start_loc must be [{lens.size + 1}], got shape {qsl.shape}")


def _host_ints(values: Any, name: str) -> np.ndarray:
    """A read-only int64 copy of an index array: later writes to the caller's array cannot reach a kernel."""
    if not isinstance(values, np.ndarray):
        raise DTypeMismatch(f"BatchIndex.{name} must be a host numpy.ndarray, got {type(values).__name__}")
    if values.size and values.dtype.kind not in "iu":
        raise DTypeMismatch(f"BatchIndex.{name} must hold integers, got dtype {values.dtype}")
    copy = np.array(values, dtype=np.int64, order="C")
    copy.flags.writeable = False
    return copy


def check_index_shapes(index: BatchIndex) -> BatchIndex:
    """The structure of a (possibly hand-made) index: what a kernel sizes its buffers by. O(batch).

    Checks that the arrays are host integer arrays of consistent shapes,
    that ``query_start_loc`` starts at 0, never decreases and agrees with
    ``query_lens``, and that a decode index has one query per sequence.
    Block ids and lengths are not looked at: that is
    :func:`check_index_bounds`, or a kernel that checks them itself. Returns
    the index with read-only int64 copies of its arrays, so the caller's
    arrays can change afterwards without reaching the kernel (an index a
    check already returned is returned as it is).
    """
    if isinstance(index, _CheckedIndex) and index.passed(None, None):
        return index
    if not isinstance(index, BatchIndex):
        raise InvalidArgument(f"plan_index needs a BatchIndex, got {type(index).__name__}")
    tables = _host_ints(index.block_tables, "block_tables")
    lens = _host_ints(index.seq_lens, "seq_lens")
    qsl = _host_ints(index.query_start_loc, "query_start_loc")
    qlens = _host_ints(index.query_lens, "query_lens")
    _check_shapes(tables, lens, qsl)
    return _check_structure(tables, lens, qsl, qlens, bool(index.is_decode))


def _check_structure(tables: np.ndarray, lens: np.ndarray, qsl: np.ndarray, qlens: np.ndarray | None,
                     is_decode: bool) -> _CheckedIndex:
    """The O(batch) part of :func:`check_index_shapes`, on arrays of checked shapes that it owns.

    ``qlens=None``: derive the query lengths from ``qsl`` (``check_batch``).
    """
    steps = qsl[1:] - qsl[:-1]
    if qsl[0] != 0 or (steps < 0).any():
        raise InvalidArgument("query_start_loc must start at 0 and never decrease")
    if qlens is None:
        qlens = steps
    elif qlens.shape != lens.shape or (qlens != steps).any():
        raise InvalidArgument("query_lens must equal diff(query_start_loc)")
    if is_decode and (qlens != 1).any():
        raise InvalidArgument("a decode index has exactly one query per sequence (query_start_loc = arange(batch + 1))")
    for array in (tables, lens, qsl, qlens):
        array.flags.writeable = False
    return _CheckedIndex(tables, lens, qsl, qlens, is_decode, (-1, -1, is_decode, tables, lens, qsl, qlens))


def check_index_bounds(index: BatchIndex, config: CacheConfig) -> BatchIndex:
    """Everything a kernel reading ``index`` over a pool of ``config`` needs to stay inside the pool.

    :func:`check_index_shapes`, then: ``seq_lens >= 0`` (``>= 1`` for
    decode: the current token is in the cache), ``seq_len <= max_blocks *
    block_size`` (:class:`OutOfBounds`), every block id a sequence's
    ``seq_len`` reaches in ``[0, num_blocks)`` (:class:`InvalidBlock`, with
    the first bad id and where it sits; entries past a sequence's last block
    are padding and never read), and no sequence with more queries than
    cached tokens. Vectorised, O(batch x max_blocks). Returns the index with
    read-only int64 copies of its arrays; an index this function returned
    for the same pool geometry (``check_batch``'s result, say) is returned
    at once, so ``plan`` followed by ``plan_index`` checks a batch once.
    """
    if isinstance(index, _CheckedIndex) and index.passed(config.num_blocks, config.block_size):
        return index
    shaped = check_index_shapes(index)
    if not isinstance(shaped, _CheckedIndex):  # check_index_shapes always returns one
        raise TypeError("check_index_shapes returned an unchecked index")
    return _check_values(shaped, config)


def _check_values(index: _CheckedIndex, config: CacheConfig) -> _CheckedIndex:
    """The lengths and ids of an index whose structure passed, against a pool (see :func:`check_index_bounds`)."""
    tables, lens = index.block_tables, index.seq_lens
    if (lens < 0).any():
        raise InvalidArgument(f"seq_lens must be >= 0, got {int(lens.min())}")
    capacity = tables.shape[1] * config.block_size
    if lens.size and int(lens.max()) > capacity:
        raise OutOfBounds(int(lens.max()) - 1, capacity)
    blocks_used = -(-lens // config.block_size)
    bad = tables.view(np.uint64) >= config.num_blocks  # one unsigned compare: a negative id reads as a huge one
    bad &= np.arange(tables.shape[1])[None, :] < blocks_used[:, None]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InvalidBlock(int(tables[row, col]), config.num_blocks, f"block_tables[{row}, {col}]")
    if index.is_decode and (lens < 1).any():
        raise InvalidArgument("decode needs seq_lens >= 1 (the current token is in the cache)")
    qlens = index.query_lens
    if (qlens > lens).any():
        i = int(np.argmax(qlens > lens))
        raise InvalidArgument(f"sequence {i} has {int(qlens[i])} queries but only {int(lens[i])} cached tokens")
    arrays = (tables, lens, index.query_start_loc, qlens)
    return _CheckedIndex(*arrays, index.is_decode, (config.num_blocks, config.block_size, index.is_decode, *arrays))


def check_params(params: AttentionParams) -> AttentionParams:
    """``params`` if it is an :class:`AttentionParams` (whose constructor validated its values), else an error."""
    if not isinstance(params, AttentionParams):
        raise InvalidArgument(f"params must be AttentionParams (see AttentionParams.make), got {type(params).__name__}")
    return params


def check_sinks(sinks_shape: tuple[int, ...], num_q_heads: int) -> None:
    """Validate the shape of a layer's attention sinks: one logit per query head, ``[num_q_heads]``."""
    if tuple(sinks_shape) != (num_q_heads,):
        raise ShapeMismatch(f"sinks must be [{num_q_heads}] (one logit per query head), got {tuple(sinks_shape)}")


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
        """``q: [num_queries, num_q_heads, head_dim]`` -> output of the same shape and dtype.

        Backends whose capabilities list ``"sinks"`` also take ``sinks=``: a
        ``[num_q_heads]`` float array (host NumPy or the backend's own) of
        this layer's learned sink logits (see the module doc).
        """


@runtime_checkable
class Attention(Protocol):
    """Paged attention over a backend's storage.

    Attentions built on :class:`AttentionBase` also have ``plan_index``, the
    lower entry that takes a :class:`BatchIndex`; it is not part of this
    protocol, so an attention written to the protocol alone stays one.
    """

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
        chunk_size: int | None = None,
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
        chunk_size: int | None = None,
        sinks: Array | None = None,
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
        chunk_size: int | None = None,
        sinks: Array | None = None,
    ) -> Array:
        """``q: [total_queries, num_q_heads, head_dim]``; ``query_start_loc: int32 [batch + 1]``."""


class AttentionBase:
    """What a backend's attention subclasses: it writes ``plan_index``, the rest is derived.

    ``plan`` validates the raw arrays once (:func:`check_batch`,
    :meth:`AttentionParams.make`) and hands the :class:`BatchIndex` to
    ``plan_index``; ``decode``/``prefill`` are ``plan(...).run(q, layer)``.

    ``plan_index(storage, index, params)`` is the lowest public kernel entry
    and takes a hand-made index too, so an implementation must keep every
    read inside the pool whatever the index holds: run
    :func:`check_index_bounds` on it, or check each block id and length in
    the kernel before reading, raising the same typed errors. Keep the
    storage type/device checks there as well.

    A subclass written before ``plan_index`` existed overrides ``plan``
    instead; it inherits a ``plan_index`` that checks the index with
    :func:`check_index_bounds` and passes it to that ``plan``. A subclass
    must override one of the two.
    """

    storage_type: ClassVar[type | None] = None
    """The storage class this attention runs on (``None``: any with a config); others raise ``DeviceMismatch``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> AttentionBase:
        if cls.plan is AttentionBase.plan and cls.plan_index is AttentionBase.plan_index:
            raise TypeError(f"Can't instantiate {cls.__name__}: an AttentionBase subclass implements plan_index "
                            "(or, as before plan_index existed, plan)")
        return super().__new__(cls)

    def check_storage(self, storage: BlockStorage) -> CacheConfig:
        """``storage``'s config, after refusing a storage of another backend (the same error in every backend).

        ``plan`` calls it before touching the arrays; a ``plan_index``
        implementation calls it first too, since it is public.
        """
        kind = self.storage_type
        if kind is not None and not isinstance(storage, kind):
            raise DeviceMismatch(f"{type(self).__name__} runs on a {kind.__name__}, got {type(storage).__name__} "
                                 f"on device {getattr(storage, 'device', '?')!r}")
        config = getattr(storage, "config", None)
        if not isinstance(config, CacheConfig):
            raise DeviceMismatch(f"{type(self).__name__} needs a backend storage with a CacheConfig, "
                                 f"got {type(storage).__name__}")
        return config

    def plan(self, storage: BlockStorage, block_tables: Array, seq_lens: Array,
             query_start_loc: Array | None = None, *, causal: bool = True, scale: float | None = None,
             sliding_window: int | None = None, soft_cap: float | None = None,
             chunk_size: int | None = None, cascade: CascadeLayout | None = None) -> AttentionPlan:
        """Validate a batch once and plan it (see :meth:`Attention.plan`).

        ``block_tables: int [batch, max_blocks]``, ``seq_lens: int [batch]``,
        ``query_start_loc: int [batch + 1]`` or ``None`` for decode; host
        NumPy arrays, lists or the backend's tensors. ``cascade``: a decode
        batch's shared-prefix layout (``BatchMetadata.cascade()``), checked
        against the tables and handed to :meth:`plan_cascade`. Typed errors
        of :mod:`pagedkv_core.errors` before any work.
        """
        config = self.check_storage(storage)
        index = check_batch(config, block_tables, seq_lens, query_start_loc)
        params = AttentionParams.make(config.head_dim, scale=scale, causal=causal, sliding_window=sliding_window,
                                      soft_cap=soft_cap, chunk_size=chunk_size)
        if cascade is None:
            return self.plan_index(storage, index, params)
        layout = check_cascade(cascade, index.block_tables, index.seq_lens, index.is_decode, config,
                               sliding_window=params.sliding_window, chunk_size=params.chunk_size)
        return self.plan_cascade(storage, index, params, layout)

    def plan_cascade(self, storage: BlockStorage, index: BatchIndex, params: AttentionParams,
                     layout: CascadeLayout) -> AttentionPlan:
        """Plan a decode batch whose groups share leading blocks (``layout``, already checked).

        Backends listing ``"cascade"`` override it to read each shared block
        once per group; this default plans the batch as usual, which gives
        the same result.
        """
        return self.plan_index(storage, index, params)

    def plan_index(self, storage: BlockStorage, index: BatchIndex, params: AttentionParams) -> AttentionPlan:
        """Plan an already-built index: the lowest public kernel entry (see the class doc).

        This default serves subclasses that override ``plan`` only: the index
        is checked with :func:`check_index_bounds` and given to their ``plan``
        as arrays (which validates it again; they never see an unchecked id).
        """
        if type(self).plan is AttentionBase.plan:  # __new__ refuses such classes; guard against recursion anyway
            raise TypeError(f"{type(self).__name__} implements neither plan_index nor plan")
        config = self.check_storage(storage)
        index = check_index_bounds(index, config)
        params = check_params(params)
        extra: dict[str, Any] = {} if params.chunk_size is None else {"chunk_size": params.chunk_size}
        return self.plan(storage, index.block_tables, index.seq_lens,
                         None if index.is_decode else index.query_start_loc, causal=params.causal,
                         scale=params.scale, sliding_window=params.sliding_window, soft_cap=params.soft_cap, **extra)

    def decode(self, q: Array, storage: BlockStorage, layer: int, block_tables: Array, seq_lens: Array, *,
               scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
               chunk_size: int | None = None, sinks: Array | None = None,
               cascade: CascadeLayout | None = None) -> Array:
        """See :meth:`Attention.decode`."""
        extra: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}  # older plans lack it
        if cascade is not None:
            extra["cascade"] = cascade
        plan = self.plan(storage, block_tables, seq_lens, None, scale=scale,
                         sliding_window=sliding_window, soft_cap=soft_cap, **extra)
        options: dict[str, Any] = {} if sinks is None else {"sinks": sinks}  # only backends listing "sinks" take it
        return plan.run(q, layer, **options)

    def prefill(self, q: Array, storage: BlockStorage, layer: int, block_tables: Array, seq_lens: Array,
                query_start_loc: Array, *, causal: bool = True, scale: float | None = None,
                sliding_window: int | None = None, soft_cap: float | None = None,
                chunk_size: int | None = None, sinks: Array | None = None) -> Array:
        """See :meth:`Attention.prefill`."""
        extra: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
        plan = self.plan(storage, block_tables, seq_lens, query_start_loc, causal=causal, scale=scale,
                         sliding_window=sliding_window, soft_cap=soft_cap, **extra)
        options: dict[str, Any] = {} if sinks is None else {"sinks": sinks}
        return plan.run(q, layer, **options)
