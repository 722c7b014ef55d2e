"""K/V block pools as CuPy arrays on one CUDA device.

All layers live in one array per K and V, ``[num_layers, num_blocks,
block_size, num_kv_heads, head_dim]`` (NHD per layer), so a copy or swap over
all layers is one fancy-index assignment. bfloat16 pools are kept as their
16-bit payload (``uint16``) and exposed as bfloat16 views. Int8 pools carry
float32 scales ``[num_layers, num_blocks, num_kv_heads]``; ``write`` quantizes
on the device in one kernel, growing a block's scale (and requantizing its
values) when new tokens exceed it, exactly as the NumPy backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract import quant
from pagedkv_core.contract.storage import HostBlocks, NumpyHostBlocks, StorageChecks
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, NonFiniteValue, ShapeMismatch, UnsupportedOperation
from pagedkv_core.memory import check_pools

from .convert import (
    bf16_bits_to_float32,
    contiguous,
    dequantize_blocks,
    float32_to_raw,
    quantize_blocks,
    raw_to_float32,
)
from .host import CupyHostBlocks
from .kernels import WRITE_INT8, ModuleKey, write_name
from .runtime import RAW_DTYPES, CudaRuntime

__all__ = ["CupyStorage"]

FLOAT_INPUTS = ("float16", "bfloat16", "float32", "float64")
WRITE_MODULE = ModuleKey("write")
THREADS = 128


class CupyStorage:
    """Block storage on one CUDA device. ``runtime`` defaults to the device's :class:`CudaRuntime`."""

    def __init__(self, config: CacheConfig, device: str = "cuda:0", *, runtime: Any = None) -> None:
        if config.dtype not in RAW_DTYPES:
            raise UnsupportedOperation(
                f"cupy storage does not support dtype {config.dtype!r} (supported: {', '.join(RAW_DTYPES)})")
        rt = runtime if runtime is not None else CudaRuntime.for_device(device)
        if config.dtype == "bfloat16":
            rt.native_dtype("bfloat16")  # UnsupportedOperation with CuPy's reason
        check_pools(config, rt.device, rt.free_memory(), unified=False)
        self.runtime = rt
        self.xp = rt.xp
        self.config = config
        self.device = rt.device
        self.checks = StorageChecks(config)
        c = config
        shape = (c.num_layers, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        self.raw_dtype = np.dtype(RAW_DTYPES[c.dtype])
        self.k = rt.zeros(shape, self.raw_dtype)
        self.v = rt.zeros(shape, self.raw_dtype)
        self.quantized = c.quantized
        self.k_scale = rt.zeros(shape[:2] + (c.num_kv_heads,), np.float32) if self.quantized else None
        self.v_scale = rt.zeros(shape[:2] + (c.num_kv_heads,), np.float32) if self.quantized else None
        self._inflight: list[tuple[Any, tuple]] = []

    # -- writing -------------------------------------------------------------

    def write(self, layer: int, slot_mapping: Any, k: Any, v: Any) -> None:
        """Scatter ``k, v: [num_tokens, num_kv_heads, head_dim]`` (float, on this device) into ``slot_mapping``.

        ``slot_mapping``: int ``[num_tokens]``, host or device; ``-1`` skips a token.
        """
        layer = self.checks.layer(layer)
        k, v = self.runtime.native(k, "k"), self.runtime.native(v, "v")
        n = self.checks.kv_shape(k.shape, v.shape)
        k_name, v_name = self._float_name(k, "k"), self._float_name(v, "v")
        slots = self.checks.slots(slot_mapping, n)
        keep = slots >= 0
        if not keep.any():
            return
        with self.runtime.activate():  # conversions run on the storage's device
            if self.quantized:
                k32, v32 = self._float32(k, k_name), self._float32(v, v_name)
                rows = self.runtime.upload(np.flatnonzero(keep))
                if not bool(self.xp.isfinite(k32[rows]).all() & self.xp.isfinite(v32[rows]).all()):  # one sync
                    raise NonFiniteValue(self.config.dtype)
                self._write_int8(layer, slots, keep, k32, v32)
                return
            c = self.config
            self.runtime.launch(WRITE_MODULE, write_name(self.raw_dtype.itemsize), (n,), (THREADS,), (
                self.k[layer], self.v[layer], self._carrier(k, k_name), self._carrier(v, v_name),
                self.runtime.upload(slots), np.int64(c.num_blocks * c.block_size),
                np.int32(c.num_kv_heads * c.head_dim)))

    def _write_int8(self, layer: int, slots: np.ndarray, keep: np.ndarray, k32: Any, v32: Any) -> None:
        # Group the written tokens by destination block (host work on the host copy of the slots).
        c = self.config
        tokens = np.flatnonzero(keep)
        unique, inverse = np.unique(slots[tokens] // c.block_size, return_inverse=True)
        tok_idx = tokens[np.argsort(inverse, kind="stable")].astype(np.int32)
        tok_ptr = np.zeros(unique.size + 1, np.int32)
        tok_ptr[1:] = np.cumsum(np.bincount(inverse.reshape(-1), minlength=unique.size))
        rt = self.runtime
        rt.launch(WRITE_MODULE, WRITE_INT8, (unique.size, c.num_kv_heads, 2), (THREADS,), (
            self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer], k32, v32,
            rt.upload(slots), rt.upload(unique.astype(np.int64)), rt.upload(tok_ptr), rt.upload(tok_idx),
            np.int32(c.num_blocks), np.int32(c.block_size), np.int32(c.num_kv_heads), np.int32(c.head_dim)))

    def _float_name(self, x: Any, name: str) -> str:
        dtype = self.runtime.dtype_name(x.dtype)
        if dtype not in FLOAT_INPUTS:
            raise DTypeMismatch(f"{name} must be floating point, got {dtype}")
        return dtype

    def _float32(self, x: Any, dtype: str) -> Any:
        xp = self.xp
        if dtype == "bfloat16":
            return bf16_bits_to_float32(xp, contiguous(xp, x).view(xp.uint16))
        return xp.ascontiguousarray(x.astype(xp.float32))

    def _carrier(self, x: Any, dtype: str) -> Any:
        """``x`` in the pool's carrier dtype, contiguous (a direct cast where no bfloat16 is involved)."""
        xp, target = self.xp, self.config.dtype
        if dtype == target:
            out = contiguous(xp, x)
            return out.view(xp.uint16) if target == "bfloat16" else out
        if "bfloat16" not in (dtype, target):
            return xp.ascontiguousarray(x.astype(self.raw_dtype))
        return xp.ascontiguousarray(float32_to_raw(xp, self._float32(x, dtype), target))

    # -- reading -------------------------------------------------------------

    def gather(self, layer: int, block_table: Any, seq_len: int) -> tuple[Any, Any]:
        """The first ``seq_len`` tokens as device arrays ``[seq_len, num_kv_heads, head_dim]``.

        Float pools keep their dtype; int8 pools come back dequantized as float32.
        """
        layer = self.checks.layer(layer)
        ids = self.checks.table(block_table, int(seq_len))
        c, rt, xp = self.config, self.runtime, self.xp
        ids_dev = rt.upload(ids)
        out = []
        with rt.activate():
            for pool, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
                blocks = pool[layer][ids_dev]
                if self.quantized:
                    blocks = dequantize_blocks(xp, blocks, scales[layer][ids_dev])
                elif c.dtype == "bfloat16":
                    blocks = blocks.view(rt.native_dtype("bfloat16"))
                out.append(blocks.reshape(-1, c.num_kv_heads, c.head_dim)[:seq_len])
        return out[0], out[1]

    def to_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole K and V pools of ``layer`` as NumPy ``[num_blocks, block_size, num_kv_heads, head_dim]``.

        bfloat16 comes back as float32 (exact), int8 dequantized as float32.
        """
        layer = self.checks.layer(layer)
        rt = self.runtime
        k, v = rt.download(self.k[layer]), rt.download(self.v[layer])
        if self.quantized:
            return (quant.dequantize_blocks(k, rt.download(self.k_scale[layer])),
                    quant.dequantize_blocks(v, rt.download(self.v_scale[layer])))
        if self.config.dtype == "bfloat16":
            return bf16_bits_to_float32(np, k), bf16_bits_to_float32(np, v)
        return k, v

    def pools(self, layer: int) -> tuple[Any, Any]:
        """The live K and V pools of one layer, ``[num_blocks, block_size, num_kv_heads, head_dim]`` device views."""
        layer = self.checks.layer(layer)
        if self.config.dtype == "bfloat16":
            dtype = self.runtime.native_dtype("bfloat16")
            return self.k[layer].view(dtype), self.v[layer].view(dtype)
        return self.k[layer], self.v[layer]

    def scales(self, layer: int) -> tuple[Any, Any] | None:
        """float32 ``[num_blocks, num_kv_heads]`` scales of an int8 layer, else None."""
        layer = self.checks.layer(layer)
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantized else None

    # -- moving blocks -------------------------------------------------------

    def _arrays(self) -> tuple[Any, ...]:
        return (self.k, self.v, self.k_scale, self.v_scale) if self.quantized else (self.k, self.v)

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer (scales too), bit-exact."""
        s, d = self.checks.copy_pairs(src, dst)
        if s.size == 0:
            return
        rt = self.runtime
        s_dev, d_dev = rt.upload(s), rt.upload(d)
        with rt.activate():
            for array in self._arrays():
                array[:, d_dev] = array[:, s_dev]

    def swap_out(self, block_ids: Sequence[int], *, quantize: str | None = None) -> CupyHostBlocks:
        """Start copying blocks to pinned host memory (optionally quantized to int8); returns at once.

        The device blocks are untouched and may be reused right away: the
        blocks are first gathered on the current stream, and the host copy
        reads that gathered copy on the copy stream. Call ``wait()`` on the
        result before reading it.
        """
        ids = self.checks.block_ids(block_ids)
        if quantize not in (None, "int8"):
            raise UnsupportedOperation(f"cupy storage cannot quantize to {quantize!r}")
        rt, xp, dtype = self.runtime, self.xp, self.config.dtype
        ids_dev = rt.upload(ids)
        with rt.activate():
            parts = [xp.ascontiguousarray(a[:, ids_dev]) for a in self._arrays()]
            if not self.quantized and quantize == "int8":
                (qk, sk), (qv, sv) = (quantize_blocks(xp, raw_to_float32(xp, x, dtype)) for x in parts)
                parts, dtype = [qk, qv, sk, sv], "int8"
            outs = [rt.pinned_empty(p.shape, p.dtype) for p in parts]
            event = rt.copy_to_host_async(list(zip(parts, outs)))
        self._track(event, (*parts, *outs))  # both ends of the copy live until it completes
        scales = (outs[2], outs[3]) if len(outs) == 4 else (None, None)
        return CupyHostBlocks(outs[0], outs[1], dtype, *scales, event=event, keepalive=tuple(parts))

    def swap_in(self, host: HostBlocks, block_ids: Sequence[int]) -> None:
        """Copy host blocks (this backend's, or any ``NumpyHostBlocks``) into the device blocks ``block_ids``.

        Blocks in this pool's own form are copied asynchronously from pinned
        memory; others are converted on the host exactly as the NumPy backend
        converts them (dequantize, quantize, cast).
        """
        if not hasattr(host, "wait") or not hasattr(host, "to_numpy"):
            raise InvalidArgument(f"swap_in needs HostBlocks, got {type(host).__name__}")
        host.wait()
        same_form = isinstance(host, CupyHostBlocks) and host.dtype == self.config.dtype
        if not same_form and not isinstance(host, NumpyHostBlocks):
            host = host.to_numpy()
        ids = self.checks.host_blocks(host, block_ids)
        self._check_scales(host, ids.size)
        rt = self.runtime
        if same_form:
            arrays = (host.k, host.v, host.k_scale, host.v_scale) if self.quantized else (host.k, host.v)
            devices, event = rt.copy_to_device_async(arrays)
            self._track(event, arrays)
        else:
            devices = [rt.upload(np.ascontiguousarray(a)) for a in self._host_to_raw(host)]
        ids_dev = rt.upload(ids)
        with rt.activate():
            for array, values in zip(self._arrays(), devices):
                array[:, ids_dev] = values

    def _check_scales(self, host: Any, n: int) -> None:
        if host.k_scale is None:
            return
        c = self.config
        expected = (c.num_layers, n, c.num_kv_heads)
        if tuple(host.k_scale.shape) != expected or tuple(host.v_scale.shape) != expected:
            raise ShapeMismatch(f"host scales have shape {tuple(host.k_scale.shape)}, expected {expected}")

    def _host_to_raw(self, host: NumpyHostBlocks) -> tuple[np.ndarray, ...]:
        """NumpyHostBlocks -> this pool's carrier arrays (and scales), as NumpyStorage.swap_in converts."""
        k, v = host.k, host.v
        host_quantized = host.k_scale is not None
        if self.quantized and host_quantized:
            return (k.astype(np.int8), v.astype(np.int8),
                    host.k_scale.astype(np.float32), host.v_scale.astype(np.float32))
        if host_quantized:
            k, v = quant.dequantize_blocks(k, host.k_scale), quant.dequantize_blocks(v, host.v_scale)
        if self.quantized:
            (qk, sk), (qv, sv) = quant.quantize_blocks(k), quant.quantize_blocks(v)
            return qk, qv, sk, sv
        if self.config.dtype == "bfloat16":
            return tuple(float32_to_raw(np, x.astype(np.float32), "bfloat16") for x in (k, v))
        return k.astype(self.raw_dtype), v.astype(self.raw_dtype)

    def _track(self, event: Any, keep: tuple) -> None:
        """Keep buffers an asynchronous copy still reads alive until its event completes."""
        self._inflight = [(e, b) for e, b in self._inflight if not self.runtime.event_done(e)]
        if event is not None:
            self._inflight.append((event, keep))

    # -- facts ---------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._arrays()))

    def synchronize(self) -> None:
        self.runtime.synchronize()
        self._inflight.clear()
