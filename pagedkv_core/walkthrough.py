"""A short scripted tour of the manager on a real backend: allocate, prefix hit, fork, swap, defragment.

Every step checks what it claims (bit-exact data after swap and
defragmentation, the parent's data intact after copy-on-write) and the
pool's invariants, so the tour doubles as a smoke test of a backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import AllocationRequest, CacheConfig
from .manager import PagedKvCacheManager
from .plugins import get_backend

__all__ = ["run_walkthrough"]


def _write_tokens(manager: PagedKvCacheManager, backend, request_ids: list[str], query_lens: list[int],
                  rng: np.random.Generator) -> None:
    """Write random K/V for the newest tokens of each sequence, in every layer."""
    c = manager.config
    meta = manager.batch_metadata(request_ids, query_lens)
    dtype = c.dtype if not c.quantized else "float32"
    for layer in range(c.num_layers):
        k = rng.standard_normal((meta.num_new_tokens, c.num_kv_heads, c.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        manager.storage.write(layer, meta.slot_mapping, backend.asarray(k, manager.device, dtype),
                              backend.asarray(v, manager.device, dtype))


def _kv_of(manager: PagedKvCacheManager, backend, request_id: str) -> list[np.ndarray]:
    table = manager.get_handle(request_id).block_table
    out = []
    for layer in range(manager.config.num_layers):
        k, v = manager.storage.gather(layer, np.asarray(table.block_ids, np.int32), table.num_tokens)
        out += [backend.to_numpy(k), backend.to_numpy(v)]
    return out


def run_walkthrough(backend_name: str = "numpy", device: str = "cpu", say: Callable[[str], None] = print) -> None:
    rng = np.random.default_rng(0)
    backend = get_backend(backend_name)
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=16,
                         dtype="float32", num_host_blocks=32)
    manager = PagedKvCacheManager(backend.create_storage(config, device))
    levels = []
    manager.set_pressure_callback(lambda new, old: levels.append(new.name))
    say(f"pagedkv walkthrough on {backend_name}:{device}: {config.num_blocks} blocks x {config.block_size} tokens,"
        f" {config.num_layers} layers, {config.num_kv_heads} KV heads, head dim {config.head_dim}")

    system = tuple(int(t) for t in rng.integers(0, 512, 64))
    first = manager.allocate(AllocationRequest("alice", token_ids=system + (1, 2, 3)))
    _write_tokens(manager, backend, ["alice"], [first.num_tokens], rng)
    say(f"1. allocate 'alice' (67-token prompt): blocks {list(first.block_table.block_ids)}")

    second = manager.allocate(AllocationRequest("bob", token_ids=system + (7, 8, 9, 10)))
    _write_tokens(manager, backend, ["bob"], [second.num_tokens - second.num_cached_tokens], rng)
    say(f"2. allocate 'bob' with the same 64-token system prompt: {second.num_cached_tokens} tokens served "
        f"from the prefix cache, blocks {list(second.block_table.block_ids)}")

    before = _kv_of(manager, backend, "alice")
    child = first.clone_handle("alice-beam")
    manager.append_slots(["alice-beam"], [42])
    _write_tokens(manager, backend, ["alice-beam"], [1], rng)
    intact = all(np.array_equal(a, b) for a, b in zip(before, _kv_of(manager, backend, "alice")))
    say(f"3. fork 'alice' -> 'alice-beam' and write one token: the shared last block was copied "
        f"(copy-on-write: {manager.stats().cow_copies}); alice's K/V unchanged: {intact}")

    snapshot = _kv_of(manager, backend, "bob")
    manager.swap_out("bob")
    say(f"4. swap 'bob' out to the host tier: {manager.stats().host_blocks_used} host blocks, "
        f"{manager.stats().free_blocks} device blocks free")
    manager.deallocate("alice")
    manager.swap_in("bob")
    exact = all(np.array_equal(a, b) for a, b in zip(snapshot, _kv_of(manager, backend, "bob")))
    say(f"5. free 'alice', swap 'bob' back in: blocks {list(manager.get_handle('bob').block_table.block_ids)}, "
        f"K/V bit-exact: {exact}")

    frag = manager.fragmentation_stats()
    snapshot = _kv_of(manager, backend, "bob")
    result = manager.defragment()
    exact_after = all(np.array_equal(a, b) for a, b in zip(snapshot, _kv_of(manager, backend, "bob")))
    say(f"6. defragment: {frag.holes} holes before, moved {result.moved_blocks} blocks, "
        f"{result.holes_after} holes after; K/V bit-exact: {exact_after}")

    manager.check_invariants()
    stats = manager.stats()
    say(f"7. stats: {stats.used_blocks}/{stats.total_blocks} blocks used, prefix hit rate "
        f"{stats.cache_hit_rate:.0%}, {stats.swap_out_count} swap-out, {stats.swap_in_count} swap-in, "
        f"pressure {stats.pressure.name}; invariants hold")
    for rid in manager.request_ids():
        manager.deallocate(rid)
    manager.check_invariants()
    if not (intact and exact and exact_after) or child.is_valid():
        raise SystemExit("walkthrough self-check failed")
    say("all blocks returned; walkthrough checks passed")
