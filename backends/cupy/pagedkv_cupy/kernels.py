"""The kernels of ``kernels.cu``: their template names, and lazy compilation through ``cupy.RawModule``.

Nothing compiles at import. A :class:`ModuleKey` names one specialisation
(decode or prefill for a query dtype, a pool dtype and a head dim, or the
writes); the first launch that needs it builds a ``cupy.RawModule`` holding
just its template instances (name expressions), and later launches reuse it.
CuPy compiles the module with NVRTC when its first function is fetched and
keeps the binary in its on-disk kernel cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = [
    "C_TYPES",
    "GROUP_TILES",
    "MAX_HEAD_DIM",
    "COMPILE_OPTIONS",
    "ModuleKey",
    "KernelCache",
    "kernel_source",
    "group_tile",
    "decode_name",
    "reduce_name",
    "prefill_name",
    "write_name",
    "WRITE_INT8",
    "module_names",
]

# C++ type of each dtype in the kernels' templates.
C_TYPES = {"float16": "pkv_f16", "bfloat16": "pkv_bf16", "float32": "float", "int8": "signed char"}
# Raw carrier of a float pool's elements in the write kernel, by item size.
WRITE_CARRIERS = {2: "unsigned short", 4: "unsigned int"}
GROUP_TILES = (1, 2, 4, 8)
MAX_HEAD_DIM = 256
WRITE_INT8 = "pagedkv_write_int8"
COMPILE_OPTIONS = ("--std=c++17",)


@dataclass(frozen=True, slots=True)
class ModuleKey:
    """One compiled module: ``kind`` is ``"decode"``, ``"prefill"`` or ``"write"``."""

    kind: str
    q_dtype: str = ""
    kv_dtype: str = ""
    head_dim: int = 0


def group_tile(group: int) -> int:
    """Query heads one decode block serves: the power of two >= ``group``, at most 8."""
    tile = 1
    while tile < group and tile < GROUP_TILES[-1]:
        tile *= 2
    return tile


def decode_name(q_dtype: str, kv_dtype: str, head_dim: int, tile: int) -> str:
    return f"pagedkv_decode<{C_TYPES[q_dtype]}, {C_TYPES[kv_dtype]}, {head_dim}, {tile}>"


def reduce_name(q_dtype: str, head_dim: int) -> str:
    return f"pagedkv_decode_reduce<{C_TYPES[q_dtype]}, {head_dim}>"


def prefill_name(q_dtype: str, kv_dtype: str, head_dim: int) -> str:
    return f"pagedkv_prefill<{C_TYPES[q_dtype]}, {C_TYPES[kv_dtype]}, {head_dim}>"


def write_name(itemsize: int) -> str:
    return f"pagedkv_write<{WRITE_CARRIERS[itemsize]}>"


def module_names(key: ModuleKey) -> tuple[str, ...]:
    """The name expressions compiled into the module ``key``."""
    if key.kind == "decode":
        names = [decode_name(key.q_dtype, key.kv_dtype, key.head_dim, t) for t in GROUP_TILES]
        return (*names, reduce_name(key.q_dtype, key.head_dim))
    if key.kind == "prefill":
        return (prefill_name(key.q_dtype, key.kv_dtype, key.head_dim),)
    if key.kind == "write":
        return (*(write_name(size) for size in sorted(WRITE_CARRIERS)), WRITE_INT8)
    raise ValueError(f"unknown kernel module kind {key.kind!r}")


@lru_cache(maxsize=1)
def kernel_source() -> str:
    """The CUDA C++ source shipped beside this module."""
    return resources.files(__package__).joinpath("kernels.cu").read_text(encoding="utf-8")


class KernelCache:
    """Builds each :class:`ModuleKey`'s ``cupy.RawModule`` once, on first use; thread-safe."""

    def __init__(self, options: tuple[str, ...] = COMPILE_OPTIONS) -> None:
        self.options = options
        self._modules: dict[ModuleKey, Any] = {}
        self._functions: dict[tuple[int, ModuleKey, str], Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._modules)

    def module(self, key: ModuleKey) -> Any:
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                import cupy  # lazy: a package import never compiles nor loads CUDA

                module = cupy.RawModule(code=kernel_source(), options=self.options,
                                        name_expressions=list(module_names(key)))
                self._modules[key] = module
            return module

    def function(self, key: ModuleKey, name: str, device_id: int = 0) -> Any:
        """The kernel ``name`` (one of ``module_names(key)``) as a ``cupy.RawKernel``.

        Call it with ``device_id`` current: functions are kept per device.
        """
        found = self._functions.get((device_id, key, name))
        if found is None:
            if name not in module_names(key):
                raise ValueError(f"{name!r} is not a kernel of module {key}")
            found = self.module(key).get_function(name)
            with self._lock:
                self._functions[(device_id, key, name)] = found
        return found
