"""Test data shared by the cupy attention and storage tests: paged batches with known contents."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagedkv_conformance.oracle import reference_attention
from pagedkv_core.config import CacheConfig

# (atol, rtol) against the float64 oracle, by query dtype: the output is rounded to it.
TOLERANCES = {"float32": (3e-5, 3e-5), "float16": (4e-3, 4e-3), "bfloat16": (3e-2, 2e-2)}


def config(dtype: str, *, num_kv_heads: int = 2, head_dim: int = 16, num_blocks: int = 96, block_size: int = 16,
           num_layers: int = 2) -> CacheConfig:
    return CacheConfig(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                       block_size=block_size, dtype=dtype)


def block_tables(lens: np.ndarray, block_size: int, num_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Disjoint random blocks per sequence, ``[batch, width]`` int32, unused entries -1 (one spare column)."""
    needed = -(-np.asarray(lens) // block_size)
    width = int(needed.max(initial=0)) + 1
    ids = rng.permutation(num_blocks)
    if needed.sum() > num_blocks:
        raise ValueError("pool too small for the batch")
    tables = np.full((len(lens), width), -1, np.int32)
    start = 0
    for b, n in enumerate(needed):
        tables[b, :n] = ids[start:start + n]
        start += n
    return tables


def fill(target: Any, storage: Any, layer: int, tables: np.ndarray, lens: np.ndarray, rng: np.random.Generator,
         spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Write random K/V for every sequence through ``storage.write``; return the layer's pools as NumPy."""
    c = storage.config
    source_dtype = "float32" if c.quantized else c.dtype
    for b, n in enumerate(np.asarray(lens)):
        pos = np.arange(int(n))
        slots = tables[b][pos // c.block_size].astype(np.int64) * c.block_size + pos % c.block_size
        k = rng.standard_normal((int(n), c.num_kv_heads, c.head_dim)) * spread
        v = rng.standard_normal((int(n), c.num_kv_heads, c.head_dim)) * spread
        storage.write(layer, slots, target.put(k, source_dtype), target.put(v, source_dtype))
    return storage.to_numpy(layer)


def check_attention(target: Any, storage: Any, layer: int, q_dtype: str, num_q_heads: int, tables: np.ndarray,
                    lens: np.ndarray, query_start_loc: np.ndarray | None, rng: np.random.Generator,
                    pools: tuple[np.ndarray, np.ndarray], plan: Any = None, **params: Any) -> np.ndarray:
    """Run attention on ``target`` and compare with the float64 oracle; return the output as NumPy."""
    num_queries = len(lens) if query_start_loc is None else int(query_start_loc[-1])
    q = target.put(rng.standard_normal((num_queries, num_q_heads, storage.config.head_dim)), q_dtype)
    if plan is None:
        plan = target.attention.plan(storage, tables, lens, query_start_loc, **params)
    out = plan.run(q, layer)
    assert tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
    got = target.get(out)
    expected = reference_attention(target.get(q), pools[0], pools[1], tables, lens, query_start_loc, **params)
    atol, rtol = TOLERANCES[q_dtype]
    np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol,
                               err_msg=f"{q_dtype} q, {storage.config.dtype} pool, params {params}")
    return got
