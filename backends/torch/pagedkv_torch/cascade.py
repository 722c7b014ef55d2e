"""Cascade (shared-prefix) decode: a group's shared blocks are read once for all its queries.

Why: when 32 sequences share a 2,048-token prompt, the ordinary decode reads
those keys 32 times, each time for one query (a matrix-vector product, bound
by memory). Here a group's shared blocks are read once per layer and
multiplied with every query of the group at once: per KV head, the ``rows x
group`` query heads that read it form one matrix, so scores and weighted
values are two matrix-matrix products, which run at the arithmetic rate
instead of the memory rate (``cascade_shared``: torch's CPU flash kernel in
the pool's dtype where it applies, float32 ``torch.matmul`` tiles elsewhere).

Each member's own blocks (its level after ``shared_tokens``) are a decode
batch of their own: on CPU pools where the compiled decode kernel runs (the
attention's ``native`` kernel, ``auto`` picks it) it decodes them and returns
each query head's log-sum-exp beside the output (``NativeDecodePlan.state``);
elsewhere the torch-op decode's tiles do (``plan_decode_tiles``: rows longest
first, a K pass, one softmax, a V pass). The two levels are merged by their
log-sum-exps (FlashInfer's ``merge_state``), and sinks join the merged
denominator once. Rows in no group run the attention's ordinary plan (on the
CPU the compiled decode), so a batch without sharing costs what it did.

Numbers: softmax and accumulation are float32 for every pool dtype; the
shared level's products of a bfloat16 pool multiply bfloat16 values with
float32 accumulation (``cascade_shared`` says what is rounded); the output
has q's dtype. Quantized (int8, float8) pools are planned the ordinary way,
which gives the same result (their scales are per block and head, so the
shared level would need its own dequantizing gather; not worth it until
someone runs cascade on them).

Devices: plain torch ops on the storage's device. Every index tensor is
built at plan time; ``run`` makes no host sync beyond the ordinary plan's
(the finiteness check of device sinks, done once by whichever plan sees them
first). Slots a member must not see in its own blocks (a last block's unused
tail, padding) are never read by the compiled kernel, and are masked in the
scores and zeroed in the gathered values by the torch-op one, since a weight
of 0 does not cancel a NaN left there by another sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionParams, AttentionPlan, BatchIndex, check_index_bounds
from pagedkv_core.contract.cascade import check_cascade

from .cascade_shared import _NO_MAX, SHARED_TILE_TOKENS, SharedLevel, merge_states
from .native_decode import NativeDecodePlan
from .plan_base import TorchPlanBase
from .storage import TorchStorage
from .torch_decode import DEFAULT_TILE_BYTES, TorchDecodePlan

if TYPE_CHECKING:
    from .attention import TorchAttention

__all__ = ["TorchCascadePlan", "cascade_plan", "SHARED_TILE_TOKENS"]



def cascade_plan(attention: TorchAttention, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 layout: CascadeLayout) -> AttentionPlan:
    """The plan of a decode batch with shared prefixes (``TorchAttention.plan_cascade``).

    ``index`` and ``layout`` are checked again (both cheap, O(batch + groups)):
    this entry is public, and a layout that lies would read the wrong keys.
    A layout without groups, or a quantized pool, gets the ordinary plan.
    The members' own levels run the compiled decode where the ordinary plan
    would (``kernel_for`` says ``native``), else the torch-op decode.
    """
    config = attention.check_storage(storage)
    attention.kernel_for(storage)  # the same refusal as the ordinary plan (a kernel this device cannot run)
    index = check_index_bounds(index, config)
    layout = check_cascade(layout, index.block_tables, index.seq_lens, index.is_decode, config,
                           sliding_window=params.sliding_window, chunk_size=params.chunk_size)
    if storage.quantized or layout.num_groups == 0:
        return attention.plan_index(storage, index, params)
    rest = layout.ungrouped_rows()
    rest_plan = attention.plan_index(storage, index.decode_rows(rest), params) if rest.size else None
    native = attention.kernel_for(storage) == "native"
    return TorchCascadePlan(storage, index, params, layout, rest_plan, rest, attention.tile_bytes, native=native)


class TorchCascadePlan(TorchPlanBase):
    """A decode step whose groups read their shared blocks once; ``run`` per layer like any plan.

    ``rest_plan`` is the ordinary plan of the batch rows ``rest_rows`` (those
    in no group), ``None`` when every row is in a group. ``native``: the
    members' own levels run the compiled CPU decode (else the torch-op decode,
    whose tiles are ``tile_bytes``). Like the torch-op decode, a plan keeps
    its scratch buffers across ``run`` calls (fresh large buffers would cost
    page faults on every layer), so one plan serves one thread at a time.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams, layout: CascadeLayout,
                 rest_plan: AttentionPlan | None, rest_rows: np.ndarray, tile_bytes: int = DEFAULT_TILE_BYTES,
                 *, native: bool = False) -> None:
        super().__init__(storage, index, params)
        dev = self.device
        self.rest_plan = rest_plan
        self.rest_rows = _ids(rest_rows, dev)
        self.members = _ids(layout.members, dev)
        groups = []
        for g in range(layout.num_groups):
            _, ids = layout.group(g)
            groups.append((int(layout.group_indptr[g]), int(layout.group_indptr[g + 1]), _ids(ids, dev)))
        self.shared = SharedLevel(groups, self.num_kv_heads, self.head_dim, self.block_size, params.scale,
                                  params.soft_cap, storage.dtype, dev)
        self.own = self._plan_own(layout, tile_bytes, native)
        # every member has an own level (the own batch is the member order): no index copies of its state
        self.own_everyone = self.own is not None and self.own.positions.numel() == self.members.numel()
        # every row a member, in batch order: the merged output is the whole output (no index copies)
        self.identity = rest_plan is None and bool((layout.members == np.arange(index.batch)).all())

    def _plan_own(self, layout: CascadeLayout, tile_bytes: int, native: bool) -> _OwnLevel | _NativeOwnLevel | None:
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
        batch_rows, positions = _ids(members[rows], self.device), _ids(rows, self.device)
        if native:
            return _NativeOwnLevel(self.storage, rebased, self.params, batch_rows, positions)
        return _OwnLevel(self.storage, rebased, self.params, tile_bytes, batch_rows, positions)

    @torch.no_grad()
    def run(self, q: Any, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device), checked like the
        ordinary plan checks them (the same typed errors).
        """
        q, layer, num_q_heads = self.check(q, layer)
        out = None if self.identity else torch.empty_like(q)
        if self.rest_plan is not None and out is not None:
            options = {} if sinks is None else {"sinks": sinks}  # the ordinary plan checks them first
            rest = self.rest_plan.run(q.index_select(0, self.rest_rows), layer, **options)
            out.index_copy_(0, self.rest_rows, rest)
            sink = None if sinks is None else self._checked_sinks(sinks)
        else:
            sink = self.sinks(sinks, num_q_heads)
        kv, dim = self.num_kv_heads, self.head_dim
        group, rows = num_q_heads // kv, self.members.numel()
        qs = (q if self.identity else q.index_select(0, self.members)).view(rows, kv, group, dim)
        shared = self.shared(qs, self.storage.pools(layer))
        own = self._own_level(q, layer, num_q_heads)
        merged, _ = merge_states(shared, own, None if sink is None else sink.view(1, kv, group))
        merged = merged.view(rows, num_q_heads, dim)
        if out is None:
            return merged.to(q.dtype)
        out.index_copy_(0, self.members, merged.to(q.dtype))
        return out

    def _checked_sinks(self, sinks: Any) -> torch.Tensor:
        """Sinks the ordinary plan of the other rows has just checked, as float32 on the device (no second sync)."""
        if isinstance(sinks, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(sinks, dtype=np.float32)).to(self.device)
        tensor: torch.Tensor = sinks  # a float tensor on this device: the ordinary plan checked it
        return tensor.detach().to(torch.float32)

    def _own_level(self, q: torch.Tensor, layer: int, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [rows, kv, group, dim], lse [rows, kv, group])`` over each member's own blocks, in member
        order; a member without any has ``lse = _NO_MAX`` (weight 0 in the merge)."""
        rows, kv = self.members.numel(), self.num_kv_heads
        group = num_q_heads // kv
        shape = (rows, kv, group)
        if self.own is None:
            return (torch.zeros(*shape, self.head_dim, dtype=torch.float32, device=self.device),
                    torch.full(shape, _NO_MAX, dtype=torch.float32, device=self.device))
        own_q = q if self.identity and self.own_everyone else q.index_select(0, self.own.batch_rows)
        o, lse = self.own.state(own_q, layer, num_q_heads)
        if self.own_everyone:  # every member has an own level, in member order
            return o.view(*shape, self.head_dim), lse.view(shape)
        out = torch.zeros(*shape, self.head_dim, dtype=torch.float32, device=self.device)
        top = torch.full(shape, _NO_MAX, dtype=torch.float32, device=self.device)
        out.index_copy_(0, self.own.positions, o.view(-1, kv, group, self.head_dim))
        top.index_copy_(0, self.own.positions, lse.view(-1, kv, group))
        return out, top


def _ids(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device`` from a copy of host ids (the layout's arrays are read-only views)."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


class _NativeOwnLevel(NativeDecodePlan):
    """The members' own blocks through the compiled CPU decode, which returns each query head's log-sum-exp.

    This index's rows are the batch rows ``batch_rows``, at ``positions`` in
    the cascade plan's member order.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 batch_rows: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__(storage, index, params)
        self.batch_rows, self.positions = batch_rows, positions

    def state(self, q: Any, layer: int, num_q_heads: int = 0, *, sinks: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [rows, num_q_heads, dim] float32, lse [rows, num_q_heads])`` of ``q [rows, num_q_heads, dim]``."""
        return super().state(q, layer, sinks=sinks)


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

    def state(self, q: torch.Tensor, layer: int, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [rows, kv, group, dim], lse [rows, kv, group])`` of ``q [rows, num_q_heads, dim]``."""
        kv = self.num_kv_heads
        group = num_q_heads // kv
        out = torch.empty(q.shape[0], kv, group, self.head_dim, dtype=torch.float32, device=self.device)
        lse = torch.empty(q.shape[0], kv, group, dtype=torch.float32, device=self.device)
        pools, scales = self.storage.pools(layer), self.storage.scales(layer)
        for g in self.groups:
            a, m, s_sum = self.group_state(g, q, num_q_heads, pools, scales)
            out[g.rows], lse[g.rows] = a / s_sum, (m + s_sum.log())[..., 0]
        return out, lse
