"""Run the real ``kernels.cu`` on the CPU: a test stand-in for the CUDA runtime.

:class:`EmuKernels` compiles ``kernels.cu`` with a host C++ compiler under
``emu/cuda_emu.h`` (threads as coroutines, real barriers and shuffles), one
shared library per ``ModuleKey`` on first use (cached on disk), exposing its
template instances by their name expressions, as ``cupy.RawModule`` does. :class:`EmuRuntime` then offers the interface of
``pagedkv_cupy.runtime.CudaRuntime`` over NumPy arrays, so the backend's own
storage and attention code (argument lists, grids, split geometry, int8
rescaling) runs unchanged against it. Arrays it allocates carry guard bytes
on both sides, so an out-of-bounds write shows up in :meth:`EmuRuntime.check_guards`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pagedkv_core.errors import DeviceMismatch, DTypeMismatch
from pagedkv_core.memory import host_memory_available
from pagedkv_cupy.kernels import ModuleKey, kernel_source, module_names

HERE = Path(__file__).parent
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w"]
GUARD = 4096
RAW = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "int8": np.int8}


def host_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build_library(names: Sequence[str], cache_dir: Path, extra: str = "") -> ctypes.CDLL:
    """Compile (or reuse from ``cache_dir``) a library holding kernels ``names`` (name expressions) and ``extra`` C++."""
    compiler = host_compiler()
    if compiler is None:
        raise RuntimeError("no host C++ compiler (g++) found")
    header = (HERE / "emu" / "cuda_emu.h").read_text()
    source = kernel_source()
    digest = hashlib.sha256("\0".join([header, source, extra, *names, *FLAGS, compiler]).encode()).hexdigest()[:16]
    library = cache_dir / f"pkv_emu_{digest}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staged = cache_dir / f"kernels.cu.{os.getpid()}.{threading.get_ident()}"
        staged.write_text(source)
        staged.replace(cache_dir / "kernels.cu")  # atomic: concurrent builds include a whole file
        lines = [f'#include "{HERE / "emu" / "cuda_emu.h"}"', '#include "kernels.cu"']
        lines += [f'static const int reg_{i} = emu::register_kernel("{n}", &{n});' for i, n in enumerate(names)]
        unit = cache_dir / f"emu_{digest}.cpp"
        unit.write_text("\n".join(lines) + "\n" + extra + "\n")
        partial = cache_dir / f"pkv_emu_{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        subprocess.run([compiler, *FLAGS, str(unit), "-o", str(partial)], check=True, capture_output=True, text=True)
        partial.replace(library)
    lib = ctypes.CDLL(str(library))
    lib.pkv_emu_launch.restype = ctypes.c_int
    return lib


def _as_c(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_int64(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    raise TypeError(f"kernel argument of type {type(value).__name__}: pass numpy arrays or np.int32/int64/float32")


class EmuKernels:
    """``launch`` with the signature of ``CudaRuntime.launch``; each module is compiled on first use, once."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.libraries: dict[ModuleKey, ctypes.CDLL] = {}
        self.launches: dict[str, int] = {}

    def library(self, key: ModuleKey) -> ctypes.CDLL:
        if key not in self.libraries:
            self.libraries[key] = build_library(module_names(key), self.cache_dir)
        return self.libraries[key]

    def prebuild(self, keys: Sequence[ModuleKey], workers: int | None = None) -> None:
        """Compile modules a run will need concurrently (one compiler process per core)."""
        todo = [key for key in dict.fromkeys(keys) if key not in self.libraries]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            built = pool.map(lambda key: build_library(module_names(key), self.cache_dir), todo)
            self.libraries.update(zip(todo, built))

    def launch(self, key: ModuleKey, name: str, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
        if name not in module_names(key):
            raise ValueError(f"{name} is not in module {key}")
        lib = self.library(key)
        grid3 = (tuple(grid) + (1, 1))[:3]
        block3 = (tuple(block) + (1, 1))[:3]
        values = [_as_c(a) for a in args]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        err = ctypes.create_string_buffer(512)
        status = lib.pkv_emu_launch(name.encode(), *map(ctypes.c_uint, grid3), *map(ctypes.c_uint, block3),
                                    argv, err, ctypes.c_int(len(err)))
        if status:
            raise RuntimeError(f"emulated {name} failed: {err.value.decode()}")
        self.launches[name] = self.launches.get(name, 0) + 1


class EmuRuntime:
    """The interface of ``CudaRuntime`` over NumPy: device memory is host memory, copies are synchronous."""

    device = "cuda:0"
    device_id = 0
    xp = np

    def __init__(self, kernels: EmuKernels, num_sms: int = 64) -> None:
        self.kernels = kernels
        self.num_sms = num_sms
        self._guarded: list[tuple[np.ndarray, int]] = []

    def activate(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def native_dtype(self, name: str) -> np.dtype:
        return np.dtype(RAW[name])

    def dtype_name(self, dtype: Any) -> str:
        name = np.dtype(dtype).name
        if name == "uint16":
            return "bfloat16"
        if name not in ("float16", "float32", "float64", "int8"):
            raise DTypeMismatch(f"unsupported array dtype {name}")
        return name

    def native(self, x: Any, name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise DeviceMismatch(f"{name} is a {type(x).__name__}, not an emulated device array")
        return x

    def free_memory(self) -> int | None:
        """Emulated device memory is host memory."""
        return host_memory_available()

    def zeros(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = np.full(nbytes + 2 * GUARD, 0xFF, np.uint8)
        self._guarded.append((buffer, nbytes))
        array = buffer[GUARD:GUARD + nbytes].view(dtype).reshape(tuple(shape))
        array[...] = 0
        return array

    def upload(self, host: np.ndarray) -> np.ndarray:
        out = self.zeros(host.shape, host.dtype)
        out[...] = host
        return out

    def download(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)

    def launch(self, key: ModuleKey, name: str, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
        self.kernels.launch(key, name, grid, block, args)

    def synchronize(self) -> None:
        return None

    def pinned_empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.empty(tuple(shape), dtype)

    def copy_to_host_async(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        for src, out in pairs:
            np.copyto(out, src)
        return None

    def copy_to_device_async(self, hosts: Sequence[np.ndarray]) -> tuple[list[np.ndarray], None]:
        return [self.upload(np.ascontiguousarray(h)) for h in hosts], None

    @staticmethod
    def event_done(event: Any) -> bool:
        return True

    def check_guards(self) -> None:
        """Raise if any kernel wrote outside an array this runtime allocated."""
        for buffer, nbytes in self._guarded:
            if (buffer[:GUARD] != 0xFF).any() or (buffer[GUARD + nbytes:] != 0xFF).any():
                raise AssertionError("a kernel wrote outside an allocated array (guard bytes changed)")
