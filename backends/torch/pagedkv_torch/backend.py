"""The torch backend object: devices, capabilities, storage and attention."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.backend import Capabilities, Probe
from pagedkv_core.errors import BackendUnavailable

from .attention import TorchAttention
from .convert import to_numpy, to_tensor
from .devices import float_dtypes, known_devices, parse_device, probe_device, quantized_dtypes
from .native_decode import native_variant
from .storage import TorchStorage

__all__ = ["TorchBackend", "ATTENTION_FEATURES"]

ATTENTION_FEATURES = ("decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks", "cascade")
"""The attention features of ``Capabilities.kernels``: all of them, in each of the backend's kernels.

``cascade`` (shared-prefix decode, ``TorchAttention.plan_cascade``) is torch ops on the storage's device, so
it runs wherever the torch-op decode does; quantized pools take the ordinary plan there (same result)."""


def _version() -> str:
    """torch's version and which CPU decode runs (what ``pagedkv backends`` prints for this backend)."""
    variant = native_variant()
    cpu = f"compiled CPU decode ({variant})" if variant else "CPU decode on torch ops (compiled kernel not built)"
    return f"{torch.__version__}, {cpu}"


class TorchBackend:
    """PyTorch on ``cpu``, ``cuda:N`` and ``mps``.

    ``attention`` picks its kernel per device (Triton on CUDA when importable,
    the compiled decode on CPU pools when built, torch ops elsewhere); build
    ``TorchAttention(kernel=...)`` to force one.
    """

    name = "torch"
    version = _version()

    def __init__(self) -> None:
        self.attention = TorchAttention()

    def devices(self) -> list[str]:
        return known_devices()

    def probe(self, device: str | None = None) -> Probe:
        return probe_device(device)

    def capabilities(self, device: str) -> Capabilities:
        """Every attention path (torch ops, the compiled CPU decode, Triton) has every feature, on every device.

        Cascade decode runs on torch ops for the rows in a group and on the device's kernel for the others.
        """
        dev = parse_device(device)
        return Capabilities(dtypes=float_dtypes(dev), quantized=quantized_dtypes(dev), max_head_dim=512,
                            kernels=ATTENTION_FEATURES)

    def create_storage(self, config: CacheConfig, device: str = "cpu") -> TorchStorage:
        probe = self.probe(device)
        if not probe.available:
            raise BackendUnavailable(self.name, f"device {device!r}: {probe.reason}")
        return TorchStorage(config, device)

    def asarray(self, array: Any, device: str = "cpu", dtype: str | None = None) -> torch.Tensor:
        """A copy of ``array`` as a tensor on ``device``; ``dtype`` is a pagedkv name such as ``"bfloat16"``."""
        return to_tensor(array, parse_device(device), dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A NumPy copy of a tensor (bfloat16 and float8 as float32)."""
        return to_numpy(array)
