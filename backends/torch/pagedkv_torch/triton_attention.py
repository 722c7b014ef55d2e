"""Plans that launch the Triton kernels of ``triton_kernels`` (CUDA, or CPU tensors under the interpreter).

Batch-only work happens once per step in the plan: block tables, lengths and
query offsets become int32 device tensors, the decode split length and the
prefill tile list are chosen. ``run`` per layer only launches kernels (after
checking the layer's sinks, when given).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedkv_core.contract.attention import AttentionParams, BatchIndex

from . import triton_kernels as kernels
from .attention import triton_interpreting
from .plan_base import TorchPlanBase
from .storage import TorchStorage

__all__ = ["TritonDecodePlan", "TritonPrefillPlan"]

MIN_SPLIT_TOKENS = 256


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


def _int32(values: np.ndarray, device: torch.device) -> torch.Tensor:
    # entries past a sequence's blocks are never read; clip so garbage there cannot wrap around
    clipped = np.clip(values, -1, np.iinfo(np.int32).max).astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(clipped)).to(device)


class _TritonPlan(TorchPlanBase):
    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        super().__init__(storage, index, params)
        index = self.index  # the checked int64 copy, not the caller's arrays
        dev = self.device
        self.tables = _int32(index.block_tables, dev)
        self.lens = _int32(index.seq_lens, dev)
        self.d_pad = _pow2(self.head_dim)
        self.block_n = 16 if dev.type != "cuda" else 64

    def _flags(self, k_pool: torch.Tensor) -> dict:
        """Compile-time switches shared by both kernels."""
        p = self.params
        upcast = (self.storage.quantized or k_pool.dtype == torch.float32
                  or (k_pool.dtype == torch.bfloat16 and triton_interpreting()))
        return dict(HEAD_DIM=self.head_dim, D_PAD=self.d_pad, PAGE=self.block_size, BLOCK_N=self.block_n,
                    QUANT=self.storage.quantized, SOFT_CAP=p.soft_cap is not None,
                    WINDOW=p.sliding_window is not None, CHUNK=p.chunk_size is not None, UPCAST=upcast,
                    PRECISION="ieee" if upcast else "tf32")

    def _operands(self, layer: int):
        k_pool, v_pool = self.storage.pools(layer)
        scales = self.storage.scales(layer)
        ks, vs = scales if scales is not None else (k_pool, v_pool)  # never loaded when QUANT is off
        s_sb = ks.stride(0) if scales is not None else 0
        return k_pool, v_pool, ks, vs, s_sb

    def _scalars(self) -> tuple[float, float, int, int]:
        p = self.params
        return p.scale, p.soft_cap or 0.0, p.sliding_window or 0, p.chunk_size or 0


class TritonDecodePlan(_TritonPlan):
    """Decode: split-K over each sequence, one program per (sequence, KV head, split)."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 split_tokens: int | None = None) -> None:
        super().__init__(storage, index, params)
        index = self.index  # the checked int64 copy, not the caller's arrays
        longest = int(index.seq_lens.max()) if index.batch else 1
        if split_tokens is None:
            programs = max(1, index.batch * self.num_kv_heads)
            sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                   if self.device.type == "cuda" else 1)
            splits = max(1, min(-(-2 * sms // programs), -(-longest // MIN_SPLIT_TOKENS)))
            split_tokens = -(-longest // splits)
        self.split_len = -(-max(1, split_tokens) // self.block_n) * self.block_n
        self.num_splits = -(-longest // self.split_len)

    @torch.no_grad()
    def run(self, q, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device).
        """
        q, layer, num_q_heads = self.check(q, layer)
        sink = self.sinks(sinks, num_q_heads)
        out = torch.empty_like(q)
        if self.index.batch == 0:
            return out
        q = q.contiguous()
        k_pool, v_pool, ks, vs, s_sb = self._operands(layer)
        group = num_q_heads // self.num_kv_heads
        g_pad = _pow2(group)
        batch, kv, splits = self.index.batch, self.num_kv_heads, self.num_splits
        direct = splits == 1
        part_o = torch.empty((1,) if direct else (batch, kv, splits, g_pad, self.d_pad),
                             dtype=torch.float32, device=self.device)
        part_ml = torch.empty((1,) if direct else (batch, kv, splits, g_pad, 2), dtype=torch.float32,
                              device=self.device)
        scale, cap, window, chunk = self._scalars()
        flags = self._flags(k_pool)
        sinks_arg = part_ml if sink is None else sink  # never loaded when SINKS is off
        kernels.paged_decode_kernel[(batch, kv, splits)](
            q, k_pool, v_pool, ks, vs, self.tables, self.lens, out, part_o, part_ml, sinks_arg,
            scale, cap, window, chunk, self.storage.config.num_blocks, self.split_len,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), s_sb,
            self.tables.stride(0), out.stride(0), out.stride(1),
            GROUP=group, G_PAD=g_pad, DIRECT=direct, SINKS=sink is not None, **flags)
        if not direct:
            kernels.decode_reduce_kernel[(batch, kv)](
                part_o, part_ml, out, sinks_arg, splits, out.stride(0), out.stride(1),
                GROUP=group, G_PAD=g_pad, HEAD_DIM=self.head_dim, D_PAD=self.d_pad, SINKS=sink is not None)
        return out


class TritonPrefillPlan(_TritonPlan):
    """Prefill: one program per (query tile of one sequence, query head)."""

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> None:
        super().__init__(storage, index, params)
        index = self.index  # the checked int64 copy, not the caller's arrays
        self.block_m = 16 if self.device.type != "cuda" else 64
        qlens = index.query_lens
        tiles = -(-qlens // self.block_m)
        seq = np.repeat(np.arange(index.batch), tiles)
        first = np.repeat(np.cumsum(tiles) - tiles, tiles)
        rows = (np.arange(int(tiles.sum())) - first) * self.block_m
        self.num_tiles = int(seq.size)
        self.tile_seq = _int32(seq, self.device)
        self.tile_row = _int32(rows, self.device)
        self.qsl = _int32(index.query_start_loc, self.device)

    @torch.no_grad()
    def run(self, q, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [num_queries, num_q_heads, head_dim]`` -> output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a tensor on the storage's device).
        """
        q, layer, num_q_heads = self.check(q, layer)
        sink = self.sinks(sinks, num_q_heads)
        out = torch.zeros_like(q)
        if self.num_tiles == 0:
            return out
        q = q.contiguous()
        k_pool, v_pool, ks, vs, s_sb = self._operands(layer)
        scale, cap, window, chunk = self._scalars()
        kernels.paged_prefill_kernel[(self.num_tiles, num_q_heads)](
            q, k_pool, v_pool, ks, vs, self.tables, self.lens, self.qsl, self.tile_seq, self.tile_row, out,
            out if sink is None else sink, scale, cap, window, chunk, self.storage.config.num_blocks,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), s_sb,
            self.tables.stride(0), out.stride(0), out.stride(1),
            GROUP=num_q_heads // self.num_kv_heads, BLOCK_M=self.block_m, CAUSAL=self.params.causal,
            SINKS=sink is not None, num_warps=4 if self.d_pad <= 64 else 8, **self._flags(k_pool))
        return out
