"""The tensor-parallel scenarios, run by each spawned rank and once on all heads as the reference.

Every rank and the reference draw the same full-head tensors from one seed,
in the same order, and keep their own heads (``HeadShard.local_q`` /
``local_kv``); the reference is a shard of a world of one, so the code path
is the same and only the heads differ. A module of its own (not the test
module) because spawned processes import the worker function by name.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pagedkv_core.config import AllocationRequest, CacheConfig
from pagedkv_core.errors import RanksDiverged
from pagedkv_core.manager.facade import PagedKvCacheManager
from pagedkv_torch.attention import TorchAttention
from pagedkv_torch.storage import TorchStorage
from pagedkv_torch.tensor_parallel import (
    HeadShard,
    TensorParallelAttention,
    assert_ranks_agree,
    min_across_ranks,
    state_digest,
)

NUM_Q_HEADS = 8
CONFIG = CacheConfig(num_layers=3, num_kv_heads=4, head_dim=16, num_blocks=40, block_size=4, num_host_blocks=16)
FEATURES = {
    "plain": {},
    "window": {"sliding_window": 5},
    "soft cap": {"soft_cap": 2.0},
    "window and cap": {"sliding_window": 3, "soft_cap": 1.5, "scale": 0.3},
}
PROMPTS = {"a": 9, "b": 3, "c": 14}  # ragged, with partly filled last blocks
CHUNKS = {"a": 4, "b": 1, "c": 6}  # the second prefill chunk, over the cached first one
TIMEOUT_S = 60


class StepClock:
    """A deterministic clock: every reading is one tick later. Identical call sequences read identical times."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        self.now += 1
        return float(self.now)


def tokens(rid: str, start: int, count: int) -> tuple[int, ...]:
    base = 1000 * (ord(rid[0]) - ord("a") + 1)
    return tuple(range(base + start, base + start + count))


class Replica:
    """One rank's manager, shard storage and attention (or the reference's, with every head)."""

    def __init__(self, shard: HeadShard, group=None) -> None:
        self.shard = shard
        self.storage = TorchStorage(shard.local_config(CONFIG))
        self.manager = PagedKvCacheManager(self.storage, clock=StepClock())
        self.attention = TensorParallelAttention(TorchAttention("torch"), shard, group)
        self.rng = np.random.default_rng(2024)  # the same draws on every rank

    def full(self, n: int, heads: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.standard_normal((n, heads, CONFIG.head_dim)).astype(np.float32))

    def write(self, slot_mapping: np.ndarray) -> None:
        """Write fresh K/V for these slots in every layer: the full heads are drawn, this rank's kept."""
        for layer in range(CONFIG.num_layers):
            k, v = self.full(slot_mapping.size, CONFIG.num_kv_heads), self.full(slot_mapping.size, CONFIG.num_kv_heads)
            self.storage.write(layer, slot_mapping, self.shard.local_kv(k), self.shard.local_kv(v))

    def query(self, n: int) -> torch.Tensor:
        return self.shard.local_q(self.full(n, NUM_Q_HEADS))

    def decode_all(self, results: dict, prefix: str, ids: list[str]) -> None:
        """Decode outputs of every layer and feature; one plan per feature serves all layers."""
        meta = self.manager.batch_metadata(ids)
        for name, kw in FEATURES.items():
            plan = self.attention.plan(self.storage, meta.block_tables, meta.seq_lens, **kw)
            for layer in range(CONFIG.num_layers):
                results[f"{prefix}/{name}/{layer}"] = plan.run(self.query(len(ids)), layer).numpy()
        q = self.query(len(ids))  # the one-call form too
        results[f"{prefix}/decode()/0"] = self.attention.decode(q, self.storage, 0, meta.block_tables,
                                                                meta.seq_lens).numpy()


def run_scenarios(shard: HeadShard, group=None, check=None) -> tuple[dict, Replica]:
    """Prefill, decode, then fork (copy-on-write), swap and defragment; outputs and pools by name.

    ``check(manager)`` runs where the ranks must agree (``assert_ranks_agree`` on the ranks).
    """
    r = Replica(shard, group)
    m, results = r.manager, {}
    ids = list(PROMPTS)
    for rid, n in PROMPTS.items():
        m.allocate(AllocationRequest(rid, token_ids=tokens(rid, 0, n)))
    r.write(m.batch_metadata(ids, list(PROMPTS.values())).slot_mapping)

    # prefill: a second, ragged chunk over the cached first one
    for rid, n in CHUNKS.items():
        m.extend(rid, n, tokens(rid, PROMPTS[rid], n))
    meta = m.batch_metadata(ids, list(CHUNKS.values()))
    r.write(meta.slot_mapping)
    for name in ("plain", "window", "soft cap"):
        for layer in range(CONFIG.num_layers):
            q = r.query(meta.num_new_tokens)
            results[f"prefill/{name}/{layer}"] = r.attention.prefill(
                q, r.storage, layer, meta.block_tables, meta.seq_lens, meta.query_start_loc, **FEATURES[name]).numpy()

    # decode: one token each
    r.write(m.append_slots(ids, [7, 7, 7]).slot_mapping)
    r.decode_all(results, "decode", ids)

    # fork a sequence whose last block is partly filled; its first token copies that block
    m.fork("a", "a2")
    r.write(m.append_slots(["a2", "c"], [8, 8]).slot_mapping)
    m.swap_out("b")
    m.allocate(AllocationRequest("d", token_ids=tokens("d", 0, 7)))
    r.write(m.batch_metadata(["d"], [7]).slot_mapping)
    m.swap_in("b")
    m.deallocate("c")
    results["defrag_moved"] = m.defragment().moved_blocks
    if check is not None:
        check(m)
    ids = ["a", "a2", "b", "d"]
    r.write(m.append_slots(ids, [9, 9, 9, 9]).slot_mapping)
    r.decode_all(results, "after swap", ids)
    stats = m.stats()
    results["counts"] = {"cow": stats.cow_copies, "swap_out": stats.swap_out_count, "swap_in": stats.swap_in_count}
    for layer in range(CONFIG.num_layers):
        results[f"pool k/{layer}"], results[f"pool v/{layer}"] = r.storage.to_numpy(layer)
    m.check_invariants()
    results["digest"] = state_digest(m)
    return results, r


REMOTE_PROMPT = tuple(range(500, 513))  # 13 tokens: 3 full blocks the remote tier may serve


def _kv_at(position: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-head K and V of one position: a pure function of it, so loaded and computed blocks agree."""
    rng = np.random.default_rng([position, layer])
    k, v = rng.standard_normal((2, 1, CONFIG.num_kv_heads, CONFIG.head_dim)).astype(np.float32)
    return torch.from_numpy(k), torch.from_numpy(v)


def _serve_remote(shard: HeadShard, store, group, agree) -> tuple[int, PagedKvCacheManager, TensorParallelAttention]:
    from pagedkv_core.remote import BlockTier, LayoutFingerprint

    storage = TorchStorage(shard.local_config(CONFIG))
    m = PagedKvCacheManager(storage, clock=StepClock())
    layout = LayoutFingerprint.for_manager(m, "tp-model", head_shard=(shard.rank, shard.world_size))
    m.attach_remote(BlockTier(store, layout), agree=agree)
    cached = m.allocate(AllocationRequest("r", token_ids=REMOTE_PROMPT)).num_cached_tokens
    meta = m.batch_metadata(["r"], [len(REMOTE_PROMPT) - cached])
    for layer in range(CONFIG.num_layers):
        for slot, position in zip(meta.slot_mapping, range(cached, len(REMOTE_PROMPT))):
            k, v = _kv_at(position, layer)
            storage.write(layer, np.array([slot]), shard.local_kv(k), shard.local_kv(v))
    m.remote.commit()
    assert m.remote.flush(10)
    return cached, m, TensorParallelAttention(TorchAttention("torch"), shard, group)


def remote_scenario(shard: HeadShard, group=None, agree=None) -> dict:
    """Each rank shares its own head shard through its own store; rank 1's store then loses one block.

    With ``agree`` (the minimum over ranks) every rank loads the same number
    of blocks, so the managers stay equal and the gathered output is exact.
    """
    from pagedkv_core.remote import MemoryStore

    store = MemoryStore()
    _, publisher, _ = _serve_remote(shard, store, group, None)
    tier = publisher.remote.tier
    lost = tier.keys(tier.tagger.for_salt(None), publisher.hasher.chain(REMOTE_PROMPT, publisher.hasher.root(None)))[2]

    def lose_a_block() -> None:  # each run writes back what it computed: lose the block again before the next
        if shard.rank == 1:
            store.delete_matching(lost)

    lose_a_block()
    unagreed, _, _ = _serve_remote(shard, store, group, None)
    lose_a_block()
    cached, m, attention = _serve_remote(shard, store, group, agree)
    meta = m.batch_metadata(["r"])
    q = shard.local_q(torch.from_numpy(np.random.default_rng(5).standard_normal(
        (1, NUM_Q_HEADS, CONFIG.head_dim)).astype(np.float32)))
    return {"remote/cached": cached, "remote/unagreed": unagreed, "remote/digest": state_digest(m),
            **{f"remote/decode/{layer}": attention.decode(q, m.storage, layer, meta.block_tables,
                                                          meta.seq_lens).numpy()
               for layer in range(CONFIG.num_layers)}}


def _use_loopback() -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    if sys.platform.startswith("linux"):  # gloo otherwise picks the interface its hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    elif sys.platform == "darwin":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0")


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Entry point of a spawned rank: run every scenario and pickle the results to ``out_dir/rank{rank}.pkl``."""
    torch.set_num_threads(1)
    _use_loopback()
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        shard = HeadShard.from_group(None, NUM_Q_HEADS, CONFIG.num_kv_heads)
        results, replica = run_scenarios(shard, check=assert_ranks_agree)
        results["agreed"] = assert_ranks_agree(replica.manager)
        results.update(remote_scenario(shard, agree=min_across_ranks()))
        reduce_min = min_across_ranks()
        results["min"] = [reduce_min(10 + 5 * rank), reduce_min(-rank)]
        if rank == 1:  # one extra admission that rank 0 never sees
            replica.manager.allocate(AllocationRequest("stray", initial_tokens=3))
        try:
            assert_ranks_agree(replica.manager)
            results["diverged"] = None
        except RanksDiverged as exc:
            results["diverged"] = exc.digests
        results["own digest"] = state_digest(replica.manager)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()
