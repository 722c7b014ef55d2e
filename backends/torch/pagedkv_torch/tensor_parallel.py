"""Tensor parallelism over attention heads (Megatron-style) with torch.distributed.

Each of ``world_size`` ranks holds ``num_kv_heads / world_size`` KV heads of
every block, and computes attention for the matching ``num_q_heads /
world_size`` query heads. Rank ``r`` holds KV heads ``[r*Hkv/W, (r+1)*Hkv/W)``
and query heads ``[r*Hq/W, (r+1)*Hq/W)``; since GQA query head ``h`` reads KV
head ``h // (Hq/Hkv)``, this contiguous split keeps every query head on the
rank of its KV head, so attention needs no communication until the outputs
are gathered (or, in an engine, until the output projection's all-reduce).

A rank's storage is the backend's ordinary storage built with
:meth:`HeadShard.local_config`; nothing in the core knows about sharding.

**The manager runs identically on every rank** instead of rank 0 deciding and
broadcasting block tables (vLLM's way). :class:`~pagedkv_core.manager.facade.PagedKvCacheManager`
is a deterministic function of its call sequence once its clock is injected
(a step counter, say), so replicas fed the same calls make the same
decisions: the same block ids, the same copy-on-write copies, swaps and
defragmentation moves, each then applied by the rank to its own shard. That
saves one collective per step on the critical path and keeps every data
movement local. The price: inputs (request ids, token ids, the clock's
readings, the order of calls) must be identical on all ranks. A replica that
drifts would address other blocks than its peers, silently mixing
sequences; :func:`assert_ranks_agree` compares :func:`state_digest` across
ranks and raises :class:`~pagedkv_core.errors.RanksDiverged`, cheap enough to
run every few hundred steps or after admission and preemption.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.attention import (
    Attention,
    AttentionBase,
    AttentionParams,
    AttentionPlan,
    BatchIndex,
    check_sinks,
)
from pagedkv_core.errors import InvalidArgument, RanksDiverged, ShapeMismatch

if TYPE_CHECKING:
    from pagedkv_core.manager.facade import PagedKvCacheManager

__all__ = [
    "HeadShard",
    "TensorParallelAttention",
    "TensorParallelPlan",
    "state_digest",
    "assert_ranks_agree",
    "min_across_ranks",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup; None means the default group


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgument(f"{what} needs torch.distributed initialised (call init_process_group first)")


def _collective_device(group: ProcessGroup) -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend (gloo, mpi) takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True, slots=True)
class HeadShard:
    """Which query and KV heads one rank holds.

    Ranks must hold whole KV heads (``num_kv_heads % world_size == 0``):
    replicating a KV head on several ranks, as vLLM does when there are more
    ranks than KV heads, is not supported.
    """

    rank: int
    world_size: int
    num_q_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        for name in ("world_size", "num_q_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"rank must be in [0, {self.world_size}), got {self.rank!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise InvalidArgument(f"num_q_heads={self.num_q_heads} must be a multiple of "
                                  f"num_kv_heads={self.num_kv_heads} (GQA groups)")
        if self.num_kv_heads % self.world_size:
            raise InvalidArgument(f"num_kv_heads={self.num_kv_heads} is not divisible by world_size="
                                  f"{self.world_size}: each rank must hold whole KV heads")
        if self.num_q_heads % self.world_size:  # implied by the two checks above; kept for a clear message
            raise InvalidArgument(f"num_q_heads={self.num_q_heads} is not divisible by world_size={self.world_size}")

    @classmethod
    def from_group(cls, group: ProcessGroup, num_q_heads: int, num_kv_heads: int) -> HeadShard:
        """This process's shard in ``group`` (``None``: the default group)."""
        _require_initialized("HeadShard.from_group")
        return cls(dist.get_rank(group), dist.get_world_size(group), num_q_heads, num_kv_heads)

    @property
    def local_q_heads(self) -> int:
        return self.num_q_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def q_slice(self) -> slice:
        """This rank's query heads within all ``num_q_heads``."""
        n = self.local_q_heads
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_slice(self) -> slice:
        """This rank's KV heads within all ``num_kv_heads``."""
        n = self.local_kv_heads
        return slice(self.rank * n, (self.rank + 1) * n)

    def local_config(self, config: CacheConfig) -> CacheConfig:
        """``config`` (of the whole model) with only this rank's KV heads: build the rank's storage with it."""
        if config.num_kv_heads != self.num_kv_heads:
            raise InvalidArgument(f"config has num_kv_heads={config.num_kv_heads}, the shard was made for "
                                  f"{self.num_kv_heads}; pass the full model's config")
        return dataclasses.replace(config, num_kv_heads=self.local_kv_heads)

    def local_q(self, q: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a full query ``[tokens, num_q_heads, head_dim]`` (a dense copy)."""
        return self._slice(q, "q", self.num_q_heads, self.q_slice)

    def local_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a full K or V ``[tokens, num_kv_heads, head_dim]`` (a dense copy)."""
        return self._slice(kv, "k/v", self.num_kv_heads, self.kv_slice)

    @staticmethod
    def _slice(x: torch.Tensor, name: str, heads: int, part: slice) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != heads:
            raise ShapeMismatch(f"{name} must be [tokens, {heads}, head_dim] (all heads), got {tuple(x.shape)}")
        return x[:, part].contiguous()  # kernels and collectives want dense tensors


class TensorParallelPlan:
    """A step's plan on this rank's shard; ``run`` returns every query head, gathered over the group."""

    def __init__(self, plan: AttentionPlan, shard: HeadShard, group: ProcessGroup) -> None:
        self.plan = plan
        self.shard = shard
        self.group = group

    def run(self, q_local: torch.Tensor, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q_local [tokens, local_q_heads, head_dim]`` -> ``[tokens, num_q_heads, head_dim]``, heads in rank order.

        ``sinks``: the layer's sink logits for *all* ``num_q_heads`` (the
        model's parameter as loaded, the same on every rank; host NumPy or a
        tensor); each rank passes its own heads' slice (``shard.q_slice``) to
        the wrapped plan, which checks the values. All heads rather than a
        local slice, because a ``[local_q_heads]`` array could not be told
        from a misplaced one.
        """
        shard = self.shard
        if len(q_local.shape) != 3 or q_local.shape[1] != shard.local_q_heads:
            # the wrapped attention would accept all heads too (GQA) and silently pair them with the wrong KV heads
            raise ShapeMismatch(f"q_local must hold this rank's {shard.local_q_heads} query heads "
                                f"[tokens, {shard.local_q_heads}, head_dim], got {tuple(q_local.shape)}")
        if sinks is None:
            out = self.plan.run(q_local, layer)
        else:
            check_sinks(tuple(getattr(sinks, "shape", ())), shard.num_q_heads)
            out = self.plan.run(q_local, layer, sinks=sinks[shard.q_slice])
        out = out.contiguous()
        if shard.world_size == 1:
            return out
        parts = [torch.empty_like(out) for _ in range(shard.world_size)]
        # all_gather (a list) works on every backend; all_gather_into_tensor is missing on some and deprecated
        # in recent torch, and would still need a transpose to put heads in order
        dist.all_gather(parts, out, group=self.group)
        return torch.cat(parts, dim=1)


class TensorParallelAttention(AttentionBase):
    """Wraps any pagedkv attention so that it runs on this rank's heads and returns all heads.

    ``decode(q_local, storage, layer, block_tables, seq_lens, **kw)`` and
    ``prefill(q_local, ..., query_start_loc, **kw)`` take the keyword
    arguments of the wrapped attention (``scale``, ``sliding_window``,
    ``soft_cap``, ``chunk_size``, ``causal``, and ``sinks`` for all
    ``num_q_heads``, sliced per rank) and return ``[tokens, num_q_heads, head_dim]``:
    unlike the :class:`~pagedkv_core.contract.attention.Attention` contract, the output
    has more heads than the query. ``plan`` builds a step's batch work once
    for every layer, as the wrapped attention's does; each ``run`` is one
    ``all_gather``. ``storage`` is this rank's storage (``shard.local_config``).
    """

    def __init__(self, attention: Attention, shard: HeadShard, group: ProcessGroup = None) -> None:
        if shard.world_size > 1:
            _require_initialized("TensorParallelAttention")
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            if (rank, world) != (shard.rank, shard.world_size):
                raise InvalidArgument(f"shard is rank {shard.rank} of {shard.world_size}, the group says "
                                      f"rank {rank} of {world}")
        self.attention = attention
        self.shard = shard
        self.group = group

    def plan(self, storage, block_tables, seq_lens, query_start_loc=None, *, causal=True, scale=None,
             sliding_window=None, soft_cap=None, chunk_size=None, cascade=None) -> TensorParallelPlan:
        """See :meth:`pagedkv_core.contract.attention.Attention.plan`; the batch arrays are the same on every rank.

        Delegates to the wrapped attention's ``plan`` (which validates the
        arrays), so any :class:`~pagedkv_core.contract.attention.Attention` can be wrapped
        (``chunk_size`` and ``cascade`` are passed on only when set: an
        attention written before they existed still wraps; a cascade layout
        describes block ids, the same on every rank).
        """
        self._check_shard(storage)
        extra: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
        if cascade is not None:
            extra["cascade"] = cascade
        plan = self.attention.plan(storage, block_tables, seq_lens, query_start_loc, causal=causal, scale=scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap, **extra)
        return TensorParallelPlan(plan, self.shard, self.group)

    def plan_index(self, storage, index: BatchIndex, params: AttentionParams) -> TensorParallelPlan:
        """The wrapped attention's ``plan_index`` on this rank's shard (it bounds-checks ``index``).

        A wrapped attention without ``plan_index`` (one written to the bare
        protocol) gets the index checked here and passed to its ``plan``.
        """
        self._check_shard(storage)
        inner = getattr(self.attention, "plan_index", None)
        if inner is None:
            return super().plan_index(storage, index, params)  # check_index_bounds, then self.plan
        return TensorParallelPlan(inner(storage, index, params), self.shard, self.group)

    def _check_shard(self, storage) -> None:
        config = self.check_storage(storage)
        if config.num_kv_heads != self.shard.local_kv_heads:
            raise ShapeMismatch(f"storage holds {config.num_kv_heads} KV heads, this rank's shard has "
                                f"{self.shard.local_kv_heads}; build it with shard.local_config(config)")


# -- keeping the replicated managers honest ----------------------------------------------------------


def _ints(h: Any, label: str, values: Any) -> None:
    data = np.asarray(values, np.int64)
    h.update(f"{label}[{data.size}]".encode())
    h.update(data.tobytes())


def state_digest(manager: PagedKvCacheManager) -> str:
    """A sha256 of the bookkeeping that decides which blocks hold what, equal on ranks that agree.

    Covers, in order: every live sequence (id, state, length, position
    offset, last access time, block table or host blocks), ref counts, the
    free queue (the order blocks will be handed out and cached ones
    evicted), the prefix-hash index (hash per block, with the time each free
    cached block was freed) and host-tier usage. Clock readings are included
    on purpose: LRU eviction and TTL expiry decide on them, so a clock that
    differs across ranks is caught at the first check, not at the first
    eviction. O(num_blocks) work: a check to run every so often, not every step.
    """
    h = hashlib.sha256()
    pool = manager.pool
    with manager.lock:  # one consistent snapshot even if another thread drives the manager
        for rid in manager.request_ids():
            handle, stats = manager.get_handle(rid), manager.handle_stats(rid)
            table = handle.block_table
            h.update(f"seq {rid!r} {handle.state.value} {table.num_tokens} {handle.position_offset} "
                     f"{stats.last_access!r} {stats.blocks_allocated}".encode())
            _ints(h, "blocks", table.block_ids)
        _ints(h, "ref", pool.ref)
        _ints(h, "free", list(pool.free_queue()))
        for block, block_hash in sorted((b, k) for k, b in pool.cached.items()):
            h.update(f"cached {block} {block_hash!r} {pool.free_cached.get(block)!r}".encode())
        h.update(f"host {manager.host_used}/{manager.host_capacity}".encode())
    return h.hexdigest()


def assert_ranks_agree(manager: PagedKvCacheManager, group: ProcessGroup = None) -> str:
    """Compare :func:`state_digest` across the group; return it, or raise ``RanksDiverged`` on every rank.

    A collective: every rank of ``group`` must call it at the same point of its call sequence (with
    NCCL, after ``torch.cuda.set_device``, as ``all_gather_object`` requires).
    """
    _require_initialized("assert_ranks_agree")
    digest = state_digest(manager)
    digests: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        raise RanksDiverged(digests)
    return digest


def min_across_ranks(group: ProcessGroup = None) -> Callable[[int], int]:
    """A function that all-reduces an int with MIN over ``group`` (a collective each call).

    For decisions a rank cannot take alone, e.g. how many remote prefix-cache
    hits to load when ranks found different numbers: all must load the same.
    """

    def reduce_min(value: int) -> int:
        _require_initialized("min_across_ranks")
        t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device(group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t.item())

    return reduce_min
