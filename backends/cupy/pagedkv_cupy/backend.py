"""The cupy backend object: devices ``cuda:N``, storage, attention, array conversions."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.backend import Capabilities, Probe
from pagedkv_core.errors import BackendUnavailable, InvalidArgument

from .attention import CupyAttention
from .convert import bf16_bits_to_float32, float32_to_raw
from .kernels import MAX_HEAD_DIM
from .runtime import KDL_CUDA, CudaRuntime, CudaStatus, bfloat16_support, cuda_status, import_cupy, parse_device
from .storage import CupyStorage

__all__ = ["CupyBackend", "ATTENTION_FEATURES"]

ATTENTION_FEATURES = ("decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks")
"""``Capabilities.kernels``: both kernels of kernels.cu have every attention feature."""


class CupyBackend:
    """NVIDIA GPUs through CuPy. Building it imports cupy; it works without a GPU, reporting why."""

    name = "cupy"

    def __init__(self) -> None:
        self._cupy = import_cupy()
        self.version = self._cupy.__version__
        self.attention = CupyAttention()
        self._status: CudaStatus | None = None

    def _cuda(self) -> CudaStatus:
        if self._status is None:
            self._status = cuda_status()
        return self._status

    def devices(self) -> list[str]:
        return [f"cuda:{i}" for i in range(self._cuda().count)]

    def probe(self, device: str | None = None) -> Probe:
        status = self._cuda()
        if status.count == 0:
            return Probe.missing(status.reason)
        if device is None:
            return Probe.ok()
        try:
            index = parse_device(device)
        except InvalidArgument as exc:
            return Probe.missing(str(exc))
        if index >= status.count:
            return Probe.missing(f"{device} is not visible: CUDA sees {status.count} device(s)")
        return Probe.ok()

    def _require(self, device: str) -> CudaRuntime:
        probe = self.probe(device)
        if not probe.available:
            raise BackendUnavailable(self.name, probe.reason)
        return CudaRuntime.for_device(device)

    def capabilities(self, device: str) -> Capabilities:
        bf16, _ = bfloat16_support()
        dtypes = ("float16", "float32") + (("bfloat16",) if bf16 is not None else ())
        return Capabilities(dtypes=dtypes, quantized=("int8",), max_head_dim=MAX_HEAD_DIM, kernels=ATTENTION_FEATURES)

    def create_storage(self, config: CacheConfig, device: str = "cuda:0") -> CupyStorage:
        return CupyStorage(config, device, runtime=self._require(device))

    def asarray(self, array: Any, device: str = "cuda:0", dtype: str | None = None) -> Any:
        """A NumPy array (or anything ``np.asarray`` takes) as a CuPy array on ``device``, cast to ``dtype``."""
        rt = self._require(device)
        host = np.asarray(array)
        if dtype == "bfloat16":
            bits = float32_to_raw(np, host.astype(np.float32), "bfloat16")
            return rt.upload(bits).view(rt.native_dtype("bfloat16"))
        return rt.upload(host.astype(np.dtype(dtype)) if dtype is not None else host)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A CuPy array (or a CUDA DLPack tensor, e.g. torch) as NumPy; bfloat16 becomes float32."""
        cp = self._cupy
        if not isinstance(array, cp.ndarray):
            where = getattr(array, "__dlpack_device__", None)
            if where is None or int(where()[0]) != KDL_CUDA:
                return np.asarray(array)  # already on the host (NumPy, a CPU tensor, a list)
            array = cp.from_dlpack(array)
        bf16, _ = bfloat16_support()
        if bf16 is not None and array.dtype == bf16:
            return bf16_bits_to_float32(np, cp.asnumpy(array.view(cp.uint16)))
        return cp.asnumpy(array)
