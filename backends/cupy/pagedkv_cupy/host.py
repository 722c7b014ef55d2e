"""Host blocks of the cupy backend: pinned buffers filled asynchronously by ``swap_out``."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagedkv_core.contract.storage import NumpyHostBlocks

from .convert import bf16_bits_to_float32

__all__ = ["CupyHostBlocks"]


class CupyHostBlocks:
    """Blocks copied off a device pool into page-locked host memory, for all layers, K and V.

    ``k``/``v``: ``[num_layers, n, block_size, num_kv_heads, head_dim]`` in the
    pool's carrier dtype (float16, float32, int8, or ``uint16`` bfloat16
    payloads); ``k_scale``/``v_scale``: float32 ``[num_layers, n,
    num_kv_heads]`` for int8 blocks. The copy runs on a stream: ``wait``
    blocks until ``event`` has completed, and the device temporaries the copy
    reads from are kept alive until then.
    """

    __slots__ = ("k", "v", "dtype", "k_scale", "v_scale", "_event", "_keepalive")

    def __init__(self, k: np.ndarray, v: np.ndarray, dtype: str, k_scale: np.ndarray | None = None,
                 v_scale: np.ndarray | None = None, *, event: Any = None, keepalive: tuple = ()) -> None:
        self.k = k
        self.v = v
        self.dtype = dtype
        self.k_scale = k_scale
        self.v_scale = v_scale
        self._event = event
        self._keepalive = keepalive

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else self.k_scale.nbytes + self.v_scale.nbytes
        return int(self.k.nbytes + self.v.nbytes + scales)

    @property
    def ready(self) -> bool:
        """Whether the asynchronous copy has finished (never blocks)."""
        return self._event is None or bool(self._event.done)

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        self._keepalive = ()

    def to_numpy(self) -> NumpyHostBlocks:
        """The portable form (copies; bfloat16 as float32, which holds it exactly)."""
        self.wait()
        if self.dtype == "bfloat16":
            k, v = bf16_bits_to_float32(np, self.k), bf16_bits_to_float32(np, self.v)
        else:
            k, v = self.k.copy(), self.v.copy()
        if self.k_scale is None:
            return NumpyHostBlocks(k, v, self.dtype)
        return NumpyHostBlocks(k, v, self.dtype, self.k_scale.copy(), self.v_scale.copy())
