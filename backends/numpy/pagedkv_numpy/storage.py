"""K/V block pools as NumPy arrays.

All layers live in one array per K and V, ``[num_layers, num_blocks,
block_size, num_kv_heads, head_dim]``, so a copy or swap over all layers is a
single fancy-index assignment. Int8 pools carry float32 scales
``[num_layers, num_blocks, num_kv_heads]``; when a write brings a value larger
than a block's scale covers, the block's existing values are requantized to
the new scale (error stays within one quantization step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.quant import INT8_MAX, dequantize_blocks, quantize_blocks
from pagedkv_core.contract.storage import HostBlocks, NumpyHostBlocks, StorageChecks
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, NonFiniteValue, UnsupportedOperation
from pagedkv_core.memory import check_pools

__all__ = ["NumpyStorage", "NUMPY_DTYPES"]

NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int8": np.int8}


class NumpyStorage:
    """Block storage on the host CPU, in NumPy arrays."""

    def __init__(self, config: CacheConfig, device: str = "cpu") -> None:
        if device != "cpu":
            raise InvalidArgument(f"the numpy backend has only the 'cpu' device, not {device!r}")
        if config.dtype not in NUMPY_DTYPES:
            raise UnsupportedOperation(f"numpy storage does not support dtype {config.dtype!r}")
        check_pools(config, device)  # NumPy's zeros would succeed lazily and the kernel kill us on first write
        self.config = config
        self.device = device
        self.checks = StorageChecks(config)
        c = config
        shape = (c.num_layers, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        self.np_dtype = np.dtype(NUMPY_DTYPES[c.dtype])
        self.k = np.zeros(shape, self.np_dtype)
        self.v = np.zeros(shape, self.np_dtype)
        self.quantized = c.quantized
        if self.quantized:
            self.k_scale = np.zeros((c.num_layers, c.num_blocks, c.num_kv_heads), np.float32)
            self.v_scale = np.zeros_like(self.k_scale)

    # -- writing -------------------------------------------------------------

    def write(self, layer: int, slot_mapping, k: np.ndarray, v: np.ndarray) -> None:
        layer = self.checks.layer(layer)
        k, v = np.asarray(k), np.asarray(v)
        n = self.checks.kv_shape(k.shape, v.shape)
        if k.dtype.kind != "f" or v.dtype.kind != "f":
            raise DTypeMismatch(f"k and v must be floating point, got {k.dtype} and {v.dtype}")
        slots = self.checks.slots(slot_mapping, n)
        keep = slots >= 0
        if not keep.all():
            slots, k, v = slots[keep], k[keep], v[keep]
        if self.quantized:
            if not (np.isfinite(k).all() and np.isfinite(v).all()):
                raise NonFiniteValue(self.config.dtype)
            self._write_quantized(self.k, self.k_scale, layer, slots, k)
            self._write_quantized(self.v, self.v_scale, layer, slots, v)
            return
        bs = self.config.block_size
        self.k[layer, slots // bs, slots % bs] = k
        self.v[layer, slots // bs, slots % bs] = v

    def _write_quantized(self, pool: np.ndarray, scales: np.ndarray, layer: int, slots: np.ndarray,
                         x: np.ndarray) -> None:
        bs = self.config.block_size
        blocks, offsets = slots // bs, slots % bs
        unique, inverse = np.unique(blocks, return_inverse=True)
        token_amax = np.abs(x.astype(np.float32)).max(axis=-1)  # [n, heads]
        block_amax = np.zeros((unique.size, x.shape[1]), np.float32)
        np.maximum.at(block_amax, inverse, token_amax)
        old = scales[layer, unique]
        new = np.maximum(old, block_amax / INT8_MAX)
        grown = (new > old) & (old > 0)
        if grown.any():
            ratio = np.where(grown, old / np.where(new > 0, new, 1.0), 1.0)  # [u, heads]
            values = pool[layer, unique].astype(np.float32) * ratio[:, None, :, None]
            pool[layer, unique] = np.clip(np.rint(values), -INT8_MAX, INT8_MAX).astype(np.int8)
        scales[layer, unique] = new
        safe = np.where(new > 0, new, 1.0)[inverse]  # [n, heads]
        q = np.clip(np.rint(x.astype(np.float32) / safe[:, :, None]), -INT8_MAX, INT8_MAX)
        pool[layer, blocks, offsets] = q.astype(np.int8)

    # -- reading -------------------------------------------------------------

    def gather(self, layer: int, block_table, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        layer = self.checks.layer(layer)
        ids = self.checks.table(block_table, int(seq_len))
        c = self.config
        out = []
        for pool, scales in ((self.k, getattr(self, "k_scale", None)), (self.v, getattr(self, "v_scale", None))):
            blocks = pool[layer, ids]
            if self.quantized:
                blocks = dequantize_blocks(blocks, scales[layer, ids])
            out.append(blocks.reshape(-1, c.num_kv_heads, c.head_dim)[:seq_len])
        return out[0], out[1]

    def to_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        layer = self.checks.layer(layer)
        if self.quantized:
            return (dequantize_blocks(self.k[layer], self.k_scale[layer]),
                    dequantize_blocks(self.v[layer], self.v_scale[layer]))
        return self.k[layer].copy(), self.v[layer].copy()

    # -- moving blocks -------------------------------------------------------

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        s, d = self.checks.copy_pairs(src, dst)
        if s.size == 0:
            return
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]
        if self.quantized:
            self.k_scale[:, d] = self.k_scale[:, s]
            self.v_scale[:, d] = self.v_scale[:, s]

    def swap_out(self, block_ids: Sequence[int], *, quantize: str | None = None) -> NumpyHostBlocks:
        ids = self.checks.block_ids(block_ids)
        if quantize not in (None, "int8"):
            raise UnsupportedOperation(f"numpy storage cannot quantize to {quantize!r}")
        k, v = self.k[:, ids], self.v[:, ids]  # fancy indexing copies
        if self.quantized:
            return NumpyHostBlocks(k, v, "int8", self.k_scale[:, ids].copy(), self.v_scale[:, ids].copy())
        if quantize == "int8":
            (qk, sk), (qv, sv) = quantize_blocks(k), quantize_blocks(v)
            return NumpyHostBlocks(qk, qv, "int8", sk, sv)
        return NumpyHostBlocks(k, v, self.config.dtype)

    def swap_in(self, host: HostBlocks, block_ids: Sequence[int]) -> None:
        host.wait()
        host = host.to_numpy()
        ids = self.checks.host_blocks(host, block_ids)
        k, v = host.k, host.v
        host_quantized = host.k_scale is not None
        if self.quantized and host.dtype == self.config.dtype:
            self.k[:, ids], self.v[:, ids] = k, v
            self.k_scale[:, ids], self.v_scale[:, ids] = host.k_scale, host.v_scale
            return
        if host_quantized:
            k, v = dequantize_blocks(k, host.k_scale), dequantize_blocks(v, host.v_scale)
        if self.quantized:
            (qk, sk), (qv, sv) = quantize_blocks(k), quantize_blocks(v)
            self.k[:, ids], self.v[:, ids] = qk, qv
            self.k_scale[:, ids], self.v_scale[:, ids] = sk, sv
            return
        self.k[:, ids] = k.astype(self.np_dtype, copy=False)
        self.v[:, ids] = v.astype(self.np_dtype, copy=False)

    # -- facts ---------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        scales = self.k_scale.nbytes + self.v_scale.nbytes if self.quantized else 0
        return int(self.k.nbytes + self.v.nbytes + scales)

    def synchronize(self) -> None:
        return None

    def pools(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The live K and V pool views of one layer (attention reads these)."""
        return self.k[layer], self.v[layer]

    def scales(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantized else None
