"""Shared helpers of the MLX backend tests: small configs, random batches, the oracle call.

Imports nothing from MLX: a test module calls :func:`import_mlx` first, which skips it where MLX is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.oracle import reference_attention
from pagedkv_core.config import CacheConfig


def import_mlx():
    """``mlx.core``, or skip the calling module with the reason (missing or broken MLX)."""
    return pytest.importorskip("mlx.core", reason="MLX is not importable (pip install mlx; on Linux \"mlx[cpu]\")",
                               exc_type=ImportError)


DTYPES = ("float32", "float16", "bfloat16", "int8")
KERNELS = ("host", "mlx")

TOLERANCE = {  # (atol, rtol) of attention against the float64 oracle, by storage dtype
    "float32": (2e-5, 2e-5),
    "float16": (4e-3, 4e-3),
    "bfloat16": (3e-2, 3e-2),
    "int8": (2e-5, 2e-5),  # with float32 queries; the oracle reads the dequantized pool
}


def make_config(dtype: str = "float32", *, num_blocks: int = 48, block_size: int = 4, heads: int = 2,
                head_dim: int = 8, layers: int = 2) -> CacheConfig:
    return CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=head_dim, num_blocks=num_blocks,
                       block_size=block_size, dtype=dtype)


def random_kv(rng: np.random.Generator, n: int, config: CacheConfig) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 arrays ``[n, num_kv_heads, head_dim]``."""
    shape = (n, config.num_kv_heads, config.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def fill(storage, rng: np.random.Generator) -> None:
    """Write random values into every slot of every layer."""
    c = storage.config
    slots = np.arange(c.num_blocks * c.block_size)
    for layer in range(c.num_layers):
        storage.write(layer, slots, *random_kv(rng, slots.size, c))


def random_tables(rng: np.random.Generator, seq_lens, config: CacheConfig, *, extra: int = 1) -> np.ndarray:
    """Int32 ``[batch, max_blocks]`` tables of distinct random blocks; unused entries are ``-1``.

    ``-1`` padding is outside the pool: a kernel that read an entry beyond a
    sequence's length would fail or produce garbage.
    """
    bs = config.block_size
    need = [-(-int(n) // bs) for n in seq_lens]
    width = max(need, default=0) + extra
    ids = rng.permutation(config.num_blocks)[: sum(need)]
    tables = np.full((len(need), width), -1, np.int32)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[start:start + n]
        start += n
    return tables


def oracle(backend, q, storage, layer: int, tables, seq_lens, query_start_loc=None, **kwargs) -> np.ndarray:
    """The float64 reference for ``q`` (MLX) over ``storage``'s ``layer`` as stored (dequantized)."""
    k_pool, v_pool = storage.to_numpy(layer)
    return reference_attention(backend.to_numpy(q), k_pool, v_pool, np.asarray(tables), np.asarray(seq_lens),
                               None if query_start_loc is None else np.asarray(query_start_loc), **kwargs)


def snapshot(storage) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's pools as NumPy, to show that a failed call changed nothing."""
    return [storage.to_numpy(layer) for layer in range(storage.config.num_layers)]


def assert_unchanged(storage, before: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for layer, (k, v) in enumerate(before):
        now_k, now_v = storage.to_numpy(layer)
        np.testing.assert_array_equal(now_k, k, err_msg=f"K of layer {layer} changed")
        np.testing.assert_array_equal(now_v, v, err_msg=f"V of layer {layer} changed")
