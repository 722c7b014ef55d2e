"""The part of the backend contract that moves bytes: block storage.

A backend's storage owns, per layer, a K pool and a V pool of shape
``[num_blocks, block_size, num_kv_heads, head_dim]`` on one device. The core
never touches these arrays: it tells the storage *which* blocks to write,
copy, swap or move, always as whole lists so one call can be one kernel.

``StorageChecks`` holds the host-side validation every backend shares, so that
bad input fails the same way everywhere and before any byte moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..config import CacheConfig
from ..errors import DTypeMismatch, InvalidArgument, InvalidBlock, OutOfBounds, ShapeMismatch

__all__ = ["BlockStorage", "HostBlocks", "NumpyHostBlocks", "StorageChecks", "as_index_array"]

Array = Any  # a backend-native array (numpy.ndarray, torch.Tensor, mx.array, cupy.ndarray)


@runtime_checkable
class HostBlocks(Protocol):
    """Blocks copied off the device pool, for all layers, K and V.

    Returned by ``swap_out`` and accepted by ``swap_in`` of the same backend;
    every backend's ``swap_in`` also accepts a :class:`NumpyHostBlocks`, which
    is how blocks cross between backends.
    """

    dtype: str

    @property
    def num_blocks(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def wait(self) -> None:
        """Block until an asynchronous copy into this object has finished."""

    def to_numpy(self) -> NumpyHostBlocks: ...


@dataclass(slots=True)
class NumpyHostBlocks:
    """Host blocks as NumPy arrays: the portable form.

    ``k``/``v``: ``[num_layers, n, block_size, num_kv_heads, head_dim]`` in the
    stored dtype (bfloat16 and float8 travel as float32, which hold them exactly);
    ``k_scale``/``v_scale``: float32 ``[num_layers, n, num_kv_heads]`` for
    quantized blocks, else ``None``.
    """

    k: np.ndarray
    v: np.ndarray
    dtype: str
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        scales = sum(s.nbytes for s in (self.k_scale, self.v_scale) if s is not None)
        return int(self.k.nbytes + self.v.nbytes + scales)

    def wait(self) -> None:
        return None

    def to_numpy(self) -> NumpyHostBlocks:
        return self


@runtime_checkable
class BlockStorage(Protocol):
    """K/V block pools of every layer on one device.

    Slot ``s`` is token offset ``s % block_size`` of block ``s // block_size``.
    Index arguments may be host NumPy arrays or the backend's native arrays.
    """

    config: CacheConfig
    device: str

    def write(self, layer: int, slot_mapping: Array, k: Array, v: Array) -> None:
        """Scatter new tokens: ``k, v: [num_tokens, num_kv_heads, head_dim]`` into ``slot_mapping: [num_tokens]``.

        A slot of ``-1`` is skipped (padding), as in vLLM.
        """

    def gather(self, layer: int, block_table: Array, seq_len: int) -> tuple[Array, Array]:
        """The first ``seq_len`` tokens of one sequence as ``[seq_len, num_kv_heads, head_dim]`` (dequantized)."""

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer; ``dst`` ids are distinct and disjoint from ``src``."""

    def swap_out(self, block_ids: Sequence[int], *, quantize: str | None = None) -> HostBlocks:
        """Copy blocks to host memory (optionally quantized, e.g. ``"int8"``); the device blocks are untouched."""

    def swap_in(self, host: HostBlocks, block_ids: Sequence[int]) -> None:
        """Copy host blocks into the device blocks ``block_ids`` (dequantizing if needed)."""

    def to_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """A snapshot copy of the whole K and V pools of ``layer`` as NumPy (dequantized for quantized pools).

        Never a live view: later writes must not change what was returned.
        """

    @property
    def nbytes(self) -> int:
        """Device bytes held by the pools (scales included)."""

    def synchronize(self) -> None:
        """Wait for outstanding device work (no-op on synchronous devices)."""


def as_index_array(values: Any, name: str) -> np.ndarray:
    """A host int64 NumPy copy of an index argument, whatever array it came as."""
    if isinstance(values, np.ndarray):
        array = values
    elif hasattr(values, "__dlpack__") and type(values).__module__.split(".")[0] in ("torch", "cupy"):
        array = np.asarray(values.cpu() if hasattr(values, "cpu") else values.get())
    else:
        array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise DTypeMismatch(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


class StorageChecks:
    """Host-side argument checks shared by every backend's storage."""

    def __init__(self, config: CacheConfig) -> None:
        if config.hybrid:
            raise InvalidArgument(
                "a config with layer_groups is served by HybridCacheManager; build the storage from "
                "config.storage_config() (one layer per slot of a cache group), not from the config itself")
        self.config = config
        self.num_slots = config.num_blocks * config.block_size

    def layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.config.num_layers:
            raise InvalidArgument(f"layer {layer!r} out of range [0, {self.config.num_layers})")
        return int(layer)

    def slots(self, slot_mapping: Any, num_tokens: int) -> np.ndarray:
        slots = as_index_array(slot_mapping, "slot_mapping")
        if slots.shape != (num_tokens,):
            raise ShapeMismatch(f"slot_mapping has shape {slots.shape}, expected ({num_tokens},)")
        bad = (slots < -1) | (slots >= self.num_slots)
        if bad.any():
            slot = int(slots[bad][0])
            raise InvalidBlock(slot // self.config.block_size, self.config.num_blocks, f"slot {slot}")
        return slots

    def kv_shape(self, k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
        c = self.config
        expected = (c.num_kv_heads, c.head_dim)
        if len(k_shape) != 3 or tuple(k_shape[1:]) != expected or tuple(v_shape) != tuple(k_shape):
            raise ShapeMismatch(
                f"k and v must both be [num_tokens, {c.num_kv_heads}, {c.head_dim}], "
                f"got {tuple(k_shape)} and {tuple(v_shape)}"
            )
        return int(k_shape[0])

    def block_ids(self, ids: Sequence[int] | np.ndarray, name: str = "block_ids") -> np.ndarray:
        array = as_index_array(ids, name).reshape(-1)
        bad = (array < 0) | (array >= self.config.num_blocks)
        if bad.any():
            raise InvalidBlock(int(array[bad][0]), self.config.num_blocks, name)
        return array

    def copy_pairs(self, src: Sequence[int], dst: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        s, d = self.block_ids(src, "src"), self.block_ids(dst, "dst")
        if s.shape != d.shape:
            raise ShapeMismatch(f"src and dst differ in length: {s.size} vs {d.size}")
        if np.unique(d).size != d.size or np.intersect1d(s, d).size:
            raise InvalidArgument("dst block ids must be distinct and disjoint from src")
        return s, d

    def table(self, block_table: Any, seq_len: int) -> np.ndarray:
        """Validate one sequence's table and length; return the block ids covering ``seq_len``."""
        table = as_index_array(block_table, "block_table").reshape(-1)
        if seq_len < 0:
            raise InvalidArgument(f"seq_len must be >= 0, got {seq_len}")
        needed = -(-seq_len // self.config.block_size)
        if needed > table.size:
            raise OutOfBounds(seq_len - 1, table.size * self.config.block_size)
        return self.block_ids(table[:needed], "block_table")

    def host_blocks(self, host: NumpyHostBlocks, block_ids: Sequence[int]) -> np.ndarray:
        ids = self.block_ids(block_ids)
        c = self.config
        expected = (c.num_layers, ids.size, c.block_size, c.num_kv_heads, c.head_dim)
        if tuple(host.k.shape) != expected or tuple(host.v.shape) != expected:
            raise ShapeMismatch(f"host blocks have shape {tuple(host.k.shape)}, expected {expected}")
        if np.unique(ids).size != ids.size:
            raise InvalidArgument("swap_in block ids must be distinct")
        return ids
