"""K/V block pools as MLX arrays, updated in place although MLX arrays are immutable.

All layers live in one array per K and V, ``[num_layers, num_blocks,
block_size, num_kv_heads, head_dim]`` (the NHD layout of the contract, so
``to_numpy`` is a plain copy), which makes a copy or swap over all layers one
gather and one scatter. Int8 pools carry float32 scales ``[num_layers,
num_blocks, num_kv_heads]`` (:mod:`pagedkv_mlx.int8`).

How a write stays in place. ``pool[layer, blocks, offsets] = x`` records a
lazy scatter whose input is the old pool. When it is evaluated, MLX reuses
(donates) the input buffer if nothing else holds it, so the scatter touches
only the written slots; if anything still holds the old pool (an unevaluated
graph that reads it, or an evaluated view of it), MLX must copy the whole
pool first. Hence these evaluation points:

* ``write``, ``copy_blocks`` and ``swap_in`` evaluate their result before
  returning: each is one scatter, and the next operation starts from a
  materialised pool with a single owner.
* Operations that read the pool to compute what they write (the int8 write,
  ``copy_blocks``) first evaluate what they read, so the read has released the
  pool before the scatter runs; otherwise the scatter would find the buffer
  still in use and copy it.
* Attention (``pagedkv_mlx.attention``) evaluates its reads of the pools in
  ``run``; ``gather``, ``to_numpy`` and ``swap_out`` return evaluated copies.

So no pool reference outlives a call, and a decode step's write costs the
same for a pool of 1k or 16k blocks (``docs/benchmarks-mlx.md``). A caller that keeps
an evaluated view of a pool (a :meth:`MlxStorage.pools` slice, ``storage.k[:, i]``)
across a write makes that write copy the pool: read through ``gather`` /
``to_numpy`` or drop the view first. The storage is not thread-safe: one
thread writes and runs attention at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.config import CacheConfig
from pagedkv_core.contract.quant import dequantize_blocks as host_dequantize
from pagedkv_core.contract.storage import HostBlocks, NumpyHostBlocks, StorageChecks
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, NonFiniteValue, UnsupportedOperation
from pagedkv_core.memory import check_pools

from .arrays import FLOAT_MX, MX_DTYPES, host_view, mlx_device, to_host
from .int8 import dequantize_blocks, merge_tokens, quantize_blocks

__all__ = ["MlxStorage"]

Array = Any  # mx.array


def _as_values(x: Any, name: str, pool_dtype: Any) -> Array:
    """``x`` as an MLX float array (NumPy and MLX inputs); :class:`DTypeMismatch` for non-float data.

    NumPy input is rounded once, on the host, to a float32/float16 pool's dtype
    (else to float32, which bfloat16 and int8 pools take from there).
    """
    if isinstance(x, mx.array):
        if x.dtype not in FLOAT_MX and x.dtype != mx.float64:
            raise DTypeMismatch(f"{name} must be floating point, got {x.dtype}")
        return x
    host = np.asarray(x)
    if host.dtype.kind != "f":
        raise DTypeMismatch(f"{name} must be floating point, got {host.dtype}")
    return mx.array(host.astype(np.float16 if pool_dtype == mx.float16 else np.float32, copy=False))


class MlxStorage:
    """Block storage on one MLX device (``cpu`` or ``gpu``) in ``mx.array`` pools."""

    def __init__(self, config: CacheConfig, device: str = "cpu") -> None:
        if config.dtype not in MX_DTYPES:
            raise UnsupportedOperation(f"mlx storage does not support dtype {config.dtype!r}; "
                                       f"it has {', '.join(MX_DTYPES)}")
        self.mx_device = mlx_device(device)
        check_pools(config, device)  # CPU or Apple's unified memory: the pools draw on the host's
        self.config = config
        self.device = device
        self.checks = StorageChecks(config)
        self.quantized = config.quantized
        self.mx_dtype = MX_DTYPES[config.dtype]
        c = config
        shape = (c.num_layers, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        with mx.stream(self.mx_device):
            self.k = mx.zeros(shape, self.mx_dtype)
            self.v = mx.zeros(shape, self.mx_dtype)
            self.k_scale = self.v_scale = None
            if self.quantized:
                self.k_scale = mx.zeros((c.num_layers, c.num_blocks, c.num_kv_heads), mx.float32)
                self.v_scale = mx.zeros((c.num_layers, c.num_blocks, c.num_kv_heads), mx.float32)
            mx.eval(self._arrays())

    def _arrays(self) -> list[Array]:
        return [a for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None]

    # -- writing -------------------------------------------------------------

    def write(self, layer: int, slot_mapping: Any, k: Any, v: Any) -> None:
        """Scatter new tokens ``k, v [num_tokens, num_kv_heads, head_dim]`` (float, MLX or NumPy).

        ``slot_mapping [num_tokens]`` (int, NumPy or MLX): slot ``s`` is offset
        ``s % block_size`` of block ``s // block_size``; ``-1`` skips the token.
        Values are cast to the pool dtype (int8 pools quantize them).
        """
        layer = self.checks.layer(layer)
        k, v = _as_values(k, "k", self.mx_dtype), _as_values(v, "v", self.mx_dtype)
        n = self.checks.kv_shape(tuple(k.shape), tuple(v.shape))
        slots = self.checks.slots(slot_mapping, n)
        keep = slots >= 0
        if not keep.all():
            rows = mx.array(np.flatnonzero(keep))
            slots, k, v = slots[keep], k[rows], v[rows]
        if slots.size == 0:
            return
        bs = self.config.block_size
        with mx.stream(self.mx_device):
            if self.quantized:
                if not mx.all(mx.isfinite(k)).item() or not mx.all(mx.isfinite(v)).item():
                    raise NonFiniteValue(self.config.dtype)
                self._write_quantized(layer, slots // bs, slots % bs, k, v)
                return
            blocks, offsets = mx.array(slots // bs), mx.array(slots % bs)
            self.k[layer, blocks, offsets] = k.astype(self.mx_dtype)
            self.v[layer, blocks, offsets] = v.astype(self.mx_dtype)
            mx.eval(self.k, self.v)

    def _write_quantized(self, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: Array, v: Array) -> None:
        unique, inverse = np.unique(blocks, return_inverse=True)
        ids, inv, off = mx.array(unique), mx.array(inverse.reshape(-1)), mx.array(offsets)
        qk, sk = merge_tokens(self.k[layer, ids], self.k_scale[layer, ids], k, inv, off)
        qv, sv = merge_tokens(self.v[layer, ids], self.v_scale[layer, ids], v, inv, off)
        mx.eval(qk, sk, qv, sv)  # the reads of the pools finish (and let go) before the scatters
        self.k[layer, ids], self.k_scale[layer, ids] = qk, sk
        self.v[layer, ids], self.v_scale[layer, ids] = qv, sv
        mx.eval(self._arrays())

    # -- reading -------------------------------------------------------------

    def gather(self, layer: int, block_table: Any, seq_len: int) -> tuple[Array, Array]:
        """The first ``seq_len`` tokens of one sequence as ``[seq_len, num_kv_heads, head_dim]``.

        ``block_table [>= ceil(seq_len / block_size)]`` int. Float pools return
        their dtype, int8 pools dequantized float32.
        """
        layer = self.checks.layer(layer)
        seq_len = int(seq_len)
        ids = mx.array(self.checks.table(block_table, seq_len))
        c = self.config
        out = []
        with mx.stream(self.mx_device):
            for pool, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
                blocks = pool[layer, ids]
                if scales is not None:
                    blocks = dequantize_blocks(blocks, scales[layer, ids])
                out.append(blocks.reshape(-1, c.num_kv_heads, c.head_dim)[:seq_len])
            mx.eval(out)
        return out[0], out[1]

    def to_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V pools of ``layer`` as NumPy ``[num_blocks, block_size, num_kv_heads, head_dim]`` copies.

        bfloat16 comes as float32 and int8 as dequantized float32.
        """
        layer = self.checks.layer(layer)
        with mx.stream(self.mx_device):
            if self.quantized:
                return (to_host(dequantize_blocks(self.k[layer], self.k_scale[layer])),
                        to_host(dequantize_blocks(self.v[layer], self.v_scale[layer])))
            return to_host(self.k[layer]), to_host(self.v[layer])

    # -- moving blocks -------------------------------------------------------

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer (values and scales), one gather + one scatter."""
        s, d = self.checks.copy_pairs(src, dst)
        if s.size == 0:
            return
        src_ids, dst_ids = mx.array(s), mx.array(d)
        arrays = self._arrays()
        with mx.stream(self.mx_device):
            moved = [a[:, src_ids] for a in arrays]
            mx.eval(moved)  # the reads let go of the pools before the scatters
            for a, m in zip(arrays, moved):
                a[:, dst_ids] = m
            mx.eval(arrays)

    def swap_out(self, block_ids: Sequence[int], *, quantize: str | None = None) -> NumpyHostBlocks:
        """Copy blocks of every layer to host NumPy arrays (``[num_layers, n, block_size, heads, d]``).

        The blocks are gathered on the device into a fresh array that NumPy
        then views without a second copy. ``quantize="int8"`` quantizes float
        blocks on the device first; bfloat16 travels as float32 (exact).
        """
        ids = self.checks.block_ids(block_ids)
        if quantize not in (None, "int8"):
            raise UnsupportedOperation(f"mlx storage cannot quantize to {quantize!r}")
        idx = mx.array(ids)
        with mx.stream(self.mx_device):
            k, v = self.k[:, idx], self.v[:, idx]
            if self.quantized:
                ks, vs = self.k_scale[:, idx], self.v_scale[:, idx]
                mx.eval(k, v, ks, vs)
                return NumpyHostBlocks(host_view(k), host_view(v), "int8", host_view(ks), host_view(vs))
            if quantize == "int8":
                (k, ks), (v, vs) = quantize_blocks(k), quantize_blocks(v)
                mx.eval(k, v, ks, vs)
                return NumpyHostBlocks(host_view(k), host_view(v), "int8", host_view(ks), host_view(vs))
            if self.mx_dtype == mx.bfloat16:
                k, v = k.astype(mx.float32), v.astype(mx.float32)
            mx.eval(k, v)
            return NumpyHostBlocks(host_view(k), host_view(v), self.config.dtype)

    def swap_in(self, host: HostBlocks, block_ids: Sequence[int]) -> None:
        """Copy host blocks (any backend's :class:`NumpyHostBlocks`) into device blocks ``block_ids``.

        Quantized host blocks are dequantized for float pools; float host
        blocks are quantized for int8 pools; other dtypes are cast.
        """
        host.wait()
        host = host.to_numpy()
        ids = self.checks.host_blocks(host, block_ids)
        values = self._host_values(host)
        if ids.size == 0:
            return
        idx = mx.array(ids)
        arrays = self._arrays()
        with mx.stream(self.mx_device):
            for a, x in zip(arrays, values):
                a[:, idx] = x
            mx.eval(arrays)

    def _host_values(self, host: NumpyHostBlocks) -> list[Array]:
        """Host blocks converted to what the pools hold: ``[k, v]`` or ``[k, v, k_scale, v_scale]``."""
        c = self.config
        host_quantized = host.k_scale is not None
        if host_quantized:
            expected = (c.num_layers, host.num_blocks, c.num_kv_heads)
            if host.v_scale is None or tuple(host.k_scale.shape) != expected or tuple(host.v_scale.shape) != expected:
                raise InvalidArgument(f"host scales must both be {expected}")
            if host.k.dtype != np.int8 or host.v.dtype != np.int8:
                raise DTypeMismatch(f"quantized host blocks must be int8, got {host.k.dtype} and {host.v.dtype}")
        elif host.k.dtype.kind != "f" or host.v.dtype.kind != "f":
            raise DTypeMismatch(f"host blocks must be floating point or int8 with scales, got {host.k.dtype}")
        with mx.stream(self.mx_device):
            if self.quantized and host_quantized:
                return [mx.array(a) for a in (host.k, host.v, host.k_scale, host.v_scale)]
            if host_quantized:
                k, v = host_dequantize(host.k, host.k_scale), host_dequantize(host.v, host.v_scale)
            else:
                k, v = host.k, host.v
            if self.quantized:
                (qk, sk), (qv, sv) = quantize_blocks(mx.array(k)), quantize_blocks(mx.array(v))
                return [qk, qv, sk, sv]
            if self.mx_dtype != mx.bfloat16:  # cast on the host: one rounding, even from float64
                np_dtype = np.float32 if self.mx_dtype == mx.float32 else np.float16
                return [mx.array(k.astype(np_dtype, copy=False)), mx.array(v.astype(np_dtype, copy=False))]
            return [mx.array(k.astype(np.float32, copy=False)).astype(mx.bfloat16),
                    mx.array(v.astype(np.float32, copy=False)).astype(mx.bfloat16)]

    # -- facts and views -----------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Device bytes of the pools, scales included."""
        return int(sum(a.nbytes for a in self._arrays()))

    def synchronize(self) -> None:
        """Wait until work queued on this storage's device has finished."""
        mx.eval(self._arrays())
        mx.synchronize(mx.default_stream(self.mx_device))

    def pools(self, layer: int) -> tuple[Array, Array]:
        """Lazy K and V slices ``[num_blocks, block_size, num_kv_heads, head_dim]`` of one layer.

        Read them and let go before the next write: an evaluated view of a pool
        that is still alive at a write makes that write copy the whole pool.
        """
        layer = self.checks.layer(layer)
        return self.k[layer], self.v[layer]

    def scales(self, layer: int) -> tuple[Array, Array] | None:
        """Lazy float32 scale slices ``[num_blocks, num_kv_heads]`` of one layer, or ``None`` for float pools."""
        layer = self.checks.layer(layer)
        return (self.k_scale[layer], self.v_scale[layer]) if self.quantized else None

    def host_views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Zero-copy NumPy views of the whole pools and scales, for the host attention kernel.

        Shapes as the pools; bfloat16 pools come as their uint16 bits. The
        views alias memory a later write updates in place (or frees): use them
        within one call and drop them.
        """
        if self.quantized:
            return host_view(self.k), host_view(self.v), host_view(self.k_scale), host_view(self.v_scale)
        return host_view(self.k), host_view(self.v), None, None
