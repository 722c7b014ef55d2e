"""The host tier of the torch backend: blocks swapped off the device.

On CUDA the copy runs on a side stream into pinned host memory (from torch's
caching host allocator, so repeated swaps reuse pinned pages) with
``non_blocking=True``; an event recorded on that stream is what
:meth:`TorchHostBlocks.wait` waits on, so a caller can overlap the transfer
with compute and wait only when it needs the bytes. On CPU and MPS the copies
are plain and ``wait`` returns at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagedkv_core.contract.storage import NumpyHostBlocks

from .convert import to_numpy

__all__ = ["TorchHostBlocks", "copy_to_host"]

_side_streams: dict[int, Any] = {}


@dataclass(slots=True, eq=False)
class TorchHostBlocks:
    """Blocks on the host as torch tensors (pinned on CUDA machines).

    ``k``/``v``: ``[num_layers, n, block_size, num_kv_heads, head_dim]`` in the
    stored dtype; ``k_scale``/``v_scale``: float32 ``[num_layers, n,
    num_kv_heads]`` for quantized blocks, else ``None``.
    """

    k: torch.Tensor
    v: torch.Tensor
    dtype: str
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    _event: Any = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.k_scale is not None else [])
        return int(sum(t.numel() * t.element_size() for t in tensors))

    @property
    def ready(self) -> bool:
        """Whether the asynchronous copy (if any) has finished, without blocking."""
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def to_numpy(self) -> NumpyHostBlocks:
        """The same blocks as NumPy: zero-copy views (DLPack) where NumPy has the dtype, else widened copies.

        Host blocks are private to their owner, so views are safe here (unlike
        pool snapshots, which must be copies).
        """
        self.wait()
        scales = (None, None) if self.k_scale is None else (_host_view(self.k_scale), _host_view(self.v_scale))
        return NumpyHostBlocks(_host_view(self.k), _host_view(self.v), self.dtype, *scales)


def _host_view(tensor: torch.Tensor):
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float64, torch.float32, torch.float16, torch.int8):
        return np.from_dlpack(tensor.detach())
    return to_numpy(tensor)


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def copy_to_host(tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
    """Copy freshly gathered device tensors to the host; return (host tensors, event or None).

    The device tensors must not be written after this call (they are the
    gathered copies, owned by the swap); on CUDA they are kept alive for the
    side stream with ``record_stream``.
    """
    if device.type == "cpu":
        return tensors, None
    if device.type != "cuda":
        return [t.cpu() for t in tensors], None
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    host = []
    with torch.cuda.stream(side):
        for t in tensors:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            t.record_stream(side)
            host.append(h)
        event = torch.cuda.Event()
        event.record(side)
    return host, event
