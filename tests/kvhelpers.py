"""Helpers shared by the core tests: configs, requests, state snapshots, K/V writes."""

from __future__ import annotations

import numpy as np

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager, PrefixCacheConfig


def make_config(**overrides) -> CacheConfig:
    values = dict(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=16, block_size=4, num_host_blocks=8)
    values.update(overrides)
    return CacheConfig(**values)


def request(rid: str, tokens=None, n: int | None = None, **kw) -> AllocationRequest:
    if tokens is not None:
        return AllocationRequest(rid, token_ids=tuple(tokens), **kw)
    return AllocationRequest(rid, initial_tokens=n, **kw)


def snapshot(m: PagedKvCacheManager) -> tuple:
    """Everything an operation could change, for 'a failed call changes nothing' checks."""
    seqs = tuple(sorted(
        (r, tuple(s.blocks), s.num_tokens, s.state.value, tuple(s.hashes), s.host_blocks,
         None if s.token_ids is None else tuple(s.token_ids))
        for r, s in ((s.request_id, s) for s in m.sequences)
    ))
    storage = m.storage
    return (
        tuple(m.pool.ref), tuple(m.pool.free_queue()), tuple(sorted(m.pool.cached.values())),
        m.tables.tables.tobytes(), m.tables.lens.tobytes(), seqs, m.host_used,
        storage.k.tobytes(), storage.v.tobytes(),
    )


def fill(m: PagedKvCacheManager, request_ids, query_lens, seed: int = 0) -> None:
    """Write random K/V for the newest tokens of the given sequences in every layer."""
    rng = np.random.default_rng(seed)
    meta = m.batch_metadata(request_ids, query_lens)
    c = m.config
    for layer in range(c.num_layers):
        k = rng.standard_normal((meta.num_new_tokens, c.num_kv_heads, c.head_dim)).astype(np.float32)
        m.storage.write(layer, meta.slot_mapping, k, -k)


def kv_of(m: PagedKvCacheManager, rid: str) -> list[np.ndarray]:
    table = m.get_handle(rid).block_table
    out = []
    for layer in range(m.config.num_layers):
        out += list(m.storage.gather(layer, np.asarray(table.block_ids), table.num_tokens))
    return out


PREFIX = PrefixCacheConfig()
