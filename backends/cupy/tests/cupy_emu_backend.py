"""The cupy backend with its kernels run by the CPU emulator, as a registrable backend object.

Registered under the name ``cupy-emu``, it lets the conformance suite check
the backend's storage and attention code (and kernels.cu) where no GPU
exists. Arrays are NumPy; bfloat16 arrays are their ``uint16`` payloads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cupy_emulator import EmuKernels, EmuRuntime

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.backend import Capabilities, Probe
from pagedkv_cupy.attention import CupyAttention
from pagedkv_cupy.backend import ATTENTION_FEATURES
from pagedkv_cupy.convert import bf16_bits_to_float32, float32_to_bf16_bits
from pagedkv_cupy.kernels import MAX_HEAD_DIM
from pagedkv_cupy.storage import CupyStorage


class EmuBackend:
    """Backend protocol over :class:`EmuRuntime`; one device, ``cuda:0``."""

    name = "cupy-emu"
    version = "emulated"

    def __init__(self, kernels: EmuKernels, num_sms: int = 64) -> None:
        self.runtime = EmuRuntime(kernels, num_sms=num_sms)
        self.attention = CupyAttention()

    def devices(self) -> list[str]:
        return ["cuda:0"]

    def probe(self, device: str | None = None) -> Probe:
        return Probe.ok() if device in (None, "cuda:0") else Probe.missing(f"the emulator has no {device}")

    def capabilities(self, device: str) -> Capabilities:
        return Capabilities(dtypes=("float16", "bfloat16", "float32"), quantized=("int8",), max_head_dim=MAX_HEAD_DIM,
                            kernels=ATTENTION_FEATURES)

    def create_storage(self, config: CacheConfig, device: str = "cuda:0") -> CupyStorage:
        return CupyStorage(config, device, runtime=self.runtime)

    def asarray(self, array: Any, device: str = "cuda:0", dtype: str | None = None) -> np.ndarray:
        host = np.asarray(array)
        if dtype == "bfloat16":
            return float32_to_bf16_bits(np, host.astype(np.float32))
        return np.ascontiguousarray(host.astype(dtype) if dtype else host)

    def to_numpy(self, array: Any) -> np.ndarray:
        array = np.asarray(array)
        return bf16_bits_to_float32(np, array) if array.dtype == np.uint16 else array
