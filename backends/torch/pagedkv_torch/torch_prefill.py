"""Paged prefill with torch ops (the CPU kernel; also the fallback on CUDA/MPS without Triton).

Prefill is compute-bound, so gathering a sequence's K/V through the block
table (one ``index_select`` of whole blocks) costs little next to attention
itself, which then runs in torch's fused ``scaled_dot_product_attention``
(flash attention on CPU, float32 softmax, GQA through ``enable_gqa`` without
repeated K/V). Consecutive sequences are padded together, in groups whose
mask stays under ``GROUP_ELEMS``, and masked: the query at position ``t``
sees ``p <= t`` (causal), ``t - w < p`` (window), ``p // c == t // c``
(chunk) and ``p < seq_len``. A single causal sequence over no cached prefix
uses ``is_causal`` and no mask.

The unit of work is a *segment*: the queries of one sequence that share a
chunk (all of them without ``chunk_size``), with the keys they can see, from
the block of the first one's first visible position (chunk or window start)
to its last key. So chunked-local attention gathers and multiplies only
each chunk's own keys, O(n * chunk) rather than O(n^2), and a window skips
the blocks before it.

Soft-capping and attention sinks are not something SDPA does, so with
``soft_cap`` or ``sinks`` the same gathered K/V go through an explicit
grouped matmul, chunked over queries so the score matrix stays small; the
sink joins its softmax's denominator (``exp(sink - max)``, the row maximum
taken over the sink too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pagedkv_core.contract.attention import AttentionParams, BatchIndex

from .convert import take
from .plan_base import TorchPlanBase, first_visible
from .quant import dequantize_blocks
from .storage import TorchStorage

__all__ = ["TorchPrefillPlan", "sdpa"]

SCORE_CHUNK_BYTES = 32 << 20
"""Float32 scores per query chunk of the soft-capped path."""
GROUP_ELEMS = 1 << 24
"""Sequences x padded queries x padded keys of one group (its mask's bytes)."""
_GQA_KWARG: list[bool] = []


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` with GQA (``q [b, hq, n, d]``, ``k, v [b, hkv, s, d]``).

    Uses ``enable_gqa`` (torch >= 2.5); older torch gets K/V repeated per group.
    """
    if not _GQA_KWARG or _GQA_KWARG[0]:
        try:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                 enable_gqa=True)
            _GQA_KWARG[:] = [True]
            return out
        except TypeError:
            _GQA_KWARG[:] = [False]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@dataclass(frozen=True, slots=True)
class _Group:
    """Consecutive segments padded together; their queries are rows ``q0:q1`` of the batch."""

    q0: int
    q1: int
    count: int
    max_q: int
    keys: int  # key slots per segment after padding
    ids: torch.Tensor  # int64 [count * blocks]: blocks to gather (unused entries: block 0, masked)
    rows: torch.Tensor | None  # int64 [q1 - q0]: each query's row in [count * max_q]; None when unpadded
    mask: torch.Tensor | None  # bool [count, 1, max_q, keys]; None when is_causal or nothing is hidden
    is_causal: bool
    foreign: torch.Tensor | None = None  # bool [count, 1, keys, 1]: gathered slots no segment owns; None: none


@dataclass(frozen=True, slots=True)
class _Segments:
    """Queries of one sequence that see the same chunk, as parallel int64 arrays (one entry per segment).

    Segment ``i`` is queries ``q0[i] : q0[i] + n[i]`` of the batch, of
    sequence ``seq[i]``, at positions ``t0[i] ...``; it reads keys from
    block column ``base[i]`` (position ``base[i] * block_size``) up to
    position ``hi[i]`` (exclusive).
    """

    seq: np.ndarray
    q0: np.ndarray
    n: np.ndarray
    t0: np.ndarray
    base: np.ndarray
    hi: np.ndarray


class TorchPrefillPlan(TorchPlanBase):
    """One prefill step over a ragged batch (``query_start_loc``), ``run`` per layer.

    Segments (see the module doc) are padded in groups of consecutive
    segments whose score mask (``count * max_queries * keys``) stays under
    ``GROUP_ELEMS``, so memory is bounded whatever the batch.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        super().__init__(storage, index, params)
        seg = self._segments()
        keys = (seg.hi - seg.base * self.block_size).tolist()
        queries = seg.n.tolist()
        self.groups: list[_Group] = []
        i = 0
        while i < len(queries):  # greedy, with running maxima: linear in the number of segments
            j, max_q, max_k = i + 1, queries[i], keys[i]
            while j < len(queries):
                q, k = max(max_q, queries[j]), max(max_k, keys[j])
                if (j + 1 - i) * q * k > GROUP_ELEMS:
                    break
                max_q, max_k, j = q, k, j + 1
            self.groups.append(self._group(seg, slice(i, j)))
            i = j

    def _segments(self) -> _Segments:
        """Split each sequence's queries at chunk boundaries and bound each piece's keys."""
        index, params, bs = self.index, self.params, self.block_size
        seqs = np.flatnonzero(index.query_lens > 0)
        n, lens = index.query_lens[seqs], index.seq_lens[seqs]
        q0 = index.query_start_loc[seqs]
        t0 = lens - n
        c = params.chunk_size
        if c is not None:  # cut at every chunk boundary a sequence's queries cross
            pieces = (t0 + n - 1) // c - t0 // c + 1
            seqs, lens = np.repeat(seqs, pieces), np.repeat(lens, pieces)
            first = np.repeat(t0, pieces)
            k = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece in its sequence
            start = np.maximum(first, (first // c + k) * c)  # first position of each piece
            end = np.minimum(np.repeat(t0 + n, pieces), (first // c + k + 1) * c)
            q0 = np.repeat(q0, pieces) + start - first
            t0, n = start, end - start
        bounded = params.causal or params.sliding_window is not None  # a window implies p <= t as well
        base = first_visible(t0, params) // bs
        hi = t0 + n if bounded else lens if c is None else np.minimum(lens, (t0 // c + 1) * c)
        return _Segments(seqs, q0, n, t0, base, hi)

    def _group(self, seg: _Segments, part: slice) -> _Group:
        bs, params, dev = self.block_size, self.params, self.device
        index = self.index
        n, t0, base, hi = seg.n[part], seg.t0[part], seg.base[part], seg.hi[part]
        seq_len = index.seq_lens[seg.seq[part]]
        keys_of = hi - base * bs
        count, max_q, max_keys = n.size, int(n.max()), int(keys_of.max())
        nblk = -(-max_keys // bs)
        width = index.block_tables.shape[1]
        cols = np.minimum(base[:, None] + np.arange(nblk)[None, :], width - 1)
        used = np.arange(nblk)[None, :] < (-(-keys_of // bs))[:, None]
        tables = np.take_along_axis(index.block_tables[seg.seq[part]], cols, axis=1)
        ids = torch.from_numpy(np.ascontiguousarray(np.where(used, tables, 0).reshape(-1))).to(dev)
        q0, q1 = int(seg.q0[part][0]), int(seg.q0[part][-1] + n[-1])
        rows = None
        if count > 1:  # row of each query in the padded [count, max_q] layout
            offset = np.arange(q1 - q0) - np.repeat(np.cumsum(n) - n, n)
            rows = torch.from_numpy(np.repeat(np.arange(count), n) * max_q + offset).to(dev)
        w, c = params.sliding_window, params.chunk_size
        # one unpadded causal segment whose keys are exactly its queries' positions: SDPA's top-left causal mask
        is_causal = count == 1 and params.causal and w is None and max_q == max_keys
        # one segment that sees all of its keys (no window, and a chunk that starts where its keys do)
        sees_all = count == 1 and not params.causal and w is None and (
            c is None or int(base[0]) * bs == int(t0[0]) // c * c)
        keys = max_keys if count == 1 else nblk * bs
        mask = None
        if not is_causal and not sees_all:
            t = t0[:, None] + np.arange(max_q)[None, :]  # [count, max_q] positions
            p = (base * bs)[:, None, None] + np.arange(keys)[None, None, :]  # [count, 1, keys] positions
            visible = p < seq_len[:, None, None]
            if params.causal or w is not None:
                visible = visible & (p <= t[:, :, None])
            if w is not None:
                visible = visible & (p > t[:, :, None] - w)
            if c is not None:
                visible = visible & (p // c == t[:, :, None] // c)
            visible = visible & (np.arange(max_q)[None, :] < n[:, None])[:, :, None]
            mask = torch.from_numpy(visible[:, None]).to(dev)
        # slots gathered but owned by no segment (padding blocks, the tail of a last block) may hold NaN or Inf
        # left by another sequence: masking their scores is not enough (0 * NaN = NaN), their K/V are zeroed
        owned = np.arange(keys)[None, :] < np.minimum(keys_of, seq_len - base * bs)[:, None]
        foreign = None if owned.all() else torch.from_numpy(~owned[:, None, :, None]).to(dev)
        return _Group(q0, q1, count, max_q, keys, ids, rows, mask, is_causal, foreign)

    @torch.no_grad()
    def run(self, q, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [num_queries, num_q_heads, head_dim]`` -> attention output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device).
        """
        q, layer, num_q_heads = self.check(q, layer)
        sink = self.sinks(sinks, num_q_heads)
        if len(self.groups) == 1 and self.groups[0].q1 - self.groups[0].q0 == q.shape[0]:
            return self._run_group(self.groups[0], q, layer, num_q_heads, sink).to(q.dtype)
        out = torch.zeros_like(q)
        for g in self.groups:
            out[g.q0:g.q1] = self._run_group(g, q[g.q0:g.q1], layer, num_q_heads, sink).to(q.dtype)
        return out

    def _run_group(self, g: _Group, q: torch.Tensor, layer: int, num_q_heads: int,
                   sink: torch.Tensor | None) -> torch.Tensor:
        dim = self.head_dim
        k, v = self._gather(g, layer)
        if g.rows is None:
            qp = q.view(1, g.max_q, num_q_heads, dim)
        else:
            qp = q.new_zeros(g.count * g.max_q, num_q_heads, dim).index_copy_(0, g.rows, q)
            qp = qp.view(g.count, g.max_q, num_q_heads, dim)
        qp = qp.transpose(1, 2).to(k.dtype)  # [count, heads, max_q, dim]
        if self.params.soft_cap is None and sink is None:
            o = sdpa(qp, k, v, g.mask, g.is_causal, self.params.scale)
        else:
            o = self._explicit(g, qp, k, v, sink)
        o = o.transpose(1, 2).reshape(g.count * g.max_q, num_q_heads, dim)
        return o if g.rows is None else o.index_select(0, g.rows)

    def _gather(self, g: _Group, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the group as ``[count, kv_heads, keys, dim]`` (float32 if quantized); slots no segment owns are 0."""
        kv, dim = self.num_kv_heads, self.head_dim
        out = []
        scales = self.storage.scales(layer)
        for i, pool in enumerate(self.storage.pools(layer)):
            blocks = take(pool, 0, g.ids)
            if scales is not None:
                blocks = dequantize_blocks(blocks, scales[i].index_select(0, g.ids))
            part = blocks.view(g.count, -1, kv, dim)[:, : g.keys].transpose(1, 2)
            out.append(part if g.foreign is None else part.masked_fill(g.foreign, 0))
        return out[0], out[1]

    def _explicit(self, g: _Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sink: torch.Tensor | None) -> torch.Tensor:
        """Soft-capped and/or sink attention, grouped: ``[a, kv, group * rows, dim] x [a, kv, dim, keys]`` per query chunk.

        ``sink [num_q_heads]`` float32 or None: each head's logit joins its
        softmax's denominator only (a key with no value).
        """
        a, heads, nq, dim = q.shape
        kv = k.shape[1]
        group, keys = heads // kv, k.shape[2]
        cap, scale = self.params.soft_cap, self.params.scale
        k32, v32 = k.float(), v.float()
        rows = max(1, SCORE_CHUNK_BYTES // max(1, a * heads * keys * 4))
        out = torch.empty(a, heads, nq, dim, dtype=torch.float32, device=q.device)
        q5 = q.float().view(a, kv, group, nq, dim)
        sink5 = None if sink is None else sink.view(1, kv, group, 1, 1)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            qc = q5[:, :, :, r0:r1].reshape(a, kv, group * (r1 - r0), dim)
            s = torch.matmul(qc, k32.transpose(-1, -2)).mul_(scale)
            if cap is not None:
                s = s.div_(cap).tanh_().mul_(cap)
            s = s.view(a, kv, group, r1 - r0, keys)
            if g.mask is not None:
                s.masked_fill_(~g.mask[:, :, None, r0:r1], float("-inf"))
            elif g.is_causal:
                p = torch.arange(keys, device=q.device)
                s.masked_fill_(p[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
            if sink5 is None:
                p = torch.softmax(s, dim=-1)
            else:
                top = torch.maximum(s.amax(dim=-1, keepdim=True), sink5)
                p = s.sub_(top).exp_()
                p /= p.sum(dim=-1, keepdim=True) + (sink5 - top).exp_()
            p = p.view(a, kv, group * (r1 - r0), keys)
            out.view(a, kv, group, nq, dim)[:, :, :, r0:r1] = torch.matmul(p, v32).view(a, kv, group, r1 - r0, dim)
        return out
