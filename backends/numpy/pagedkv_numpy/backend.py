"""The NumPy backend object: one device, ``cpu``."""

from __future__ import annotations

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.backend import Capabilities, Probe
from pagedkv_core.errors import InvalidArgument

from .attention import NumpyAttention
from .storage import NUMPY_DTYPES, NumpyStorage

__all__ = ["NumpyBackend"]


class NumpyBackend:
    name = "numpy"
    version = np.__version__

    def __init__(self) -> None:
        self.attention = NumpyAttention()

    def devices(self) -> list[str]:
        return ["cpu"]

    def probe(self, device: str | None = None) -> Probe:
        if device in (None, "cpu"):
            return Probe.ok()
        return Probe.missing(f"the numpy backend runs only on 'cpu', not {device!r}")

    def capabilities(self, device: str) -> Capabilities:
        return Capabilities(dtypes=("float64", "float32", "float16"), quantized=("int8",), max_head_dim=1024,
                            kernels=("decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local",
                                     "sinks", "cascade"))

    def create_storage(self, config: CacheConfig, device: str = "cpu") -> NumpyStorage:
        return NumpyStorage(config, device)

    def asarray(self, array, device: str = "cpu", dtype: str | None = None) -> np.ndarray:
        if device != "cpu":
            raise InvalidArgument(f"the numpy backend has only the 'cpu' device, not {device!r}")
        out = np.asarray(array)
        return out.astype(NUMPY_DTYPES[dtype]) if dtype is not None else out

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)
