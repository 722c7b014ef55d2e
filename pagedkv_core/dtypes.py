"""Storage dtypes, named by string so the core never imports an array library.

A backend maps each name to its own dtype object. ``int8`` and
``float8_e4m3fn`` are *quantized* kinds: values are kept with one float32
scale per (block, KV head), and attention dequantizes them on the fly.
"""

from __future__ import annotations

from typing import Literal

from .errors import InvalidArgument

__all__ = ["DTypeName", "FLOAT_DTYPES", "QUANTIZED_DTYPES", "itemsize", "is_quantized", "check_dtype"]

DTypeName = Literal["float64", "float32", "float16", "bfloat16", "int8", "float8_e4m3fn"]

FLOAT_DTYPES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
QUANTIZED_DTYPES: tuple[str, ...] = ("int8", "float8_e4m3fn")

_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "float8_e4m3fn": 1,
}


def check_dtype(name: str) -> str:
    """Return ``name`` if it is a storage dtype pagedkv knows, else raise."""
    if name not in _ITEMSIZE:
        raise InvalidArgument(f"unknown dtype {name!r}; known: {', '.join(_ITEMSIZE)}")
    return name


def itemsize(name: str) -> int:
    """Bytes per stored element (scales of quantized kinds not included)."""
    return _ITEMSIZE[check_dtype(name)]


def is_quantized(name: str) -> bool:
    return check_dtype(name) in QUANTIZED_DTYPES
