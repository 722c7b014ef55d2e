"""K/V block pools as torch tensors on one device (cpu, cuda:N, mps).

All layers live in one tensor per K and V, ``[num_layers, num_blocks,
block_size, num_kv_heads, head_dim]`` (the NHD layout of the contract, with a
layer axis), so ``copy_blocks`` and swaps over all layers are one batched
index copy each. Quantized pools (int8 everywhere, float8_e4m3fn on CUDA
devices of compute capability 8.9+) carry float32 scales ``[num_layers,
num_blocks, num_kv_heads]``. Every argument is validated on the host with
``StorageChecks`` before a byte moves, and nothing is recorded by autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.storage import HostBlocks, StorageChecks
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, NonFiniteValue, ShapeMismatch, UnsupportedOperation
from pagedkv_core.memory import check_pools

from .convert import index_tensor, native_tensor, put_, same_device, take, to_numpy, torch_dtype
from .devices import float_dtypes, free_device_memory, parse_device, quantized_dtypes
from .host import TorchHostBlocks, copy_to_host
from .quant import dequantize_blocks, quantize_blocks, write_quantized

__all__ = ["TorchStorage"]


class TorchStorage:
    """Block storage in torch tensors on ``device``."""

    def __init__(self, config: CacheConfig, device: str | torch.device = "cpu") -> None:
        dev = parse_device(str(device))
        supported = float_dtypes(dev) + quantized_dtypes(dev)
        if config.dtype not in supported:
            raise UnsupportedOperation(
                f"torch storage on {dev} supports {', '.join(supported)}, not {config.dtype!r}")
        check_pools(config, str(dev), free_device_memory(dev), unified=dev.type in ("cpu", "mps"))
        self.config = config
        self.torch_device = dev
        self.device = str(dev)
        self.checks = StorageChecks(config)
        self.quantized = config.quantized
        self.dtype = torch_dtype(config.dtype)
        c = config
        shape = (c.num_layers, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=dev)
        self.v = torch.zeros(shape, dtype=self.dtype, device=dev)
        if self.quantized:
            self.k_scale = torch.zeros((c.num_layers, c.num_blocks, c.num_kv_heads), dtype=torch.float32, device=dev)
            self.v_scale = torch.zeros_like(self.k_scale)

    # -- writing -------------------------------------------------------------

    @torch.no_grad()
    def write(self, layer: int, slot_mapping: Any, k: Any, v: Any) -> None:
        """Scatter ``k, v: [num_tokens, num_kv_heads, head_dim]`` (floating point) into ``slot_mapping [num_tokens]``.

        A slot of ``-1`` is skipped. Values are cast to the pool's dtype (or
        quantized, raising a block's scale when a larger value arrives).
        """
        layer = self.checks.layer(layer)
        k = native_tensor(k, "k", self.torch_device)
        v = native_tensor(v, "v", self.torch_device)
        n = self.checks.kv_shape(tuple(k.shape), tuple(v.shape))
        if not (k.is_floating_point() and v.is_floating_point()):
            raise DTypeMismatch(f"k and v must be floating point, got {k.dtype} and {v.dtype}")
        slots = self.checks.slots(slot_mapping, n)
        keep = slots >= 0
        if not keep.all():
            rows = index_tensor(np.flatnonzero(keep), self.torch_device)
            k, v, slots = k.index_select(0, rows), v.index_select(0, rows), slots[keep]
        if slots.size == 0:
            return
        slots_t = self._slots_tensor(slot_mapping, slots, bool(keep.all()))
        if self.quantized:
            if not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):  # one sync on CUDA: refuse before writing
                raise NonFiniteValue(self.config.dtype)
            write_quantized(self.k, self.k_scale, layer, slots_t, k, self.config.dtype)
            write_quantized(self.v, self.v_scale, layer, slots_t, v, self.config.dtype)
            return
        c = self.config
        put_(self.k[layer].view(-1, c.num_kv_heads, c.head_dim), 0, slots_t, k)
        put_(self.v[layer].view(-1, c.num_kv_heads, c.head_dim), 0, slots_t, v)

    def _slots_tensor(self, given: Any, slots: np.ndarray, unchanged: bool) -> torch.Tensor:
        # reuse a device tensor the caller already has instead of uploading the host copy again
        if (unchanged and isinstance(given, torch.Tensor) and given.dtype == torch.int64
                and same_device(given.device, self.torch_device) and given.dim() == 1):
            return given
        return index_tensor(slots, self.torch_device)

    # -- reading -------------------------------------------------------------

    @torch.no_grad()
    def gather(self, layer: int, block_table: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``seq_len`` tokens of one sequence, ``[seq_len, num_kv_heads, head_dim]`` (float32 if quantized)."""
        layer = self.checks.layer(layer)
        ids = index_tensor(self.checks.table(block_table, int(seq_len)), self.torch_device)
        c = self.config
        out = []
        for pool, scales in ((self.k, getattr(self, "k_scale", None)), (self.v, getattr(self, "v_scale", None))):
            blocks = take(pool[layer], 0, ids)
            if self.quantized:
                blocks = dequantize_blocks(blocks, scales[layer].index_select(0, ids))
            out.append(blocks.reshape(-1, c.num_kv_heads, c.head_dim)[: int(seq_len)])
        return out[0], out[1]

    def to_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s pools as NumPy ``[num_blocks, block_size, num_kv_heads, head_dim]`` (float32 for bf16/quantized)."""
        layer = self.checks.layer(layer)
        if self.quantized:
            return (to_numpy(dequantize_blocks(self.k[layer], self.k_scale[layer])),
                    to_numpy(dequantize_blocks(self.v[layer], self.v_scale[layer])))
        return to_numpy(self.k[layer]), to_numpy(self.v[layer])

    # -- moving blocks -------------------------------------------------------

    @torch.no_grad()
    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        s, d = self.checks.copy_pairs(src, dst)
        if s.size == 0:
            return
        s_t, d_t = index_tensor(s, self.torch_device), index_tensor(d, self.torch_device)
        for t in self._tensors():
            put_(t, 1, d_t, take(t, 1, s_t))

    @torch.no_grad()
    def swap_out(self, block_ids: Sequence[int], *, quantize: str | None = None) -> TorchHostBlocks:
        """Copy blocks of every layer to the host (asynchronously on CUDA; ``wait()`` before reading).

        ``quantize="int8"`` stores float blocks as int8 with per-(block, head) scales.
        """
        if quantize not in (None, "int8"):
            raise UnsupportedOperation(f"torch storage cannot quantize to {quantize!r} (only 'int8')")
        ids = self.checks.block_ids(block_ids)
        ids_t = index_tensor(ids, self.torch_device)
        k, v = take(self.k, 1, ids_t), take(self.v, 1, ids_t)
        scales: list[torch.Tensor] = []
        dtype = self.config.dtype
        if self.quantized:
            scales = [self.k_scale.index_select(1, ids_t), self.v_scale.index_select(1, ids_t)]
        elif quantize == "int8":
            (k, k_s), (v, v_s) = quantize_blocks(k, "int8"), quantize_blocks(v, "int8")
            scales, dtype = [k_s, v_s], "int8"
        host, event = copy_to_host([k, v, *scales], self.torch_device)
        hk, hv, *hs = host
        return TorchHostBlocks(hk, hv, dtype, *(hs or (None, None)), _event=event)

    @torch.no_grad()
    def swap_in(self, host: HostBlocks, block_ids: Sequence[int]) -> None:
        """Copy host blocks (this backend's, or any :class:`NumpyHostBlocks`) into ``block_ids``.

        Converts as needed: dequantizes, quantizes to this pool's kind, or casts.
        """
        if not isinstance(host, HostBlocks):
            raise InvalidArgument(f"swap_in needs HostBlocks (from swap_out or NumpyHostBlocks), got {type(host).__name__}")
        host.wait()
        if not isinstance(host, TorchHostBlocks):
            host = host.to_numpy()
        ids = self.checks.host_blocks(host, block_ids)
        c = self.config
        host_quantized = host.k_scale is not None
        if host_quantized:
            expected = (c.num_layers, ids.size, c.num_kv_heads)
            if tuple(host.k_scale.shape) != expected or tuple(host.v_scale.shape) != expected:
                raise ShapeMismatch(f"host scales have shape {tuple(host.k_scale.shape)}, expected {expected}")
            if host.dtype not in ("int8", "float8_e4m3fn"):
                raise DTypeMismatch(f"host blocks carry scales but dtype {host.dtype!r} is not a quantized kind")
            if host.dtype == "int8" and not all(str(x.dtype) in ("int8", "torch.int8") for x in (host.k, host.v)):
                raise DTypeMismatch(f"int8 host blocks must hold int8 values, got {host.k.dtype}")
        elif host.dtype not in ("float64", "float32", "float16", "bfloat16"):
            raise DTypeMismatch(f"host blocks of dtype {host.dtype!r} need scales")
        dev = self.torch_device
        k, v = (self._host_tensor(x) for x in (host.k, host.v))
        ks, vs = ((self._host_tensor(x) for x in (host.k_scale, host.v_scale)) if host_quantized else (None, None))
        if self.quantized and host_quantized and host.dtype == c.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        elif host_quantized:
            k, v = dequantize_blocks(k, ks), dequantize_blocks(v, vs)
        if self.quantized and not (host_quantized and host.dtype == c.dtype):
            (k, ks), (v, vs) = quantize_blocks(k, c.dtype), quantize_blocks(v, c.dtype)
        ids_t = index_tensor(ids, dev)
        put_(self.k, 1, ids_t, k)
        put_(self.v, 1, ids_t, v)
        if self.quantized:
            put_(self.k_scale, 1, ids_t, ks)
            put_(self.v_scale, 1, ids_t, vs)

    def _host_tensor(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.torch_device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.torch_device)

    # -- facts ---------------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._tensors()))

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.torch_device.type == "mps":
            torch.mps.synchronize()

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The live K and V pool views of one layer, ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self.k[layer], self.v[layer]

    def scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float32 ``[num_blocks, num_kv_heads]`` scales of one layer for quantized pools, else ``None``."""
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantized else None
