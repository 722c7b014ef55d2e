"""Cascade (shared-prefix) decode with torch ops: a group's shared blocks are read once for all its queries.

Why: when 32 sequences share a 2,048-token prompt, the ordinary decode reads
those keys 32 times, each time for one query (a matrix-vector product, bound
by memory). Here a group's shared blocks are gathered once per layer,
widened to float32, and multiplied with every query of the group at once:
per KV head, the ``rows x group`` query heads that read it form one matrix,
so scores and weighted values are two matrix-matrix products batched over
the KV heads (``torch.matmul``: MKL/oneDNN on the CPU, cuBLAS on CUDA), which
run at the arithmetic rate instead of the memory rate. Keys come in tiles of
``SHARED_TILE_TOKENS`` with an online softmax, so buffers stay bounded
whatever the prefix length.

Each member's own blocks (its level after ``shared_tokens``) are attended
like the torch-op decode (``plan_decode_tiles``: rows longest first, a K
pass, one softmax, a V pass), keeping the unnormalised state. The two levels
are merged by their maxima and sums (FlashInfer's ``merge_state``), and sinks
join the merged denominator once. Rows in no group run the attention's
ordinary plan (on the CPU the compiled decode), so a batch without sharing
costs what it did.

Numbers: scores, softmax and both products are float32 for float32, float16
and bfloat16 pools; the output has q's dtype. Quantized (int8, float8) pools
are planned the ordinary way, which gives the same result (their scales are
per block and head, so the shared level would need its own dequantizing
gather; not worth it until someone runs cascade on them).

Devices: plain torch ops on the storage's device. Every index tensor is
built at plan time; ``run`` makes no host sync beyond the ordinary plan's
(the finiteness check of device sinks, done once by whichever plan sees them
first). Slots a member must not see in its own blocks (a last block's unused
tail, padding) are masked in the scores and zeroed in the gathered values,
since a weight of 0 does not cancel a NaN left there by another sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionParams, AttentionPlan, BatchIndex, check_index_bounds
from pagedkv_core.contract.cascade import check_cascade

from .convert import take
from .plan_base import TorchPlanBase
from .storage import TorchStorage
from .torch_decode import DEFAULT_TILE_BYTES, TorchDecodePlan

if TYPE_CHECKING:
    from .attention import TorchAttention

__all__ = ["TorchCascadePlan", "cascade_plan", "SHARED_TILE_TOKENS"]

SHARED_TILE_TOKENS = 512
"""Shared-prefix keys per online-softmax step: bounds the scores (kv_heads x the group's queries x this) and keeps
a tile's float32 K (2 MiB with 8 KV heads of 128) in a core's L2; 256-1024 measured alike, 2,048 slower."""
_NO_MAX = torch.finfo(torch.float32).min
"""The running maximum before any key: finite, so ``exp(score - max)`` of a level without keys is 0, not NaN."""


def cascade_plan(attention: TorchAttention, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 layout: CascadeLayout) -> AttentionPlan:
    """The plan of a decode batch with shared prefixes (``TorchAttention.plan_cascade``).

    ``index`` and ``layout`` are checked again (both cheap, O(batch + groups)):
    this entry is public, and a layout that lies would read the wrong keys.
    A layout without groups, or a quantized pool, gets the ordinary plan.
    """
    config = attention.check_storage(storage)
    attention.kernel_for(storage)  # the same refusal as the ordinary plan (a kernel this device cannot run)
    index = check_index_bounds(index, config)
    layout = check_cascade(layout, index.block_tables, index.seq_lens, index.is_decode, config,
                           sliding_window=params.sliding_window, chunk_size=params.chunk_size)
    if storage.quantized or layout.num_groups == 0:
        return attention.plan_index(storage, index, params)
    rest = np.flatnonzero(layout.shared_tokens == 0)
    rest_plan = None
    if rest.size:
        ones = np.ones(rest.size, np.int64)
        rest_index = BatchIndex(index.block_tables[rest], index.seq_lens[rest],
                                np.arange(rest.size + 1, dtype=np.int64), ones, True)
        rest_plan = attention.plan_index(storage, rest_index, params)
    return TorchCascadePlan(storage, index, params, layout, rest_plan, rest, attention.tile_bytes)


@dataclass(frozen=True, slots=True)
class _SharedGroup:
    """Members ``start:end`` (positions in ``layout.members``) and their shared blocks, one id tensor per key tile."""

    start: int
    end: int
    tiles: tuple[torch.Tensor, ...]


class TorchCascadePlan(TorchPlanBase):
    """A decode step whose groups read their shared blocks once; ``run`` per layer like any plan.

    ``rest_plan`` is the ordinary plan of the batch rows ``rest_rows`` (those
    in no group), ``None`` when every row is in a group. ``tile_bytes``: the
    tiles of the members' own levels (the torch-op decode's setting). Like
    the torch-op decode, a plan keeps its scratch buffers across ``run``
    calls (fresh large buffers would cost page faults on every layer), so
    one plan serves one thread at a time.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams, layout: CascadeLayout,
                 rest_plan: AttentionPlan | None, rest_rows: np.ndarray, tile_bytes: int = DEFAULT_TILE_BYTES) -> None:
        super().__init__(storage, index, params)
        dev, bs = self.device, self.block_size
        self.rest_plan = rest_plan
        self.rest_rows = _ids(rest_rows, dev)
        self.members = _ids(layout.members, dev)
        tile = max(1, SHARED_TILE_TOKENS // bs)
        self.shared: list[_SharedGroup] = []
        for g in range(layout.num_groups):
            _, ids = layout.group(g)
            start, end = int(layout.group_indptr[g]), int(layout.group_indptr[g + 1])
            self.shared.append(_SharedGroup(start, end, tuple(
                _ids(ids[i:i + tile], dev) for i in range(0, ids.size, tile))))
        self.own = self._plan_own(layout, tile_bytes)
        self._scratch: dict[str, torch.Tensor] = {}

    def _plan_own(self, layout: CascadeLayout, tile_bytes: int) -> _OwnLevel | None:
        """The members' own levels as a decode batch of their own: each table rebased after its shared blocks.

        A member whose length ends with its shared prefix has no own level;
        it is left out (its state stays empty and the merge gives it weight 0).
        """
        bs, index, members = self.block_size, self.index, layout.members
        start = layout.shared_tokens[members]
        own = index.seq_lens[members] - start
        rows = np.flatnonzero(own > 0)  # positions in the member order
        if rows.size == 0:
            return None
        tables = index.block_tables[members[rows]]
        width = int((-(-own[rows] // bs)).max())
        cols = np.minimum(start[rows, None] // bs + np.arange(width)[None, :], tables.shape[1] - 1)
        rebased = BatchIndex(np.take_along_axis(tables, cols, axis=1), own[rows],
                             np.arange(rows.size + 1, dtype=np.int64), np.ones(rows.size, np.int64), True)
        return _OwnLevel(self.storage, rebased, self.params, tile_bytes, _ids(members[rows], self.device),
                         _ids(rows, self.device))

    @torch.no_grad()
    def run(self, q: Any, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device), checked like the
        ordinary plan checks them (the same typed errors).
        """
        q, layer, num_q_heads = self.check(q, layer)
        out = torch.empty_like(q)
        if self.rest_plan is not None:
            options = {} if sinks is None else {"sinks": sinks}  # the ordinary plan checks them first
            rest = self.rest_plan.run(q.index_select(0, self.rest_rows), layer, **options)
            out.index_copy_(0, self.rest_rows, rest)
            sink = None if sinks is None else self._checked_sinks(sinks)
        else:
            sink = self.sinks(sinks, num_q_heads)
        kv, dim = self.num_kv_heads, self.head_dim
        group, rows = num_q_heads // kv, self.members.numel()
        p = self.params
        mult = p.scale if p.soft_cap is None else p.scale / p.soft_cap  # soft-cap: tanh(s / cap) * cap
        qs = q.index_select(0, self.members).float().mul_(mult).view(rows, kv, group, dim)
        shared = self._shared_level(qs, self.storage.pools(layer))
        own = self._own_level(q, layer, num_q_heads)
        merged = _merge(shared, own, None if sink is None else sink.view(1, kv, group))
        out.index_copy_(0, self.members, merged.view(rows, num_q_heads, dim).to(q.dtype))
        return out

    def _checked_sinks(self, sinks: Any) -> torch.Tensor:
        """Sinks the ordinary plan of the other rows has just checked, as float32 on the device (no second sync)."""
        if isinstance(sinks, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(sinks, dtype=np.float32)).to(self.device)
        tensor: torch.Tensor = sinks  # a float tensor on this device: the ordinary plan checked it
        return tensor.detach().to(torch.float32)

    # -- the shared level: one matrix-matrix product per KV head for a whole group -------------

    def _shared_level(self, qs: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Unnormalised state ``(acc [rows, kv, group, dim], max, sum [rows, kv, group])`` over the shared blocks."""
        rows, kv, group, dim = qs.shape
        acc = torch.empty_like(qs)
        top = torch.empty(rows, kv, group, dtype=torch.float32, device=self.device)
        total = torch.empty_like(top)
        for g in self.shared:
            n = (g.end - g.start) * group
            qg = qs[g.start:g.end].transpose(0, 1).reshape(kv, n, dim)  # the group's queries of each KV head
            a = torch.zeros(kv, n, dim, dtype=torch.float32, device=self.device)
            m = torch.full((kv, n), _NO_MAX, dtype=torch.float32, device=self.device)
            s_sum = torch.zeros(kv, n, dtype=torch.float32, device=self.device)
            for ids in g.tiles:
                self._shared_tile(qg, ids, pools, a, m, s_sum)
            size = g.end - g.start
            acc[g.start:g.end] = a.view(kv, size, group, dim).transpose(0, 1)
            top[g.start:g.end] = m.view(kv, size, group).transpose(0, 1)
            total[g.start:g.end] = s_sum.view(kv, size, group).transpose(0, 1)
        return acc, top, total

    def _shared_tile(self, qg: torch.Tensor, ids: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor],
                     acc: torch.Tensor, top: torch.Tensor, total: torch.Tensor) -> None:
        """One online-softmax step of ``qg [kv, n, dim]`` over the blocks ``ids``; updates the state in place."""
        kv, n, _ = qg.shape
        keys = self._gather(pools[0], ids)  # [kv, slots, dim]
        s = self._buffer("scores", kv * n * keys.shape[1], torch.float32).view(kv, n, -1)
        torch.matmul(qg, keys.transpose(1, 2), out=s)
        if self.params.soft_cap is not None:
            s.tanh_().mul_(self.params.soft_cap)
        new_top = torch.maximum(top, s.amax(dim=-1))
        s.sub_(new_top[..., None]).exp_()
        correction = (top - new_top).exp_()
        total.mul_(correction).add_(s.sum(dim=-1))
        top.copy_(new_top)
        values = self._gather(pools[1], ids)  # the same buffer: the keys are no longer needed
        acc.mul_(correction[..., None]).baddbmm_(s, values)

    def _own_level(self, q: torch.Tensor, layer: int, num_q_heads: int) -> tuple[torch.Tensor, ...]:
        """Unnormalised state over each member's own blocks, in member order; empty (sum 0) for one without any."""
        rows, kv = self.members.numel(), self.num_kv_heads
        group = num_q_heads // kv
        acc = torch.zeros(rows, kv, group, self.head_dim, dtype=torch.float32, device=self.device)
        top = torch.full((rows, kv, group), _NO_MAX, dtype=torch.float32, device=self.device)
        total = torch.zeros_like(top)
        if self.own is not None:
            a, m, s_sum = self.own.state(q.index_select(0, self.own.batch_rows), layer, num_q_heads)
            acc.index_copy_(0, self.own.positions, a)
            top.index_copy_(0, self.own.positions, m)
            total.index_copy_(0, self.own.positions, s_sum)
        return acc, top, total

    # -- buffers -------------------------------------------------------------------------------

    def _gather(self, pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Blocks ``ids`` of ``pool`` as float32 ``[kv_heads, blocks * block_size, dim]`` (reused buffers).

        Float32 blocks are gathered as they are and viewed head-major (a
        strided view the batched matmul takes as it is); narrower ones are
        widened into a head-major copy, which costs what a plain widening does.
        """
        kv, dim, bs = self.num_kv_heads, self.head_dim, self.block_size
        n = ids.numel()
        raw = self._buffer("raw", n * bs * kv * dim, pool.dtype).view(n, bs, kv, dim)
        take(pool, 0, ids, out=raw)
        tokens = raw.view(n * bs, kv, dim).transpose(0, 1)
        if pool.dtype == torch.float32:
            return tokens
        return self._buffer("wide", raw.numel(), torch.float32).view(kv, n * bs, dim).copy_(tokens)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor kept across layers: fresh large allocations cost page faults on every call."""
        buf = self._scratch.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel]


def _ids(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device`` from a copy of host ids (the layout's arrays are read-only views)."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


def _merge(shared: tuple[torch.Tensor, ...], own: tuple[torch.Tensor, ...],
           sink: torch.Tensor | None) -> torch.Tensor:
    """Merge two unnormalised softmax states ``(acc, max, sum)``; a sink joins the denominator once."""
    acc_a, top_a, sum_a = shared
    acc_b, top_b, sum_b = own
    top = torch.maximum(top_a, top_b)
    if sink is not None:
        top = torch.maximum(top, sink)
    w_a, w_b = (top_a - top).exp_(), (top_b - top).exp_()
    total = sum_a * w_a + sum_b * w_b
    if sink is not None:
        total += (sink - top).exp_()
    return (acc_a * w_a[..., None] + acc_b * w_b[..., None]) / total[..., None]


class _OwnLevel(TorchDecodePlan):
    """The members' own blocks, decoded like the torch-op decode but keeping each row's softmax state.

    Inherits the tiles (rows longest first, about ``tile_bytes`` of K each,
    gathered into a reused buffer while they fit the cache) and the matmuls
    (NumPy on zero-copy views on the CPU, torch elsewhere). Slots a row must
    not see are masked in the scores and zeroed in the gathered values: a
    weight of 0 does not cancel a NaN another sequence left in a block's tail.
    This index's rows are the batch rows ``batch_rows``, at ``positions`` in
    the cascade plan's member order.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams, tile_bytes: int,
                 batch_rows: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__(storage, index, params, tile_bytes)
        self.batch_rows, self.positions = batch_rows, positions

    def state(self, q: torch.Tensor, layer: int, num_q_heads: int) -> tuple[torch.Tensor, ...]:
        """``(acc [rows, kv, group, dim], max, sum [rows, kv, group])`` of ``q [rows, num_q_heads, dim]``."""
        kv = self.num_kv_heads
        group = num_q_heads // kv
        acc = torch.empty(q.shape[0], kv, group, self.head_dim, dtype=torch.float32, device=self.device)
        top = torch.empty(q.shape[0], kv, group, dtype=torch.float32, device=self.device)
        total = torch.empty_like(top)
        pools, scales = self.storage.pools(layer), self.storage.scales(layer)
        for g in self.groups:
            a, m, s_sum = self.group_state(g, q, num_q_heads, pools, scales)
            acc[g.rows], top[g.rows], total[g.rows] = a, m[..., 0], s_sum[..., 0]
        return acc, top, total

