"""Helpers shared by the torch backend's tests: filled pools, random batches, the oracle, tolerances.

A uniquely named module (not ``conftest``) so that test modules of several
backends can import their helpers in one pytest session without clashing.
Nothing here imports torch: the folder must collect where torch is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedkv_core.config import CacheConfig

# per storage dtype: (atol, rtol) of attention against the float64 oracle
TOLERANCES = {
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (2e-2, 2e-2),
    "int8": (2e-5, 2e-5),  # compared with the dequantized pool, so only arithmetic error remains
    "float8_e4m3fn": (2e-5, 2e-5),
}


@dataclass
class Batch:
    """A filled storage plus the index arrays of one batch (host NumPy, as the manager makes them)."""

    storage: object
    block_tables: np.ndarray  # int32 [batch, max_blocks]
    seq_lens: np.ndarray  # int32 [batch]
    query_start_loc: np.ndarray | None  # int32 [batch + 1], None for decode


def make_config(dtype="float32", *, layers=2, kv_heads=2, head_dim=32, blocks=24, block_size=8, host_blocks=0):
    return CacheConfig(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=blocks,
                       block_size=block_size, dtype=dtype, num_host_blocks=host_blocks)


def fill(backend, storage, rng, *, scale=1.0):
    """Write random float32 values into every slot of every layer (through ``write``)."""
    c = storage.config
    slots = np.arange(c.num_blocks * c.block_size)
    for layer in range(c.num_layers):
        k = rng.standard_normal((slots.size, c.num_kv_heads, c.head_dim)).astype(np.float32) * scale
        v = rng.standard_normal((slots.size, c.num_kv_heads, c.head_dim)).astype(np.float32) * scale
        dt = "float32" if c.quantized else c.dtype
        storage.write(layer, slots, backend.asarray(k, storage.device, dt), backend.asarray(v, storage.device, dt))


def make_batch(backend, config, rng, seq_lens, query_lens=None, *, device="cpu", pad_value=-1):
    """A storage filled with random values and a batch whose sequences own shuffled, disjoint blocks.

    Table entries past a sequence's last block hold ``pad_value`` (never read).
    """
    storage = backend.create_storage(config, device)
    fill(backend, storage, rng)
    bs = config.block_size
    need = [-(-int(n) // bs) for n in seq_lens]
    width = max(need + [1])
    perm = rng.permutation(config.num_blocks)
    if sum(need) > config.num_blocks:
        raise ValueError("test batch needs more blocks than the pool has")
    tables = np.full((len(seq_lens), width), pad_value, np.int32)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start:start + n]
        start += n
    qsl = None if query_lens is None else np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    return Batch(storage, tables, np.asarray(seq_lens, np.int32), qsl)


def oracle(batch: Batch, q_np: np.ndarray, layer: int, **params) -> np.ndarray:
    from pagedkv_conformance.oracle import reference_attention

    k_pool, v_pool = batch.storage.to_numpy(layer)
    return reference_attention(q_np, k_pool, v_pool, batch.block_tables, batch.seq_lens,
                               batch.query_start_loc, **params)


def random_query(backend, batch: Batch, rng, num_q_heads: int, q_dtype: str) -> tuple[object, np.ndarray]:
    """A query tensor in ``q_dtype`` and the exact values it holds, as float64 NumPy."""
    c = batch.storage.config
    n = len(batch.seq_lens) if batch.query_start_loc is None else int(batch.query_start_loc[-1])
    q = backend.asarray(rng.standard_normal((n, num_q_heads, c.head_dim)).astype(np.float32),
                        batch.storage.device, q_dtype)
    return q, backend.to_numpy(q).astype(np.float64)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    if bad.any():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} values off (dtype {dtype}); "
                             f"worst at {i}: got {actual[i]}, expected {expected[i]}, max abs err {err.max():.3g}")


def verify_steps(model, caches, ids, drafts) -> list[tuple]:
    """Speculative verify steps by hand on each cache: the prompt and ``drafts`` at once, crop one, three
    positions again, crop two, two more. Returns each cache's logits of the three forwards (the caller compares);
    ``caches[0]``, if a ``DynamicCache``, must have past recording on to crop past a sliding window."""
    import torch

    logits = []
    with torch.no_grad():
        for cache in caches:
            first = model(input_ids=torch.cat([ids, drafts], 1), past_key_values=cache).logits
            cache.crop(-1)
            again = model(input_ids=torch.tensor([[9, 10, 11]]), past_key_values=cache).logits
            cache.crop(-2)
            last = model(input_ids=torch.tensor([[12, 13]]), past_key_values=cache).logits
            logits.append((first, again, last))
    return logits
