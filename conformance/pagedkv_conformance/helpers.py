"""Building blocks of the checks: storages on a target, random paged data, oracle comparisons.

Failure messages print the parameters and a snippet that reproduces the
case, so a vendor can debug one check without reading the suite.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_core import CacheConfig, PrefixCacheConfig
from pagedkv_core.dtypes import is_quantized

from .targets import Target
from .tolerances import tolerance

__all__ = ["make_config", "make_storage", "random_tables", "slots_for", "write_random", "make_query",
           "assert_close", "storage_state", "input_dtype"]


def input_dtype(dtype: str) -> str:
    """The dtype of K/V handed to ``write`` and of queries: float32 for quantized pools."""
    return "float32" if is_quantized(dtype) else dtype


def make_config(dtype: str, *, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 64,
                num_blocks: int = 64, block_size: int = 16, num_host_blocks: int = 0,
                prefix: bool = True) -> CacheConfig:
    return CacheConfig(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                       block_size=block_size, dtype=dtype, num_host_blocks=num_host_blocks,
                       prefix_cache=PrefixCacheConfig() if prefix else None)


def make_storage(target: Target, config: CacheConfig):
    """The target's storage for ``config``, or a skip naming the missing capability."""
    caps = target.capabilities
    if config.head_dim > caps.max_head_dim:
        pytest.skip(f"{target.id}: head_dim {config.head_dim} > max_head_dim {caps.max_head_dim}")
    if caps.block_sizes is not None and config.block_size not in caps.block_sizes:
        pytest.skip(f"{target.id}: block_size {config.block_size} not in {caps.block_sizes}")
    return target.backend.create_storage(config, target.device)


def random_tables(rng: np.random.Generator, seq_lens, block_size: int, num_blocks: int) -> np.ndarray:
    """Distinct, shuffled (non-monotonic) block ids per sequence, padded with -1."""
    need = [-(-int(n) // block_size) for n in seq_lens]
    if sum(need) > num_blocks:
        raise ValueError(f"{sum(need)} blocks needed, pool has {num_blocks}")
    ids = rng.permutation(num_blocks)[:sum(need)]
    table = np.full((len(need), max(need + [1])), -1, np.int32)
    start = 0
    for row, count in enumerate(need):
        table[row, :count] = ids[start:start + count]
        start += count
    return table


def slots_for(table: np.ndarray, seq_lens, block_size: int, first=None) -> np.ndarray:
    """Slot of every position ``first[i] .. seq_lens[i]-1`` of every sequence, concatenated."""
    first = [0] * len(seq_lens) if first is None else first
    out = [table[i, p // block_size] * block_size + p % block_size
           for i, n in enumerate(seq_lens) for p in range(int(first[i]), int(n))]
    return np.asarray(out, np.int64)


def write_random(target: Target, storage, slots: np.ndarray, rng: np.random.Generator, layers=None) -> None:
    """Write standard-normal K/V into ``slots`` of every layer (or ``layers``)."""
    c = storage.config
    kind = input_dtype(c.dtype)
    for layer in range(c.num_layers) if layers is None else layers:
        k = rng.standard_normal((slots.size, c.num_kv_heads, c.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        storage.write(layer, slots, target.backend.asarray(k, target.device, kind),
                      target.backend.asarray(v, target.device, kind))


def make_query(target: Target, rng: np.random.Generator, num: int, num_q_heads: int, head_dim: int, dtype: str):
    """A native query and its float64 NumPy twin holding exactly the stored (rounded) values."""
    q = rng.standard_normal((num, num_q_heads, head_dim)).astype(np.float32)
    native = target.backend.asarray(q, target.device, input_dtype(dtype))
    return native, np.asarray(target.backend.to_numpy(native), np.float64)


def assert_close(target: Target, got, want: np.ndarray, operation: str, dtype: str, context: str) -> None:
    got = np.asarray(target.backend.to_numpy(got), np.float64)
    atol, rtol = tolerance(target.capabilities, operation, dtype)
    assert got.shape == want.shape, f"{context}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    if not (err <= bound).all():
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{operation} on {target.id} ({dtype}) differs from the float64 oracle: max error {err.max():.3g} "
            f"at {tuple(int(i) for i in worst)} (got {got[worst]:.6g}, want {want[worst]:.6g}, "
            f"atol={atol}, rtol={rtol})\n  case: {context}\n  reproduce: pagedkv conformance "
            f"--backend {target.backend_name} --device {target.device} --dtype {dtype} -k '{context}'")


def storage_state(target: Target, storage) -> list[np.ndarray]:
    """Every layer's pools as NumPy, for 'nothing changed' checks."""
    return [a for layer in range(storage.config.num_layers) for a in storage.to_numpy(layer)]
