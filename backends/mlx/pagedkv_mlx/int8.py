"""Int8 blocks with one float32 scale per (block, KV head), in MLX operations.

The same scheme as :mod:`pagedkv_core.contract.quant` (scale = absmax / 127, values
rounded half to even and clipped to [-127, 127]), so blocks quantized here and
on the host agree bit for bit. MLX's own ``mx.quantize`` is not used: it
quantizes groups along the last axis with an affine scale and bias, while the
contract needs one symmetric scale per (block, head) across tokens and head
dims.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

__all__ = ["INT8_MAX", "quantize_blocks", "dequantize_blocks", "merge_tokens"]

INT8_MAX = 127.0

Array = Any  # mx.array


def _quantize(x: Array, scale: Array) -> Array:
    """``x [..., heads, d]`` (float32) over ``scale [..., heads]`` -> int8 (0 where the scale is 0)."""
    safe = mx.where(scale > 0, scale, 1.0)[..., None]
    return mx.clip(mx.round(x / safe), -INT8_MAX, INT8_MAX).astype(mx.int8)


def quantize_blocks(x: Array) -> tuple[Array, Array]:
    """``x [..., block_size, heads, head_dim]`` (any float) -> (int8 same shape, float32 scales ``[..., heads]``)."""
    x32 = x.astype(mx.float32)
    scale = mx.abs(x32).max(axis=(-3, -1)) / INT8_MAX
    return _quantize(x32, mx.expand_dims(scale, -2)), scale


def dequantize_blocks(q: Array, scale: Array, dtype: Any = mx.float32) -> Array:
    """Inverse of :func:`quantize_blocks`: ``q [..., block_size, heads, d]``, ``scale [..., heads]`` -> ``dtype``."""
    return (q.astype(mx.float32) * scale[..., None, :, None]).astype(dtype)


def merge_tokens(blocks: Array, scales: Array, x: Array, inverse: Array, offsets: Array) -> tuple[Array, Array]:
    """New contents of the blocks a write touches.

    ``blocks [u, block_size, heads, d]`` int8 and ``scales [u, heads]`` are the
    touched blocks as stored; token ``i`` of ``x [n, heads, d]`` (float) goes
    to offset ``offsets[i]`` of block ``inverse[i]`` (both ``[n]`` int). A
    block whose absmax grows is requantized to the larger scale first, so its
    old values lose at most one more rounding step. Returns the int8 blocks
    and float32 scales to store back.
    """
    x32 = x.astype(mx.float32)
    token_amax = mx.abs(x32).max(axis=-1)  # [n, heads]
    block_amax = mx.zeros(scales.shape, mx.float32).at[inverse].maximum(token_amax)
    new = mx.maximum(scales, block_amax / INT8_MAX)
    grown = (new > scales) & (scales > 0)
    ratio = mx.where(grown, scales / mx.where(grown, new, 1.0), 1.0)
    merged = mx.clip(mx.round(blocks.astype(mx.float32) * ratio[:, None, :, None]), -INT8_MAX, INT8_MAX)
    merged[inverse, offsets] = _quantize(x32, new[inverse]).astype(mx.float32)
    return merged.astype(mx.int8), new
