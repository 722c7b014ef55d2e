"""Per-(block, KV head) quantization of K/V blocks on a torch device.

The same arithmetic as ``pagedkv_core.contract.quant`` (the host reference), in torch,
so values quantized here and there are bit-identical: ``scale = absmax / QMAX``
over a block's tokens and head dims, values ``round(x / scale)`` (int8) or
``(x / scale)`` cast to float8_e4m3fn. A zero block keeps scale 0 and values 0.
"""

from __future__ import annotations

import torch

from .convert import put_, take

__all__ = ["QMAX", "quantize_blocks", "dequantize_blocks", "encode", "write_quantized"]

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def encode(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Already-scaled float32 values -> stored ``kind`` (rounded and clamped to the format's range)."""
    qmax = QMAX[kind]
    if kind == "int8":
        return torch.round(x).clamp_(-qmax, qmax).to(torch.int8)
    return x.clamp(-qmax, qmax).to(torch.float8_e4m3fn)


def quantize_blocks(x: torch.Tensor, kind: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., block_size, heads, head_dim]`` -> (values of ``kind``, float32 scales ``[..., heads]``)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=(-3, -1))
    scale = amax / QMAX[kind]
    return encode(x32 / _safe(scale)[..., None, :, None], kind), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks` (up to rounding): ``q [..., bs, heads, dim]``, ``scale [..., heads]``."""
    return (q.float() * scale[..., None, :, None]).to(dtype)


def write_quantized(pool: torch.Tensor, scales: torch.Tensor, layer: int, slots: torch.Tensor,
                    x: torch.Tensor, kind: str) -> None:
    """Quantize new tokens into a layer's blocks, raising a block's scale when needed.

    ``pool [num_layers, num_blocks, block_size, heads, dim]`` (int8 / float8),
    ``scales [num_layers, num_blocks, heads]`` float32, ``slots [n]`` int64 on
    the pool's device (no ``-1``), ``x [n, heads, dim]`` floating point.
    When a write brings a larger absmax, the touched blocks' existing values
    are requantized to the new scale (the ratio is exactly 1 for the others,
    which leaves them bit-identical, so no host round trip decides which).
    """
    block_size, heads = pool.shape[2], pool.shape[3]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    unique, inverse = torch.unique(blocks, return_inverse=True)
    x32 = x.float()
    token_amax = x32.abs().amax(dim=-1)  # [n, heads]
    block_amax = torch.zeros(unique.numel(), heads, dtype=torch.float32, device=pool.device)
    block_amax.scatter_reduce_(0, inverse[:, None].expand(-1, heads), token_amax, reduce="amax")
    old = scales[layer].index_select(0, unique)
    new = torch.maximum(old, block_amax / QMAX[kind])
    grown = (new > old) & (old > 0)
    ratio = torch.where(grown, old / _safe(new), torch.ones_like(new))
    existing = take(pool[layer], 0, unique).float() * ratio[:, None, :, None]
    put_(pool[layer], 0, unique, encode(existing, kind))
    scales[layer].index_copy_(0, unique, new)
    values = encode(x32 / _safe(new).index_select(0, inverse)[:, :, None], kind)
    put_(pool[layer].view(-1, heads, pool.shape[4]), 0, blocks * block_size + offsets, values)
