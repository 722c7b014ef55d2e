"""Conversions between pagedkv's names and torch: dtypes, devices, host arrays.

Every public entry point of the backend funnels its array arguments through
here, so a wrong device or dtype fails the same way everywhere (typed errors
from ``pagedkv_core.errors``) and before any state changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument

__all__ = [
    "TORCH_DTYPES",
    "torch_dtype",
    "dtype_name",
    "same_device",
    "to_numpy",
    "to_tensor",
    "native_tensor",
    "index_tensor",
    "bits",
    "take",
    "put_",
]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# dtypes NumPy cannot hold; they travel as float32, which represents them exactly
_WIDEN = (torch.bfloat16, torch.float8_e4m3fn)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a pagedkv dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {name!r}; known: {', '.join(TORCH_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The pagedkv name of a torch dtype, or its torch spelling when pagedkv has none."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def same_device(actual: torch.device, expected: torch.device) -> bool:
    """``cuda:0`` equals ``cuda`` when the current device is 0; ``mps`` equals ``mps:0``."""
    if actual.type != expected.type:
        return False
    return actual.index is None or expected.index is None or actual.index == expected.index


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of a tensor (bfloat16 / float8 widened to float32); NumPy input passes through.

    Always a copy, never a view of the tensor's memory (for zero-copy views
    see ``pagedkv_torch.dlpack``): a snapshot must not change with the pool.
    """
    if isinstance(array, np.ndarray):
        return array
    if not isinstance(array, torch.Tensor):
        return np.asarray(array)
    t = array.detach()
    if t.dtype in _WIDEN:
        return t.float().cpu().numpy()
    return t.cpu().numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()


def to_tensor(array: Any, device: torch.device, dtype: str | None = None) -> torch.Tensor:
    """Copy a NumPy (or array-like) value to a tensor on ``device``; ``dtype`` is a pagedkv name."""
    if isinstance(array, torch.Tensor):
        t = array.detach()
    else:
        host = np.asarray(array)
        t = torch.from_numpy(np.ascontiguousarray(host)).clone()
    t = t.to(device)
    return t.to(torch_dtype(dtype)) if dtype is not None else t


def native_tensor(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """Accept a tensor on ``device`` (or, for a CPU device, a NumPy array, without a copy).

    Raises :class:`DeviceMismatch` for a tensor on another device or a host
    array given to an accelerator, :class:`DTypeMismatch` for anything that
    is not an array.
    """
    if isinstance(x, torch.Tensor):
        if not same_device(x.device, device):
            raise DeviceMismatch(f"{name} is on {x.device}, the storage is on {device}")
        return x
    if isinstance(x, np.ndarray):
        if device.type != "cpu":
            raise DeviceMismatch(f"{name} is a host NumPy array, the storage is on {device}; "
                                 "convert it with backend.asarray first")
        if x.dtype.kind not in "fiub":
            raise DTypeMismatch(f"{name} has dtype {x.dtype}, which torch cannot hold")
        return torch.from_numpy(x)
    raise DTypeMismatch(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def index_tensor(values: np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A validated host index array as a tensor on ``device`` (one host-to-device copy)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if dtype != torch.int64:
        t = t.to(dtype)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def bits(t: torch.Tensor) -> torch.Tensor:
    """A same-bytes view that every index kernel supports (float8 has few: moved as uint8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def take(t: torch.Tensor, dim: int, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``index_select`` that also moves float8 values (bit for bit, through uint8).

    Along dim 0 of a contiguous tensor it indexes a 2-D view, whole rows at a
    time (CPU ``index_select`` copies those at memcpy speed, up to twice as
    fast as through the 4-D shape).
    """
    src = bits(t)
    flat = dim == 0 and src.dim() > 2 and src.is_contiguous()
    if flat:
        src = src.view(src.shape[0], -1)
    if out is None:
        picked = src.index_select(dim, ids)
        return (picked.view(-1, *t.shape[1:]) if flat else picked).view(t.dtype)
    dst = bits(out)
    torch.index_select(src, dim, ids, out=dst.view(dst.shape[0], -1) if flat else dst)
    return out


def put_(t: torch.Tensor, dim: int, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t.index_copy_(dim, ids, src)`` for any pool dtype, float8 included."""
    bits(t).index_copy_(dim, ids, bits(src.to(t.dtype)))
    return t
