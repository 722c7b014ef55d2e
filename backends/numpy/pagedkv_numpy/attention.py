"""Paged attention over NumPy block pools: decode and prefill, vectorised.

BLAS cannot follow a block table, so in NumPy the whole cost of paging is the
gather. Both paths gather whole blocks with ``np.take`` (``mode="clip"``: no
output buffering, and no index can leave the pool) into scratch buffers the
plan owns, and run the grouped matmul on them (the plan bounds-checks its
index first, :func:`~pagedkv_core.contract.attention.check_index_bounds`, so a
hand-made index given to ``plan_index`` raises instead of reading the wrong
blocks):

* **decode** batches sequences. Tiles of blocks, sized so one tile of K or V
  stays in cache, are gathered and multiplied while hot, so the pool is read
  from memory once. Rows are sorted by visible length, longest first,
  so the sequences still active in a column of blocks are a prefix of the rows
  and a ragged batch wastes no work on padding. A tile reads whole blocks, so
  it also reads slots its row must not see: the unused tail of a sequence's
  last block, and the padding (block 0) of a row shorter than the tile. Those
  slots hold whatever another sequence or a previous owner left, possibly NaN
  or Inf, and a weight of 0 does not cancel them (``0 * NaN = NaN``): their
  scores are set to ``-inf`` and the gathered K and V are zeroed there
  before the matmuls (exactly those slots, planned once per step, so a
  tile of full blocks costs nothing extra).
* **prefill** loops over sequences (its work is quadratic in length, so the
  loop costs nothing measurable) and runs :func:`attend_contiguous`'s tiled,
  online-softmax kernel: each key tile is gathered once and serves every
  query tile that sees it; key ranges a query tile cannot see are never
  computed. Memory is one K/V tile, one score tile and accumulators the
  size of the queries, whatever the cached length.

Chunked-local attention (``chunk_size``) only moves where a query's keys
start: decode rebases each row's block table at the first block of the
query's chunk (or window), so blocks before it are never gathered, and
prefill cuts its query tiles at chunk boundaries, so each tile's keys are
one chunk and need no extra mask. Attention sinks join the softmax as a
virtual key with a logit and no value: decode adds ``exp(sink - max)`` to
the denominator, prefill starts its online softmax from the sink (running
max ``sink``, denominator 1) instead of from nothing.

GQA never repeats K/V: query heads are reshaped to ``[.., num_kv_heads,
group, head_dim]`` and every matmul is batched over KV heads. Scores are
accumulated in float32 (float64 for float64 pools); int8 blocks are
dequantized in the gathered tile with their per-(block, head) scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from pagedkv_core.blocks.cascade import CascadeLayout
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
from pagedkv_core.contract.tiles import DecodeTile, HiddenParts, clear_hidden, hidden_parts, plan_decode_tiles
from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument, ShapeMismatch

from .storage import NumpyStorage

if TYPE_CHECKING:
    from .cascade import NumpyCascadePlan

__all__ = ["NumpyAttention", "NumpyPlan", "attend_contiguous", "sink_logits"]

TILE_BYTES = 2 << 20
"""Bytes of one gathered decode tile (K or V, compute dtype).

Small enough to stay cached between the gather and the matmul, large enough
that Python steps are few: 2-4 MiB measured best, 16 MiB twice as slow
(see docs/benchmarks-numpy.md)."""
GROUP_SLOTS = 1 << 16
"""Rows x key slots of one decode group; bounds its score buffer (x num_q_heads x 4 bytes)."""
Q_TILE = 64
"""Queries per prefill tile."""
K_TILE = 512
"""Keys per prefill tile."""


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class _Gather:
    """A scratch buffer that whole blocks of a pool are gathered into, converted to the compute dtype."""

    def __init__(self, storage: NumpyStorage, cdtype: np.dtype, max_blocks: int) -> None:
        c = storage.config
        self.block_shape = (c.block_size, c.num_kv_heads, c.head_dim)
        self.elems = c.block_size * c.num_kv_heads * c.head_dim
        self.raw = np.empty(max(max_blocks, 1) * self.elems, storage.np_dtype)
        same = storage.np_dtype == cdtype
        self.conv = self.raw if same else np.empty(self.raw.size, cdtype)

    def __call__(self, pool: np.ndarray, scales: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
        """Blocks ``ids [...]`` of ``pool [num_blocks, elems]`` as ``[..., elems]`` in the compute dtype."""
        n = ids.size * self.elems
        raw = self.raw[:n].reshape(*ids.shape, self.elems)
        np.take(pool, ids, axis=0, out=raw, mode="clip")
        if self.conv is self.raw:
            return raw
        out = self.conv[:n].reshape(raw.shape)
        np.copyto(out, raw)
        if scales is not None:
            block_scales = np.take(scales, ids, axis=0, mode="clip")  # [..., num_kv_heads]
            out.reshape(*ids.shape, *self.block_shape)[...] *= block_scales[..., None, :, None]
        return out


def _heads_first(q: np.ndarray, num_kv_heads: int, cdtype: np.dtype, mult: float) -> np.ndarray:
    """``q [n, num_q_heads, d]`` -> ``mult * q`` as ``[num_kv_heads, n * group, d]`` in ``cdtype``."""
    n, num_q_heads, d = q.shape
    group = num_q_heads // num_kv_heads
    out = np.empty((num_kv_heads, n, group, d), cdtype)
    np.multiply(q.reshape(n, num_kv_heads, group, d).transpose(1, 0, 2, 3), mult, out=out, dtype=cdtype)
    return out.reshape(num_kv_heads, n * group, d)


def _first_visible(t: np.ndarray, params: AttentionParams) -> np.ndarray:
    """The first position a query at ``t`` (int64 array) sees: its window's start and its chunk's, whichever is later.

    Causality bounds the other end (``<= t``) and the sequence's length the
    rest, so ``[_first_visible(t), t]`` is a query's whole causal range.
    """
    first = np.zeros_like(t)
    if params.sliding_window is not None:
        first = np.maximum(first, t - params.sliding_window + 1)
    if params.chunk_size is not None:
        first = np.maximum(first, t // params.chunk_size * params.chunk_size)
    return first


def sink_logits(sinks: object, num_q_heads: int, cdtype: np.dtype) -> np.ndarray:
    """Validate a layer's sink logits (``[num_q_heads]``, any float dtype, finite) and convert them to ``cdtype``.

    Checked per ``run`` because sinks are per layer; a non-finite logit
    would turn every output row of its head into NaN or zeros, so it is
    refused rather than computed.
    """
    if not isinstance(sinks, np.ndarray):
        raise DeviceMismatch(f"numpy attention needs sinks as a numpy.ndarray, got {type(sinks).__name__}")
    if sinks.dtype.kind != "f":
        raise DTypeMismatch(f"sinks must hold floats, got dtype {sinks.dtype}")
    check_sinks(sinks.shape, num_q_heads)
    with np.errstate(over="ignore"):
        logits = sinks.astype(cdtype)
    if not np.isfinite(logits).all():  # checked after the cast: a float64 logit past float32's range is refused too
        bad = int(np.flatnonzero(~np.isfinite(logits))[0])
        raise InvalidArgument(f"sinks must be finite (in {cdtype}, the softmax's dtype), got {sinks[bad]} at head {bad}")
    return logits


# -- prefill: a tiled kernel over contiguous K/V ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeyTile:
    """Keys ``j0:j1`` (gathered once) and the query tiles that see them.

    Each entry of ``queries`` is ``(i0, i1, a, b, hidden)``: queries ``i0:i1``
    attend to keys ``a:b`` (a sub-range of ``j0:j1``); ``hidden [i1 - i0, b - a]``
    is True where a key is masked, None when all are visible.
    """

    j0: int
    j1: int
    queries: tuple[tuple[int, int, int, int, np.ndarray | None], ...]


def _query_tiles(n: int, first_pos: int, chunk: int | None) -> list[tuple[int, int]]:
    """Query tiles ``(i0, i1)`` of at most ``Q_TILE`` queries (positions ``first_pos + i``), none across a chunk boundary.

    A tile inside one chunk sees keys of that chunk only, so its key range
    is bounded by the chunk and needs no chunk mask.
    """
    tiles, i0 = [], 0
    while i0 < n:
        i1 = min(n, i0 + Q_TILE)
        if chunk is not None:
            i1 = min(i1, ((first_pos + i0) // chunk + 1) * chunk - first_pos)
        tiles.append((i0, i1))
        i0 = i1
    return tiles


def _schedule(n: int, seq_len: int, key_start: int, params: AttentionParams) -> list[_KeyTile]:
    """Tiles of ``n`` queries (positions ``seq_len - n ...``) over keys ``key_start ... seq_len - 1``.

    Key ``j`` of the tile coordinates is position ``key_start + j``. Key
    ranges a query tile cannot see (before its window or chunk, after it
    when causal, past its chunk's end) are left out; fully visible pairs
    carry no mask.
    """
    w, c, upper = params.sliding_window, params.chunk_size, params.causal or params.sliding_window is not None
    spans = []  # per query tile: the key range it sees, in tile coordinates
    for i0, i1 in _query_tiles(n, seq_len - n, c):
        t_lo, t_hi = seq_len - n + i0, seq_len - n + i1 - 1
        k_lo = max(key_start, int(_first_visible(np.asarray(t_lo), params)))
        k_hi = t_hi if upper else seq_len - 1 if c is None else min(seq_len - 1, (t_lo // c + 1) * c - 1)
        spans.append((i0, i1, t_lo, t_hi, k_lo - key_start, k_hi - key_start + 1))
    tiles = []
    for g0 in range(0, seq_len - key_start, K_TILE):
        queries = []
        for i0, i1, t_lo, t_hi, lo, hi in spans:
            a, b = max(g0, lo), min(g0 + K_TILE, hi)
            if a >= b:
                continue
            p_lo, p_hi = key_start + a, key_start + b - 1
            hidden = None
            if (upper and p_hi > t_lo) or (w is not None and p_lo <= t_hi - w):
                t = np.arange(t_lo, t_hi + 1)[:, None]
                p = np.arange(p_lo, p_hi + 1)[None, :]
                hidden = (p > t) if upper else np.zeros((t.size, p.size), bool)
                if w is not None:
                    hidden |= p <= t - w
            queries.append((i0, i1, a, b, hidden))
        if queries:
            tiles.append(_KeyTile(min(q[2] for q in queries), max(q[3] for q in queries), tuple(queries)))
    return tiles


def _attend_tiles(qh: np.ndarray, fetch: Callable[[int, _KeyTile], tuple[np.ndarray, np.ndarray]],
                  tiles: list[_KeyTile], params: AttentionParams, out: np.ndarray,
                  sinks: np.ndarray | None = None) -> None:
    """Online-softmax attention of one sequence; each key tile is fetched once, for all query tiles.

    ``qh [kv_heads, n * group, d]``: pre-scaled queries in the compute dtype.
    ``fetch(i, tile)`` returns the keys and values of ``tiles[i]`` as ``[j1 -
    j0, kv_heads, d]`` in the compute dtype (a slice, or a gather from the pool).
    ``out [kv_heads, n, group, d]`` (any float dtype, usually a view of the
    caller's output) receives the result. ``sinks [kv_heads, group]`` (compute
    dtype): each query head's sink logit, a key with no value that the
    softmax starts from. Besides one score tile, memory is the running max,
    denominator and accumulator of the queries (q's size).
    """
    h, rows_total, d = qh.shape
    group = out.shape[2]
    cap = params.soft_cap
    if sinks is None:
        m = np.full((h, rows_total, 1), -np.inf, qh.dtype)
        denom = np.zeros((h, rows_total, 1), qh.dtype)
    else:  # the sink as the first key seen: max = sink, denominator = exp(sink - sink), no value
        m = np.repeat(sinks[:, None, :], rows_total // group, axis=1).reshape(h, rows_total, 1)
        denom = np.ones((h, rows_total, 1), qh.dtype)
    acc = np.zeros((h, rows_total, d), qh.dtype)
    for i, tile in enumerate(tiles):
        keys, values = fetch(i, tile)
        kt, vh = keys.transpose(1, 2, 0), values.transpose(1, 0, 2)  # [h, d, keys], [h, keys, d]
        for i0, i1, a, b, hidden in tile.queries:
            rows = slice(i0 * group, i1 * group)
            s = np.matmul(qh[:, rows], kt[:, :, a - tile.j0:b - tile.j0])  # [h, rows, keys]
            if cap is not None:
                np.tanh(s, out=s)
                s *= cap
            if hidden is not None:
                np.copyto(s.reshape(h, i1 - i0, group, b - a), -np.inf, where=hidden[None, :, None, :])
            m_old = m[:, rows]
            m_new = np.maximum(m_old, s.max(axis=-1, keepdims=True))
            shift = np.where(m_new == -np.inf, 0.0, m_new).astype(qh.dtype, copy=False)
            s -= shift
            np.exp(s, out=s)
            alpha = np.exp(m_old - shift)
            denom[:, rows] *= alpha
            denom[:, rows] += s.sum(axis=-1, keepdims=True)
            acc[:, rows] *= alpha
            acc[:, rows] += np.matmul(s, vh[:, a - tile.j0:b - tile.j0])
            m[:, rows] = m_new
    acc /= denom
    out[...] = acc.reshape(h, rows_total // group, group, d)


def attend_contiguous(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = True,
                      scale: float | None = None, sliding_window: int | None = None,
                      soft_cap: float | None = None, chunk_size: int | None = None,
                      sinks: np.ndarray | None = None) -> np.ndarray:
    """Attention of one sequence over K/V laid out contiguously: the prefill kernel without paging.

    ``q [n, num_q_heads, head_dim]`` (queries at positions ``seq_len - n ...``);
    ``k, v [seq_len, num_kv_heads, head_dim]``, any float dtype; ``sinks
    [num_q_heads]`` float, optional. Returns ``[n, num_q_heads, head_dim]``
    in ``q``'s dtype. Paged prefill runs this same kernel on the gathered
    K/V, so benchmarking the two measures what paging costs.
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] \
            or q.shape[0] > k.shape[0] or q.shape[1] % k.shape[1]:
        raise ShapeMismatch(f"need q [n, heads, d] and k, v [seq_len >= n, kv_heads, d], got "
                            f"{q.shape}, {k.shape}, {v.shape}")
    params = AttentionParams.make(q.shape[2], causal=causal, scale=scale, sliding_window=sliding_window,
                                  soft_cap=soft_cap, chunk_size=chunk_size)
    cdtype = _compute_dtype(k.dtype)
    h = k.shape[1]
    group = q.shape[1] // h
    sink = None if sinks is None else sink_logits(sinks, q.shape[1], cdtype).reshape(h, group)
    mult = params.scale if soft_cap is None else params.scale / params.soft_cap
    out = np.empty(q.shape, q.dtype)
    view = out.reshape(q.shape[0], h, group, q.shape[2]).transpose(1, 0, 2, 3)
    k, v = k.astype(cdtype, copy=False), v.astype(cdtype, copy=False)
    _attend_tiles(_heads_first(q, h, cdtype, mult), lambda _, tile: (k[tile.j0:tile.j1], v[tile.j0:tile.j1]),
                  _schedule(q.shape[0], k.shape[0], 0, params), params, view, sink)
    return out


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DecodeGroup:
    """Sequences decoded together; ``rows`` are their query rows, longest first.

    ``hidden [rows, width * block_size]`` is True for key slots a query must
    not see (None when it sees them all). It covers the slots past a short
    sequence's blocks, which no tile writes. ``clears[i]``: the hidden slots
    of ``tiles[i]``, zeroed in its gathered K and V (see :func:`~pagedkv_core.contract.tiles.hidden_parts`).
    """

    rows: np.ndarray
    width: int
    hidden: np.ndarray | None
    tiles: tuple[DecodeTile, ...]
    clears: tuple[HiddenParts, ...]


@dataclass(frozen=True, slots=True)
class _PrefillSeq:
    """One sequence's queries ``q_start:q_end`` and its key tiles.

    ``blocks[i]`` is ``(ids, offset)``: key tile ``i`` is tokens ``offset :
    offset + j1 - j0`` of the blocks ``ids`` gathered in order.
    """

    q_start: int
    q_end: int
    tiles: list[_KeyTile]
    blocks: tuple[tuple[np.ndarray, int], ...]


class NumpyPlan:
    """A validated batch with its index arrays, masks and scratch, reused by every layer.

    ``run`` writes into scratch buffers the plan owns, so a plan must not run
    on two threads at once (build one plan per thread).
    """

    def __init__(self, storage: NumpyStorage, index: BatchIndex, params: AttentionParams) -> None:
        # np.take(mode="clip") cannot leave the pool, but a bad id would still read the wrong block: refuse it
        index = check_index_bounds(index, storage.config)
        self.storage, self.index, self.params = storage, index, params
        self.cdtype = _compute_dtype(storage.np_dtype)
        self._scores: np.ndarray | None = None
        if int(index.query_lens.max(initial=0)) <= 1:
            self._decode = self._plan_decode(np.flatnonzero(index.query_lens == 1))
            self._prefill: list[_PrefillSeq] = []
        else:
            self._decode = []
            self._prefill = self._plan_prefill()

    # -- planning ------------------------------------------------------------------------------

    def _plan_decode(self, seqs: np.ndarray) -> list[_DecodeGroup]:
        """One query per sequence, at position ``seq_len - 1``: group rows, tile their visible blocks.

        The shared tile planner knows windows only; with a chunk, each row's
        table is first rebased at the block holding its first visible
        position (:meth:`_rebased`), so the blocks before the chunk are not
        in the tiles at all, and the slots of that first block before the
        chunk's start are masked.
        """
        c = self.storage.config
        bs = c.block_size
        block_bytes = bs * c.num_kv_heads * c.head_dim * self.cdtype.itemsize
        index, window, lead = self.index, self.params.sliding_window, None
        if self.params.chunk_size is not None:
            index, lead = self._rebased()
            window = None  # folded into the rebased tables and ``lead``
        groups = []
        for g in plan_decode_tiles(index, seqs, bs, window, block_bytes, TILE_BYTES, GROUP_SLOTS):
            hidden = g.hidden
            if lead is not None:
                hidden = hidden | (np.arange(g.width * bs)[None, :] < lead[g.rows][:, None])
            clears = tuple(hidden_parts(hidden[t.r0:t.r1, t.c0 * bs:t.c1 * bs], bs) for t in g.tiles)
            groups.append(_DecodeGroup(self.index.query_start_loc[g.rows], g.width,
                                       hidden if hidden.any() else None, g.tiles, clears))
        self._gather = _Gather(self.storage, self.cdtype,
                               max((tile.ids.size for g in groups for tile in g.tiles), default=1))
        return groups

    def _rebased(self) -> tuple[BatchIndex, np.ndarray]:
        """The decode index with each row's table starting at the block of its first visible position.

        Returns the rebased index (``seq_lens`` shortened by the blocks
        dropped, so positions shift by whole blocks) and ``lead [batch]``:
        the slots of the new first block before the first visible position.
        Only the tables and lengths of the result are meaningful (all the
        tile planner reads).
        """
        bs, tables = self.storage.config.block_size, self.index.block_tables
        visible = _first_visible(self.index.seq_lens - 1, self.params)
        first = visible // bs
        cols = np.minimum(first[:, None] + np.arange(tables.shape[1])[None, :], max(tables.shape[1] - 1, 0))
        shifted = np.take_along_axis(tables, cols, axis=1) if tables.shape[1] else tables
        lead = visible - first * bs
        rebased = BatchIndex(shifted, self.index.seq_lens - first * bs, self.index.query_start_loc,
                             self.index.query_lens, self.index.is_decode)
        return rebased, lead

    def _plan_prefill(self) -> list[_PrefillSeq]:
        """Per sequence with queries: its key tiles (from its first query's window or chunk) and their block ids."""
        bs = self.storage.config.block_size
        index, work = self.index, []
        for b in np.flatnonzero(index.query_lens > 0):
            seq_len, n = int(index.seq_lens[b]), int(index.query_lens[b])
            first = int(_first_visible(np.asarray(seq_len - n), self.params)) // bs
            tiles = _schedule(n, seq_len, first * bs, self.params)
            blocks = tuple((np.ascontiguousarray(index.block_tables[b, first + t.j0 // bs:first - (-t.j1 // bs)]),
                            t.j0 % bs) for t in tiles)
            start = int(index.query_start_loc[b])
            work.append(_PrefillSeq(start, start + n, tiles, blocks))
        most = max((ids.size for seq in work for ids, _ in seq.blocks), default=1)
        self._gather_k = _Gather(self.storage, self.cdtype, most)
        self._gather_v = _Gather(self.storage, self.cdtype, most)
        return work

    # -- running -------------------------------------------------------------------------------

    def _check_q(self, q: np.ndarray) -> int:
        if not isinstance(q, np.ndarray):
            raise DeviceMismatch(f"numpy attention needs q as a numpy.ndarray on 'cpu', got {type(q).__name__}")
        pool = self.storage.np_dtype
        allowed = (np.dtype(np.float16), np.dtype(np.float32)) if self.storage.quantized else (pool,)
        if q.dtype not in allowed:
            names = " or ".join(str(a) for a in allowed)
            raise DTypeMismatch(f"q must be {names} for a {self.storage.config.dtype} pool, got {q.dtype}")
        return check_query(q.shape, self.index, self.storage.config)

    def run(self, q: np.ndarray, layer: int, *, sinks: np.ndarray | None = None) -> np.ndarray:
        """Attention of ``q [num_queries, num_q_heads, head_dim]`` over ``layer``; same shape and dtype out.

        ``sinks``: this layer's sink logits, a float ``numpy.ndarray
        [num_q_heads]`` of any float dtype (finite), or ``None``.
        """
        num_q_heads = self._check_q(q)
        layer = self.storage.checks.layer(layer)
        h = self.storage.config.num_kv_heads
        sink = None if sinks is None else sink_logits(sinks, num_q_heads, self.cdtype).reshape(h, -1)
        out = np.empty(q.shape, q.dtype)
        k, v = self.storage.pools(layer)
        k, v = k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1)
        scales = self.storage.scales(layer)
        k_scale, v_scale = (None, None) if scales is None else scales
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap
        if self._decode:
            self._run_decode(q, num_q_heads, mult, (k, k_scale), (v, v_scale), out, sink)
        group, d = num_q_heads // h, q.shape[2]
        for seq in self._prefill:
            fetch = partial(self._fetch, seq, (k, k_scale), (v, v_scale))
            qh = _heads_first(q[seq.q_start:seq.q_end], h, self.cdtype, mult)
            view = out[seq.q_start:seq.q_end].reshape(-1, h, group, d).transpose(1, 0, 2, 3)
            _attend_tiles(qh, fetch, seq.tiles, p, view, sink)
        return out

    def _fetch(self, seq: _PrefillSeq, k: tuple, v: tuple, i: int, tile: _KeyTile) -> tuple[np.ndarray, np.ndarray]:
        """Key tile ``i`` of ``seq`` gathered from the pools ``k, v = (pool, scales or None)``."""
        c = self.storage.config
        ids, offset = seq.blocks[i]
        keys = self._gather_k(k[0], k[1], ids).reshape(-1, c.num_kv_heads, c.head_dim)
        values = self._gather_v(v[0], v[1], ids).reshape(-1, c.num_kv_heads, c.head_dim)
        end = offset + tile.j1 - tile.j0
        return keys[offset:end], values[offset:end]

    def _score_buffer(self, num_q_heads: int) -> np.ndarray:
        size = max(g.rows.size * g.width for g in self._decode) * self.storage.config.block_size * num_q_heads
        if self._scores is None or self._scores.size < size:
            # zeros, not empty: slots no tile writes must hold finite values until they are masked
            self._scores = np.zeros(size, self.cdtype)
        return self._scores

    def _run_decode(self, q: np.ndarray, num_q_heads: int, mult: float, k: tuple, v: tuple,
                    out: np.ndarray, sink: np.ndarray | None) -> None:
        """Decode groups into ``out``; ``sink [num_kv_heads, group]`` (compute dtype) or ``None``."""
        c, cap = self.storage.config, self.params.soft_cap
        h, d, bs = c.num_kv_heads, c.head_dim, c.block_size
        group = num_q_heads // h
        scores = self._score_buffer(num_q_heads)
        for g in self._decode:
            rows, slots = g.rows.size, g.width * bs
            qg = np.multiply(q[g.rows], mult, dtype=self.cdtype).reshape(rows, h, group, d)
            s = scores[:rows * num_q_heads * slots].reshape(rows, h, group, slots)
            for tile, clear in zip(g.tiles, g.clears):
                keys = clear_hidden(self._gather(k[0], k[1], tile.ids).reshape(tile.r1 - tile.r0, -1, h, d), clear, bs)
                np.matmul(qg[tile.r0:tile.r1], keys.transpose(0, 2, 3, 1),
                          out=s[tile.r0:tile.r1, :, :, tile.c0 * bs:tile.c1 * bs])
            if cap is not None:
                np.tanh(s, out=s)
                s *= cap
            if g.hidden is not None:
                np.copyto(s, -np.inf, where=g.hidden[:, None, None, :])
            top = s.max(axis=-1, keepdims=True)  # [rows, h, group, 1]
            if sink is not None:
                np.maximum(top, sink[None, :, :, None], out=top)
            s -= top
            np.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            if sink is not None:  # the sink's share of the denominator; it brings no value
                denom += np.exp(sink[None, :, :, None] - top)
            acc = np.empty((rows, h, group, d), self.cdtype)
            part = np.empty_like(acc)
            for tile, clear in zip(g.tiles, g.clears):
                values = clear_hidden(self._gather(v[0], v[1], tile.ids).reshape(tile.r1 - tile.r0, -1, h, d), clear, bs)
                target = acc[tile.r0:tile.r1] if tile.c0 == 0 else part[tile.r0:tile.r1]
                np.matmul(s[tile.r0:tile.r1, :, :, tile.c0 * bs:tile.c1 * bs], values.transpose(0, 2, 1, 3),
                          out=target)
                if tile.c0:
                    acc[tile.r0:tile.r1] += target
            acc /= denom
            out[g.rows] = acc.reshape(rows, num_q_heads, d)


class NumpyAttention(AttentionBase):
    """Paged decode and prefill over a :class:`NumpyStorage` (float64/32/16 and int8 pools).

    Every feature of the contract: sliding window, soft-cap, chunked-local
    attention (``chunk_size``) and attention sinks (``run(q, layer, sinks=)``).

    ``plan(storage, block_tables, seq_lens, query_start_loc=None, **params)``
    (inherited) validates the raw arrays once — integer NumPy arrays or
    lists, any int dtype; ``query_start_loc=None`` means decode — and calls
    :meth:`plan_index`.
    """

    storage_type = NumpyStorage

    def plan_index(self, storage: NumpyStorage, index: BatchIndex, params: AttentionParams) -> NumpyPlan:
        """Prepare a batch for every layer; ``index`` may be hand-made (the plan bounds-checks it)."""
        self.check_storage(storage)
        return NumpyPlan(storage, index, check_params(params))

    def plan_cascade(self, storage: NumpyStorage, index: BatchIndex, params: AttentionParams,
                     layout: CascadeLayout) -> NumpyPlan | NumpyCascadePlan:
        """A decode step whose groups read their shared blocks once (see :mod:`.cascade`); int8 pools plan as usual."""
        from .cascade import NumpyCascadePlan

        config = self.check_storage(storage)
        index = check_index_bounds(index, config)
        params = check_params(params)
        layout = check_cascade(layout, index.block_tables, index.seq_lens, index.is_decode, config,
                               sliding_window=params.sliding_window, chunk_size=params.chunk_size)
        if storage.quantized or not layout.num_groups:
            return self.plan_index(storage, index, params)
        rest = layout.ungrouped_rows()
        rest_plan = self.plan_index(storage, index.decode_rows(rest), params) if rest.size else None
        return NumpyCascadePlan(storage, index, params, layout, rest_plan, rest)
