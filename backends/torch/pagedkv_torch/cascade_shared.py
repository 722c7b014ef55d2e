"""The shared level of a cascade decode: a group's shared blocks read once for all its members' queries.

Per KV head, the ``members x group`` query heads that read it form one
matrix, so scores and weighted values are two matrix-matrix products, which
run at the arithmetic rate instead of the memory rate. The level returns each
query head's normalised output and log-sum-exp, which the cascade merges with
the members' own levels.

Two ways, picked per plan:

- **Fused** (CPU, no soft-cap, bfloat16 pools, torch has the op):
  the group's blocks are gathered in the pool's dtype into a reused buffer
  (``FUSED_TILE_TOKENS`` at a time) and handed, as a strided head-major view,
  to torch's CPU flash-attention kernel
  (``aten::_scaled_dot_product_flash_attention_for_cpu``), which returns the
  output and the log-sum-exp. For bfloat16 it multiplies bfloat16 with
  float32 accumulation (AMX/oneDNN where the CPU has it): scores and softmax
  stay float32, only the probabilities are rounded to bfloat16 before ``P @
  V`` (a relative 2^-9 on weights in [0, 1]), and the output is bfloat16
  before the merge; within the bfloat16 tolerance, and 3-4x faster than
  widening the blocks to float32 first (docs/benchmarks-torch.md).
  The op is private to torch: where it is missing (or refuses the call's
  shapes), the plan falls back to the tiled path for good.
- **Tiled** (everything else: float32 and float16, soft-cap, other devices): keys come in
  tiles of ``SHARED_TILE_TOKENS``, widened to float32, with an online softmax
  and ``torch.matmul`` (MKL/oneDNN on the CPU, cuBLAS on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from .convert import take

__all__ = ["SharedLevel", "SHARED_TILE_TOKENS", "FUSED_TILE_TOKENS", "fused_op"]

SHARED_TILE_TOKENS = 512
"""Tiled path: shared-prefix keys per online-softmax step: bounds the scores (kv_heads x the group's queries x this)
and keeps a tile's float32 K (2 MiB with 8 KV heads of 128) in a core's L2; 256-1024 measured alike, 2,048 slower."""
FUSED_TILE_TOKENS = 4096
"""Fused path: shared-prefix tokens per call of the flash kernel; bounds the gathered K and V buffers (8 MiB each
for bfloat16 with 8 KV heads of 128); a 2,048-token prompt is one call."""
FUSED_DTYPES = (torch.bfloat16,)
"""Pool dtypes the fused path takes: its float32 and float16 kernels ran 1.3x slower than the tiled path here
(float32: MKL's sgemm is faster than the flash kernel's own products; float16: no AMX path on this CPU)."""
_NO_MAX = torch.finfo(torch.float32).min
"""The running maximum before any key: finite, so ``exp(score - max)`` of a level without keys is 0, not NaN."""


def fused_op() -> Any:
    """torch's CPU flash-attention op (private, present since torch 2.2), or ``None`` where this torch lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class SharedLevel:
    """Computes ``(out [rows, kv, group, dim] float32, lse [rows, kv, group])`` over each group's shared blocks.

    ``groups``: ``(start, end, ids)`` per group, members ``start:end`` in the
    cascade's member order and their shared block ids (an int64 tensor on
    the device). Keeps reused scratch buffers, so one plan serves one thread
    at a time.
    """

    def __init__(self, groups: list[tuple[int, int, torch.Tensor]], num_kv_heads: int, head_dim: int,
                 block_size: int, scale: float, soft_cap: float | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kv, self.dim, self.bs = num_kv_heads, head_dim, block_size
        self.scale, self.soft_cap, self.device = scale, soft_cap, device
        self.fused = (device.type == "cpu" and soft_cap is None and dtype in FUSED_DTYPES
                      and fused_op() is not None)
        tokens = FUSED_TILE_TOKENS if self.fused else SHARED_TILE_TOKENS
        step = max(1, tokens // block_size)
        self.groups = [(start, end, tuple(ids[i:i + step] for i in range(0, ids.numel(), step)))
                       for start, end, ids in groups]
        self._scratch: dict[str, torch.Tensor] = {}

    def __call__(self, qs: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``qs [rows, kv, group, dim]``: the members' queries in q's dtype, in member order, unscaled."""
        rows, kv, group, dim = qs.shape
        out = torch.empty(rows, kv, group, dim, dtype=torch.float32, device=self.device)
        lse = torch.empty(rows, kv, group, dtype=torch.float32, device=self.device)
        for start, end, tiles in self.groups:
            size = end - start
            qg = qs[start:end].transpose(0, 1).reshape(kv, size * group, dim)  # the group's queries of each KV head
            o = l_ = None
            if self.fused:
                try:
                    o, l_ = self._fused(qg, tiles, pools)
                except (RuntimeError, TypeError):  # a torch whose private op refuses these: tiled from now on
                    self.fused = False
            if o is None or l_ is None:
                o, l_ = self._tiled(qg.float(), tiles, pools)
            out[start:end] = o.view(kv, size, group, dim).transpose(0, 1)
            lse[start:end] = l_.view(kv, size, group).transpose(0, 1)
        return out, lse

    # -- fused: torch's CPU flash kernel on the group's blocks in the pool's dtype ------------------

    def _fused(self, qg: torch.Tensor, tiles: tuple[torch.Tensor, ...],
               pools: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        op = fused_op()
        q4 = qg.to(pools[0].dtype).unsqueeze(0)
        out = lse = None
        for ids in tiles:
            keys = self._gather("k", pools[0], ids).unsqueeze(0)
            values = self._gather("v", pools[1], ids).unsqueeze(0)
            o, s = op(q4, keys, values, 0.0, False, scale=self.scale)
            o, s = o[0].float(), s[0].float()
            if out is None or lse is None:
                out, lse = o, s
            else:
                out, lse = merge_states((out, lse), (o, s))
        if out is None or lse is None:
            raise RuntimeError("a cascade group without shared blocks")
        return out, lse

    def _gather(self, name: str, pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Blocks ``ids`` of ``pool`` as a head-major view ``[kv_heads, blocks * block_size, dim]`` (pool dtype)."""
        kv, dim, bs, n = self.kv, self.dim, self.bs, ids.numel()
        raw = self._buffer(name, n * bs * kv * dim, pool.dtype).view(n, bs, kv, dim)
        take(pool, 0, ids, out=raw)
        return raw.view(n * bs, kv, dim).transpose(0, 1)

    # -- tiled: float32 matmuls with an online softmax ----------------------------------------------

    def _tiled(self, qg: torch.Tensor, tiles: tuple[torch.Tensor, ...],
               pools: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kv, n, dim = qg.shape
        mult = self.scale if self.soft_cap is None else self.scale / self.soft_cap  # soft-cap: tanh(s / cap) * cap
        qg = qg * mult
        acc = torch.zeros(kv, n, dim, dtype=torch.float32, device=self.device)
        top = torch.full((kv, n), _NO_MAX, dtype=torch.float32, device=self.device)
        total = torch.zeros(kv, n, dtype=torch.float32, device=self.device)
        for ids in tiles:
            keys = self._wide(pools[0], ids)  # [kv, slots, dim]
            s = self._buffer("scores", kv * n * keys.shape[1], torch.float32).view(kv, n, -1)
            torch.matmul(qg, keys.transpose(1, 2), out=s)
            if self.soft_cap is not None:
                s.tanh_().mul_(self.soft_cap)
            new_top = torch.maximum(top, s.amax(dim=-1))
            s.sub_(new_top[..., None]).exp_()
            correction = (top - new_top).exp_()
            total.mul_(correction).add_(s.sum(dim=-1))
            top.copy_(new_top)
            values = self._wide(pools[1], ids)  # the same buffer: the keys are no longer needed
            acc.mul_(correction[..., None]).baddbmm_(s, values)
        return acc.div_(total[..., None]), top.add_(total.log_())

    def _wide(self, pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Blocks ``ids`` as float32 ``[kv_heads, blocks * block_size, dim]``: float32 gathered and viewed
        head-major (a strided view the batched matmul takes as it is), narrower ones widened into a copy."""
        tokens = self._gather("k", pool, ids)
        if pool.dtype == torch.float32:
            return tokens
        wide = self._buffer("wide", tokens.numel(), torch.float32)
        return wide.view(self.kv, -1, self.dim).copy_(tokens)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor kept across layers: fresh large allocations cost page faults on every call."""
        buf = self._scratch.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel]


def merge_states(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                 sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised softmax states ``(out [..., dim], lse [...])`` (FlashInfer's ``merge_state``).

    A level without keys has ``lse = _NO_MAX`` (weight 0, not NaN); a sink,
    a logit with no value, joins the denominator once.
    """
    (out_a, lse_a), (out_b, lse_b) = a, b
    top = torch.maximum(lse_a, lse_b)
    if sink is not None:
        top = torch.maximum(top, sink)
    w_a, w_b = (lse_a - top).exp_(), (lse_b - top).exp_()
    total = w_a + w_b
    if sink is not None:
        total += (sink - top).exp_()
    out = (out_a * (w_a / total)[..., None]).add_(out_b * (w_b / total)[..., None])
    return out, total.log_().add_(top)
