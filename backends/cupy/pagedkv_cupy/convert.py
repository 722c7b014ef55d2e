"""Dtype conversions and int8 block quantization written once against an array module ``xp``.

The same functions run on device arrays (cupy) and host arrays (numpy), so
the storage's device path and host path agree bit for bit with
:mod:`pagedkv_core.contract.quant`. bfloat16 travels as its 16-bit payload (``uint16``)
and is converted with integer arithmetic (round to nearest even), which needs
no bfloat16 support from the array library.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "contiguous",
    "bf16_bits_to_float32",
    "float32_to_bf16_bits",
    "raw_to_float32",
    "float32_to_raw",
    "quantize_blocks",
    "dequantize_blocks",
]

INT8_MAX = 127.0


def contiguous(xp: Any, x: Any) -> Any:
    """``x`` C-contiguous; 16-bit arrays are copied as ``uint16``, so bfloat16 needs no copy kernel of its own."""
    if x.flags.c_contiguous:
        return x
    if x.dtype.itemsize == 2:
        return xp.ascontiguousarray(x.view(xp.uint16)).view(x.dtype)
    return xp.ascontiguousarray(x)


def bf16_bits_to_float32(xp: Any, bits: Any) -> Any:
    """``uint16`` bfloat16 payloads -> float32 (exact)."""
    return (bits.astype(xp.uint32) << xp.uint32(16)).view(xp.float32)


def float32_to_bf16_bits(xp: Any, x: Any) -> Any:
    """float32 -> ``uint16`` bfloat16 payloads, rounding to nearest even; NaN stays NaN."""
    u = xp.ascontiguousarray(x.astype(xp.float32)).view(xp.uint32)
    lsb = (u >> xp.uint32(16)) & xp.uint32(1)
    rounded = ((u + xp.uint32(0x7FFF) + lsb) >> xp.uint32(16)).astype(xp.uint16)
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    quiet = ((u >> xp.uint32(16)) | xp.uint32(0x40)).astype(xp.uint16)
    return xp.where(nan, quiet, rounded)


def raw_to_float32(xp: Any, raw: Any, dtype: str) -> Any:
    """A pool-carrier array of storage dtype ``dtype`` (bfloat16 as uint16) as float32 values."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(xp, raw)
    return raw.astype(xp.float32)


def float32_to_raw(xp: Any, x: Any, dtype: str) -> Any:
    """float32 values -> the pool carrier of float dtype ``dtype`` (bfloat16 as uint16)."""
    if dtype == "bfloat16":
        return float32_to_bf16_bits(xp, x)
    return x.astype(np.dtype(dtype))


def quantize_blocks(xp: Any, x: Any) -> tuple[Any, Any]:
    """``x`` float32 ``[..., block_size, heads, head_dim]`` -> (int8 same shape, float32 scales ``[..., heads]``).

    One scale per (block, head): absmax / 127, as :func:`pagedkv_core.contract.quant.quantize_blocks`.
    """
    amax = xp.abs(x).max(axis=(-3, -1))
    scale = (amax / xp.float32(INT8_MAX)).astype(xp.float32)
    safe = xp.where(scale > 0, scale, xp.float32(1.0)).astype(xp.float32)
    q = xp.rint(x / safe[..., None, :, None])
    return xp.clip(q, -INT8_MAX, INT8_MAX).astype(xp.int8), scale


def dequantize_blocks(xp: Any, q: Any, scale: Any) -> Any:
    """Inverse of :func:`quantize_blocks` (up to rounding), as float32."""
    return q.astype(xp.float32) * scale[..., None, :, None]
