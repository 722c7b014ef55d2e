"""Host-side (NumPy) int8 quantization with one scale per (block, KV head).

Backends quantize on their own devices; these functions are the portable
form used for host blocks and as the reference the others are checked against.
The scale of a (block, head) is ``absmax / 127`` over its tokens and head
dims, so every stored value lies in ``[-127, 127]`` and the error of a value
is at most ``scale / 2``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["INT8_MAX", "quantize_blocks", "dequantize_blocks"]

INT8_MAX = 127.0


def quantize_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x [..., block_size, heads, head_dim]`` -> (int8 of the same shape, float32 scales ``[..., heads]``)."""
    x32 = np.asarray(x, dtype=np.float32)
    amax = np.abs(x32).max(axis=(-3, -1))
    scale = (amax / INT8_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint(x32 / safe[..., None, :, None])
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_blocks` (up to rounding), in ``dtype``."""
    out: np.ndarray = (q.astype(np.float32) * scale[..., None, :, None]).astype(dtype)
    return out
