"""Tensor-parallel head shards: the shard arithmetic, the state digest, and two gloo ranks on loopback.

The two ranks are spawned once for the module (spawning costs seconds): they
run every scenario of ``tp_worker`` and pickle their results, which the tests
below compare with the same scenarios run here on all heads in one process.
"""

from __future__ import annotations

import pickle
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tp_worker  # noqa: E402
from torch_helpers import make_config  # noqa: E402

from pagedkv_core.config import AllocationRequest, CacheConfig  # noqa: E402
from pagedkv_core.errors import InvalidArgument, ShapeMismatch  # noqa: E402
from pagedkv_core.manager.facade import PagedKvCacheManager  # noqa: E402
from pagedkv_torch.attention import TorchAttention  # noqa: E402
from pagedkv_torch.tensor_parallel import HeadShard, TensorParallelAttention, state_digest  # noqa: E402

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 120


# -- the shard arithmetic ------------------------------------------------------------------------


def test_contiguous_head_split_keeps_gqa_groups_together():
    shards = [HeadShard(r, 2, 8, 4) for r in range(2)]
    assert [(s.local_q_heads, s.local_kv_heads) for s in shards] == [(4, 2), (4, 2)]
    assert [s.q_slice for s in shards] == [slice(0, 4), slice(4, 8)]
    assert [s.kv_slice for s in shards] == [slice(0, 2), slice(2, 4)]
    group = 8 // 4
    for s in shards:  # every local query head reads a KV head of the same rank
        assert {h // group for h in range(8)[s.q_slice]} == set(range(4)[s.kv_slice])
    q = torch.arange(3 * 8 * 2, dtype=torch.float32).view(3, 8, 2)
    k = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    assert torch.equal(shards[1].local_q(q), q[:, 4:]) and shards[1].local_q(q).is_contiguous()
    assert torch.equal(shards[0].local_kv(k), k[:, :2])


@pytest.mark.parametrize("args, words", [
    ((0, 3, 12, 4), "num_kv_heads=4 is not divisible by world_size=3"),
    ((0, 2, 6, 4), "num_q_heads=6 must be a multiple of num_kv_heads=4"),
    ((2, 2, 8, 4), "rank must be in [0, 2), got 2"),
    ((-1, 2, 8, 4), "rank must be in [0, 2)"),
    ((0, 0, 8, 4), "world_size must be a positive int"),
    ((0, 1, 8, 0), "num_kv_heads must be a positive int"),
], ids=["kv heads", "gqa groups", "rank too high", "negative rank", "no ranks", "no kv heads"])
def test_bad_shards_are_refused(args, words):
    with pytest.raises(InvalidArgument) as info:
        HeadShard(*args)
    assert words in str(info.value)


def test_local_config_divides_kv_heads_only():
    config = CacheConfig(num_layers=3, num_kv_heads=4, head_dim=16, num_blocks=40, block_size=4, num_host_blocks=8)
    local = HeadShard(1, 2, 8, 4).local_config(config)
    assert local.num_kv_heads == 2
    assert local == CacheConfig(num_layers=3, num_kv_heads=2, head_dim=16, num_blocks=40, block_size=4,
                                num_host_blocks=8)
    assert local.bytes_per_block * 2 == config.bytes_per_block
    with pytest.raises(InvalidArgument, match="shard was made for 8"):
        HeadShard(0, 2, 16, 8).local_config(config)


def test_slicing_needs_all_heads():
    shard = HeadShard(0, 2, 8, 4)
    with pytest.raises(ShapeMismatch, match=r"q must be \[tokens, 8, head_dim\]"):
        shard.local_q(torch.zeros(3, 4, 16))
    with pytest.raises(ShapeMismatch, match="k/v must be"):
        shard.local_kv(torch.zeros(3, 4))


def test_one_rank_is_plain_attention(backend):
    """A world of one needs no process group and returns exactly what the wrapped attention does."""
    rng = np.random.default_rng(5)
    config = make_config(kv_heads=2, head_dim=16, blocks=8, block_size=4)
    storage = backend.create_storage(config, "cpu")
    tables, lens = np.array([[3, 1, -1], [0, 5, 6]], np.int32), np.array([7, 10], np.int32)
    slots = np.concatenate([b * 4 + np.arange(4) for b in (3, 1, 0, 5, 6)])
    for layer in range(2):
        kv = [torch.from_numpy(rng.standard_normal((slots.size, 2, 16)).astype(np.float32)) for _ in range(2)]
        storage.write(layer, slots, *kv)
    q = torch.from_numpy(rng.standard_normal((2, 4, 16)).astype(np.float32))
    tp = TensorParallelAttention(TorchAttention("torch"), HeadShard(0, 1, 4, 2))
    want = TorchAttention("torch").decode(q, storage, 1, tables, lens, soft_cap=2.0)
    assert torch.equal(tp.decode(q, storage, 1, tables, lens, soft_cap=2.0), want)
    with pytest.raises(ShapeMismatch, match="this rank's 4 query heads"):
        tp.decode(q[:, :2], storage, 1, tables, lens)
    wrong = TensorParallelAttention(TorchAttention("torch"), HeadShard(0, 1, 8, 4))
    with pytest.raises(ShapeMismatch, match="build it with shard.local_config"):
        wrong.plan(storage, tables, lens)


# -- the state digest ------------------------------------------------------------------------------


def _driven_manager(backend, extra: int = 0) -> PagedKvCacheManager:
    m = PagedKvCacheManager(backend.create_storage(make_config(blocks=16, block_size=4, host_blocks=8), "cpu"),
                            clock=tp_worker.StepClock())
    m.allocate(AllocationRequest("a", token_ids=tuple(range(10))))
    m.allocate(AllocationRequest("b", token_ids=tuple(range(6))))
    m.fork("a", "a2")
    m.append_slots(["a2"], [1])
    m.swap_out("b")
    for _ in range(extra):
        m.append_slots(["a"], [2])
    return m


def test_digest_is_equal_for_identically_driven_managers(backend):
    assert state_digest(_driven_manager(backend)) == state_digest(_driven_manager(backend))


def test_digest_changes_with_every_kind_of_state(backend):
    m = _driven_manager(backend)
    seen = {state_digest(m)}
    for step in (lambda: m.append_slots(["a"], [2]), lambda: m.swap_in("b"), m.defragment,
                 lambda: m.deallocate("a2"), lambda: m.gc(all_prefixes=True)):
        step()
        seen.add(state_digest(m))
    assert len(seen) == 6
    assert state_digest(_driven_manager(backend, extra=1)) != state_digest(_driven_manager(backend))


def test_digest_sees_the_clock(backend):
    """Managers with the same tables but different clock readings diverge at their next LRU or TTL decision."""
    a, b = _driven_manager(backend), _driven_manager(backend)
    b.clock()  # one extra tick; the next access is stamped later
    a.append_slots(["a"], [2])
    b.append_slots(["a"], [2])
    assert state_digest(a) != state_digest(b)


# -- two ranks over gloo ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The results of both spawned ranks; a worker's exception fails the tests with its traceback."""
    out = tmp_path_factory.mktemp("tensor_parallel")
    context = torch.multiprocessing.spawn(tp_worker.worker, args=(WORLD_SIZE, _free_port(), str(out)),
                                          nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises ProcessRaisedException with the worker's traceback
            if time.monotonic() > deadline:
                pytest.fail(f"tensor-parallel workers still running after {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()
    results = []
    for rank in range(WORLD_SIZE):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    """The same scenarios on one process holding every head."""
    results, _ = tp_worker.run_scenarios(HeadShard(0, 1, tp_worker.NUM_Q_HEADS, tp_worker.CONFIG.num_kv_heads))
    return results


def _assert_outputs_equal(ranks, reference, prefix: str) -> None:
    keys = [k for k in reference if k.startswith(prefix + "/")]
    assert len(keys) >= 3
    for rank, results in enumerate(ranks):
        for key in keys:
            got, want = results[key], reference[key]
            assert got.shape == want.shape == want.shape[:1] + (tp_worker.NUM_Q_HEADS, tp_worker.CONFIG.head_dim)
            # each head's arithmetic is the same kernel on the same values whichever rank runs it: exact
            np.testing.assert_array_equal(got, want, err_msg=f"rank {rank}: {key}")


def test_decode_gathers_every_head(ranks, reference):
    _assert_outputs_equal(ranks, reference, "decode")


def test_chunked_prefill_gathers_every_head(ranks, reference):
    _assert_outputs_equal(ranks, reference, "prefill")


def test_copy_on_write_swap_and_defrag_stay_in_step(ranks, reference):
    """The replicated managers made the same block choices as one manager over all heads; the bytes follow."""
    assert reference["counts"] == {"cow": 1, "swap_out": 1, "swap_in": 1} and reference["defrag_moved"] > 0
    for rank, results in enumerate(ranks):
        assert results["counts"] == reference["counts"] and results["defrag_moved"] == reference["defrag_moved"]
        assert results["digest"] == results["agreed"] == reference["digest"]
        heads = HeadShard(rank, WORLD_SIZE, tp_worker.NUM_Q_HEADS, tp_worker.CONFIG.num_kv_heads).kv_slice
        for layer in range(tp_worker.CONFIG.num_layers):
            for pool in ("pool k", "pool v"):
                np.testing.assert_array_equal(results[f"{pool}/{layer}"], reference[f"{pool}/{layer}"][:, :, heads],
                                              err_msg=f"rank {rank}: {pool} of layer {layer}")
    _assert_outputs_equal(ranks, reference, "after swap")


def test_divergence_is_reported_on_every_rank(ranks):
    digests = [results["diverged"] for results in ranks]
    assert digests[0] is not None and digests[0] == digests[1]
    assert digests[0] == [results["own digest"] for results in ranks]
    assert digests[0][0] != digests[0][1]


def test_min_across_ranks(ranks):
    assert [results["min"] for results in ranks] == [[10, -1], [10, -1]]


def test_remote_hits_are_agreed_across_ranks(ranks):
    """Each rank shares its own head shard; rank 1's store lost a block, so both load two of three."""
    reference = tp_worker.remote_scenario(HeadShard(0, 1, tp_worker.NUM_Q_HEADS, tp_worker.CONFIG.num_kv_heads))
    assert reference["remote/cached"] == 12
    assert [r["remote/unagreed"] for r in ranks] == [12, 8]  # what each rank alone would have loaded
    assert [r["remote/cached"] for r in ranks] == [8, 8]
    assert ranks[0]["remote/digest"] == ranks[1]["remote/digest"] == reference["remote/digest"]
    for layer in range(tp_worker.CONFIG.num_layers):
        for r in ranks:
            np.testing.assert_array_equal(r[f"remote/decode/{layer}"], reference[f"remote/decode/{layer}"])
