"""The MLX backend object: devices ``cpu`` and ``gpu`` as this MLX build has them."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.backend import Capabilities, Probe
from pagedkv_core.errors import BackendUnavailable

from .arrays import DEVICE_NAMES, device_probe, mlx_device, mx_dtype, to_host
from .attention import MlxAttention
from .storage import MlxStorage

__all__ = ["MlxBackend"]

_NUMPY_OF = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int8": np.int8}


class MlxBackend:
    """Block storage and paged attention on MLX; ``version`` is MLX's."""

    name = "mlx"
    version = mx.__version__

    def __init__(self) -> None:
        self.attention = MlxAttention()

    def devices(self) -> list[str]:
        """Both device kinds MLX has, usable or not here (``probe`` says which)."""
        return list(DEVICE_NAMES)

    def probe(self, device: str | None = None) -> Probe:
        """Whether ``device`` (``None``: the backend as a whole) can be used here, and if not, why."""
        return device_probe(device)

    def capabilities(self, device: str) -> Capabilities:
        """Dtypes and kernels on ``device``; raises :class:`BackendUnavailable` for a device MLX lacks here."""
        mlx_device(device)
        return Capabilities(
            dtypes=("float32", "float16", "bfloat16"),
            quantized=("int8",),
            max_head_dim=1024 if device == "cpu" else 256,
            kernels=("decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks",
                     *(("cascade",) if device == "cpu" else ())),
        )

    def create_storage(self, config: CacheConfig, device: str = "cpu") -> MlxStorage:
        return MlxStorage(config, device)

    def asarray(self, array: Any, device: str = "cpu", dtype: str | None = None) -> Any:
        """A NumPy array (any shape) as an ``mx.array`` for ``device``, cast to the pagedkv ``dtype`` if given.

        float64 NumPy input becomes float32 unless ``dtype="float64"`` (which
        only MLX's CPU supports).
        """
        target = mlx_device(device)
        host = np.asarray(array)
        with mx.stream(target):
            if dtype is None:
                return mx.array(host)
            if dtype == "float64" and device != "cpu":
                raise BackendUnavailable("mlx", "MLX has float64 only on its CPU device")
            wanted = mx_dtype(dtype)
            if wanted == mx.bfloat16:  # NumPy has no bfloat16: round from float32
                return mx.array(host.astype(np.float32)).astype(wanted)
            return mx.array(host.astype(_NUMPY_OF[dtype]), dtype=wanted)

    def to_numpy(self, array: Any) -> np.ndarray:
        """An ``mx.array`` (or NumPy array) as a NumPy copy; bfloat16 comes as float32."""
        if isinstance(array, mx.array):
            return to_host(array)
        return np.asarray(array)
