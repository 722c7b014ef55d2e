"""Where the shared storage/attention tests run: the CPU emulator here, a CUDA device where one exists.

A target builds storage, moves NumPy test data to its arrays (``put``) and
back (``get``), and checks afterwards what it can (guard bytes on the
emulator). The test bodies are the same for both, so the GPU session runs
exactly what was verified here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cupy_emu_backend import EmuBackend
from cupy_emulator import EmuKernels

from pagedkv_core.config import CacheConfig
from pagedkv_cupy.storage import CupyStorage


class EmuTarget:
    """The real backend code over NumPy arrays, kernels run by the CPU emulator."""

    name = "emu"

    def __init__(self, kernels: EmuKernels) -> None:
        self.backend = EmuBackend(kernels)
        self.runtime = self.backend.runtime
        self.attention = self.backend.attention
        self.kernels = kernels

    def unsupported(self, dtype: str) -> str | None:
        return None

    def storage(self, config: CacheConfig) -> CupyStorage:
        return self.backend.create_storage(config)

    def put(self, array: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return self.backend.asarray(array, "cuda:0", dtype)

    def get(self, native: Any) -> np.ndarray:
        return np.array(self.backend.to_numpy(native))

    def foreign(self, array: np.ndarray) -> Any:
        """Something that is not an array of this target's device."""
        return array.tolist()

    def launch_count(self) -> int:
        return sum(self.kernels.launches.values())

    def finish(self) -> None:
        self.runtime.check_guards()


class CudaTarget:
    """The backend as users get it, on a CUDA device."""

    def __init__(self, backend: Any, device: str) -> None:
        self.backend = backend
        self.device = device
        self.name = device
        self.attention = backend.attention
        self.capabilities = backend.capabilities(device)

    def unsupported(self, dtype: str) -> str | None:
        if self.capabilities.supports_dtype(dtype):
            return None
        from pagedkv_cupy.runtime import bfloat16_support

        return bfloat16_support()[1] if dtype == "bfloat16" else f"{dtype} is not supported on {self.device}"

    def storage(self, config: CacheConfig) -> CupyStorage:
        return self.backend.create_storage(config, self.device)

    def put(self, array: np.ndarray, dtype: str | None = None) -> Any:
        return self.backend.asarray(np.asarray(array), self.device, dtype)

    def get(self, native: Any) -> np.ndarray:
        return self.backend.to_numpy(native)

    def foreign(self, array: np.ndarray) -> Any:
        return np.asarray(array)  # host memory is the wrong device for a CUDA storage

    def launch_count(self) -> int | None:
        return None

    def finish(self) -> None:
        import cupy

        cupy.cuda.Device(int(self.device.split(":")[1])).synchronize()
