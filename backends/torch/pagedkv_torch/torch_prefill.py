"""Paged prefill with torch ops (the CPU kernel; also the fallback on CUDA/MPS without Triton).

Prefill is compute-bound, so gathering a sequence's K/V through the block
table (one ``index_select`` of whole blocks) costs little next to attention
itself, which then runs in torch's fused ``scaled_dot_product_attention``
(flash attention on CPU, float32 softmax, GQA through ``enable_gqa`` without
repeated K/V). Consecutive sequences are padded together, in groups whose
mask stays under ``GROUP_ELEMS``, and masked: the query at position ``t``
sees ``p <= t`` (causal), ``t - w < p`` (window) and ``p < seq_len``. A
single causal sequence over no cached prefix uses ``is_causal`` and no mask. Soft-capping is not something SDPA does, so with ``soft_cap``
the same gathered K/V go through an explicit grouped matmul, chunked over
queries so the score matrix stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pagedkv_core.contract.attention import AttentionParams, BatchIndex

from .convert import take
from .plan_base import TorchPlanBase
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
    """Consecutive sequences padded together; their queries are rows ``q0:q1`` of the batch."""

    q0: int
    q1: int
    count: int
    max_q: int
    keys: int  # key slots per sequence after padding
    ids: torch.Tensor  # int64 [count * blocks]: blocks to gather (unused entries: block 0, masked)
    rows: torch.Tensor | None  # int64 [q1 - q0]: each query's row in [count * max_q]; None when unpadded
    mask: torch.Tensor | None  # bool [count, 1, max_q, keys]; None when is_causal or nothing is hidden
    is_causal: bool


class TorchPrefillPlan(TorchPlanBase):
    """One prefill step over a ragged batch (``query_start_loc``), ``run`` per layer.

    Sequences with queries are padded in groups of consecutive sequences whose
    score mask (``count * max_queries * keys``) stays under ``GROUP_ELEMS``,
    so memory is bounded whatever the batch.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        super().__init__(storage, index, params)
        index = self.index  # the checked int64 copy, not the caller's arrays
        active = np.flatnonzero(index.query_lens > 0)
        self.groups: list[_Group] = []
        i = 0
        while i < active.size:
            j = i + 1
            while j < active.size:
                seqs = active[i:j + 1]
                size = (j + 1 - i) * int(index.query_lens[seqs].max()) * int(index.seq_lens[seqs].max())
                if size > GROUP_ELEMS:
                    break
                j += 1
            self.groups.append(self._group(active[i:j]))
            i = j

    def _group(self, seqs: np.ndarray) -> _Group:
        bs, params, dev = self.block_size, self.params, self.device
        index = self.index
        n, seq_len = index.query_lens[seqs], index.seq_lens[seqs]
        count, max_q, max_len = seqs.size, int(n.max()), int(seq_len.max())
        nblk = -(-max_len // bs)
        tables = index.block_tables[seqs, :nblk]
        used = np.arange(tables.shape[1])[None, :] < (-(-seq_len // bs))[:, None]
        ids = torch.from_numpy(np.ascontiguousarray(np.where(used, tables, 0).reshape(-1))).to(dev)
        q0, q1 = int(index.query_start_loc[seqs[0]]), int(index.query_start_loc[seqs[-1] + 1])
        rows = None
        if count > 1:  # row of each query in the padded [count, max_q] layout
            offset = np.arange(q1 - q0) - np.repeat(np.cumsum(n) - n, n)
            rows = torch.from_numpy(np.repeat(np.arange(count), n) * max_q + offset).to(dev)
        w = params.sliding_window
        # one unpadded causal sequence over no cached prefix: SDPA's top-left causal mask is ours
        is_causal = count == 1 and params.causal and w is None and int(n[0]) == int(seq_len[0])
        keys = max_len if count == 1 else nblk * bs
        mask = None
        if not is_causal and not (count == 1 and not params.causal and w is None):
            t = (seq_len - n)[:, None] + np.arange(max_q)[None, :]  # [count, max_q] positions
            p = np.arange(keys)[None, None, :]
            visible = p < seq_len[:, None, None]
            if params.causal or w is not None:
                visible = visible & (p <= t[:, :, None])
            if w is not None:
                visible = visible & (p > t[:, :, None] - w)
            visible = visible & (np.arange(max_q)[None, :] < n[:, None])[:, :, None]
            mask = torch.from_numpy(visible[:, None]).to(dev)
        return _Group(q0, q1, count, max_q, keys, ids, rows, mask, is_causal)

    @torch.no_grad()
    def run(self, q, layer: int) -> torch.Tensor:
        """``q [num_queries, num_q_heads, head_dim]`` -> attention output of the same shape and dtype."""
        q, layer, num_q_heads = self.check(q, layer)
        if len(self.groups) == 1 and self.groups[0].q1 - self.groups[0].q0 == q.shape[0]:
            return self._run_group(self.groups[0], q, layer, num_q_heads).to(q.dtype)
        out = torch.zeros_like(q)
        for g in self.groups:
            out[g.q0:g.q1] = self._run_group(g, q[g.q0:g.q1], layer, num_q_heads).to(q.dtype)
        return out

    def _run_group(self, g: _Group, q: torch.Tensor, layer: int, num_q_heads: int) -> torch.Tensor:
        dim = self.head_dim
        k, v = self._gather(g, layer)
        if g.rows is None:
            qp = q.view(1, g.max_q, num_q_heads, dim)
        else:
            qp = q.new_zeros(g.count * g.max_q, num_q_heads, dim).index_copy_(0, g.rows, q)
            qp = qp.view(g.count, g.max_q, num_q_heads, dim)
        qp = qp.transpose(1, 2).to(k.dtype)  # [count, heads, max_q, dim]
        if self.params.soft_cap is None:
            o = sdpa(qp, k, v, g.mask, g.is_causal, self.params.scale)
        else:
            o = self._explicit(g, qp, k, v)
        o = o.transpose(1, 2).reshape(g.count * g.max_q, num_q_heads, dim)
        return o if g.rows is None else o.index_select(0, g.rows)

    def _gather(self, g: _Group, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the group as ``[count, kv_heads, keys, dim]`` views (float32 if quantized)."""
        kv, dim = self.num_kv_heads, self.head_dim
        out = []
        scales = self.storage.scales(layer)
        for i, pool in enumerate(self.storage.pools(layer)):
            blocks = take(pool, 0, g.ids)
            if scales is not None:
                blocks = dequantize_blocks(blocks, scales[i].index_select(0, g.ids))
            out.append(blocks.view(g.count, -1, kv, dim)[:, : g.keys].transpose(1, 2))
        return out[0], out[1]

    def _explicit(self, g: _Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Soft-capped attention, grouped: ``[a, kv, group * rows, dim] x [a, kv, dim, keys]`` per query chunk."""
        a, heads, nq, dim = q.shape
        kv = k.shape[1]
        group, keys = heads // kv, k.shape[2]
        cap, scale = self.params.soft_cap, self.params.scale
        k32, v32 = k.float(), v.float()
        rows = max(1, SCORE_CHUNK_BYTES // max(1, a * heads * keys * 4))
        out = torch.empty(a, heads, nq, dim, dtype=torch.float32, device=q.device)
        q5 = q.float().view(a, kv, group, nq, dim)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            qc = q5[:, :, :, r0:r1].reshape(a, kv, group * (r1 - r0), dim)
            s = torch.matmul(qc, k32.transpose(-1, -2)).mul_(scale)
            s = s.div_(cap).tanh_().mul_(cap).view(a, kv, group, r1 - r0, keys)
            if g.mask is not None:
                s.masked_fill_(~g.mask[:, :, None, r0:r1], float("-inf"))
            elif g.is_causal:
                p = torch.arange(keys, device=q.device)
                s.masked_fill_(p[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1).view(a, kv, group * (r1 - r0), keys)
            out.view(a, kv, group, nq, dim)[:, :, :, r0:r1] = torch.matmul(p, v32).view(a, kv, group, r1 - r0, dim)
        return out
