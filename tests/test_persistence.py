"""Save and load: round trips on every backend, prompt caches, cross-backend moves, damaged files, fuzzing."""

import json
import random
import struct

import numpy as np
import pytest

from kvhelpers import request
from pagedkv_core import (
    AllocationRequest,
    CacheConfig,
    CorruptCacheFile,
    IncompatibleCache,
    OutOfBlocks,
    PagedKvCacheManager,
    PrefixCacheConfig,
)
from pagedkv_core.events import BlockStored
from pagedkv_core.manager.persistence import _checksum
from pagedkv_core.manager.safetensors_io import read_safetensors, write_safetensors
from pagedkv_core.plugins import default_registry

BACKENDS = [name for name, status in default_registry().available_backends().items()
            if status.available and dict(status.devices).get("cpu") and dict(status.devices)["cpu"].available]


def build(backend: str = "numpy", dtype: str = "float32", **overrides) -> PagedKvCacheManager:
    values = dict(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=24, block_size=4, dtype=dtype,
                  num_host_blocks=8)
    values.update(overrides)
    impl = default_registry().get(backend)
    return PagedKvCacheManager(impl.create_storage(CacheConfig(**values), "cpu"))


def populate(m: PagedKvCacheManager, backend: str = "numpy", seed: int = 0) -> None:
    """Two sequences sharing a prompt prefix, a fork, a partly filled block; K/V written in every layer."""
    impl = default_registry().get(backend)
    rng = np.random.default_rng(seed)
    m.allocate(AllocationRequest("a", token_ids=tuple(range(10))))
    m.allocate(AllocationRequest("b", token_ids=tuple(range(8)) + (50, 51, 52)))
    m.fork("a", "a-beam")
    kind = "float32" if m.config.quantized else m.config.dtype
    for rid, new in (("a", 10), ("b", 3)):
        meta = m.batch_metadata([rid], [new])
        for layer in range(m.config.num_layers):
            k = rng.standard_normal((new, 2, 8)).astype(np.float32)
            m.storage.write(layer, meta.slot_mapping, impl.asarray(k, "cpu", kind), impl.asarray(-k, "cpu", kind))


def contents(m: PagedKvCacheManager, backend: str = "numpy") -> dict:
    impl = default_registry().get(backend)
    out = {}
    for rid in sorted(m.request_ids()):
        table = m.get_handle(rid).block_table
        out[rid] = [np.asarray(impl.to_numpy(x)) for layer in range(m.config.num_layers)
                    for x in m.storage.gather(layer, np.asarray(table.block_ids, np.int32), table.num_tokens)]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        for x, y in zip(a[rid], b[rid]):
            np.testing.assert_array_equal(x, y, err_msg=rid)


@pytest.fixture
def saved(tmp_path):
    m = build()
    populate(m)
    path = tmp_path / "cache.safetensors"
    assert m.save(path) == 4  # a: 3 blocks (2 shared with b), b: its own last block, a-beam shares a's
    return m, path


def test_round_trip_keeps_data_sharing_and_prefix_hashes(saved):
    m, path = saved
    loaded = PagedKvCacheManager.load(path)
    loaded.check_invariants()
    assert_same(contents(m), contents(loaded))
    assert loaded.stats().used_blocks == 4 and loaded.stats().cached_blocks == m.stats().cached_blocks
    assert loaded.get_handle("a-beam").block_table.block_ids == loaded.get_handle("a").block_table.block_ids
    assert loaded.allocate(request("c", tokens=range(9))).num_cached_tokens == 8
    loaded.append_slots(["a", "a-beam"], [1, 2])  # the shared partial block is copied on write
    assert loaded.stats().cow_copies == 1


def test_attention_after_load_is_identical(saved):
    m, path = saved
    loaded = PagedKvCacheManager.load(path)
    impl = default_registry().get("numpy")
    q = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
    outs = []
    for manager in (m, loaded):
        meta = manager.batch_metadata(["a", "a-beam", "b"])
        outs.append(impl.attention.decode(q, manager.storage, 1, meta.block_tables, meta.seq_lens))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_round_trip_on_every_backend(tmp_path, backend, dtype):
    caps = default_registry().get(backend).capabilities("cpu")
    if not caps.supports_dtype(dtype):
        pytest.skip(f"{backend} has no {dtype} storage")
    m = build(backend, dtype)
    populate(m, backend)
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors", backend=backend)
    assert_same(contents(m, backend), contents(loaded, backend))
    loaded.check_invariants()
    impl = default_registry().get(backend)
    q = impl.asarray(np.random.default_rng(2).standard_normal((3, 4, 8)).astype(np.float32), "cpu",
                     "float32" if m.config.quantized else dtype)
    outs = []
    for manager in (m, loaded):
        meta = manager.batch_metadata(["a", "a-beam", "b"])
        outs.append(impl.to_numpy(impl.attention.decode(q, manager.storage, 1, meta.block_tables, meta.seq_lens)))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("source", BACKENDS)
@pytest.mark.parametrize("target", BACKENDS)
def test_cross_backend_moves_are_bit_exact(tmp_path, source, target, dtype):
    for name in (source, target):
        if not default_registry().get(name).capabilities("cpu").supports_dtype(dtype):
            pytest.skip(f"{name} has no {dtype} storage")
    m = build(source, dtype)
    populate(m, source)
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors", backend=target)
    assert_same(contents(m, source), contents(loaded, target))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_swapped_and_compressed_sequences_round_trip_on_every_backend(tmp_path, backend, dtype):
    if not default_registry().get(backend).capabilities("cpu").supports_dtype(dtype):
        pytest.skip(f"{backend} has no {dtype} storage")
    m = build(backend, dtype)
    populate(m, backend)
    want = contents(m, backend)
    m.swap_out("b")
    swapped = ["b"]
    if not m.config.quantized:
        m.compress_cache("a-beam")
        swapped.append("a-beam")
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors", backend=backend)
    loaded.check_invariants()
    assert loaded.stats().swapped_caches == len(swapped) and loaded.stats().host_blocks_used == m.stats().host_blocks_used
    for manager in (m, loaded):
        for rid in swapped:
            manager.swap_in(rid)
    got = contents(loaded, backend)
    assert_same(contents(m, backend), got)
    assert_same({"b": want["b"]}, {"b": got["b"]})  # an exact swap loses nothing


def test_partial_save_is_a_prompt_cache_for_a_running_manager(tmp_path):
    m = build()
    populate(m)
    m.save(tmp_path / "prompt.safetensors", sequences=["a"])
    other = build()
    other.allocate(request("busy", n=12))
    events = []
    other.subscribe(events.append)
    assert other.load_prompt_cache(tmp_path / "prompt.safetensors") == 2  # the two full blocks of "a"
    assert [type(e) for e in events] == [BlockStored, BlockStored]
    assert other.stats().used_blocks == 3  # the prompt blocks are free but findable
    handle = other.allocate(request("new", tokens=range(9)))
    assert handle.num_cached_tokens == 8
    got = contents(other)["new"]
    want = contents(m)["a"]
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x[:8], y[:8])
    assert other.load_prompt_cache(tmp_path / "prompt.safetensors") == 0  # already cached
    other.check_invariants()


def test_prompt_cache_refusals_change_nothing(tmp_path):
    m = build()
    populate(m)
    path = tmp_path / "p.safetensors"
    m.save(path, sequences=["a"])
    with pytest.raises(IncompatibleCache):
        build(block_size=8).load_prompt_cache(path)
    with pytest.raises(IncompatibleCache):
        build(prefix_cache=PrefixCacheConfig(hash_seed=7)).load_prompt_cache(path)
    with pytest.raises(IncompatibleCache):
        build(prefix_cache=None).load_prompt_cache(path)
    full = build()
    full.allocate(request("all", n=24 * 4 - 1))
    before = full.stats()
    with pytest.raises(OutOfBlocks):
        full.load_prompt_cache(path)
    assert full.stats() == before


def test_the_file_is_plain_safetensors(saved):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, path = saved
    tensors = safetensors_numpy.load_file(str(path))
    assert tensors["k"].shape == (2, 4, 4, 2, 8)


def rewrite(path, edit) -> None:
    """Change the record with ``edit`` and re-sign it, so only the semantic check can object."""
    tensors, metadata = read_safetensors(path)
    record = json.loads(metadata["pagedkv"])
    edit(record, tensors)
    record_json = json.dumps(record, sort_keys=True, separators=(",", ":"))
    write_safetensors(path, tensors, {"pagedkv": record_json, "pagedkv_checksum": _checksum(record_json, tensors)})


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "outside the data"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**9) + p.read_bytes()[8:]), "runs past"),
    (lambda p: p.write_bytes(p.read_bytes()[:20] + b"\x00" + p.read_bytes()[21:]), None),
    (lambda p: rewrite(p, lambda r, t: r.update(format_version=3)), "format version 3"),
    (lambda p: rewrite(p, lambda r, t: r["config"].update(head_dim=16)), "shape"),
    (lambda p: rewrite(p, lambda r, t: r["sequences"][0].update(blocks=[0, 1, 9])), "block ids"),
    (lambda p: rewrite(p, lambda r, t: r["sequences"][0]["token_ids"].__setitem__(2, 99)), "hash chain"),
    (lambda p: rewrite(p, lambda r, t: r["config"].update(dtype="int4")), "dtype"),
], ids=["truncated", "no-header", "header-length", "flipped-header-byte", "wrong-version", "shape-vs-config",
        "block-out-of-range", "tokens-vs-hashes", "unknown-dtype"])
def test_damaged_files_are_refused(saved, damage, message):
    _, path = saved
    damage(path)
    with pytest.raises(CorruptCacheFile, match=message):
        PagedKvCacheManager.load(path)


def test_a_thousand_mutations_never_load_wrong_data(saved, tmp_path):
    m, path = saved
    original = path.read_bytes()
    want = contents(m)
    rng = random.Random(0)
    clean_errors = identical = 0
    for i in range(1000):
        data = bytearray(original)
        kind = rng.random()
        if kind < 0.6:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind < 0.8:
            del data[rng.randrange(len(data)):]
        else:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        mutated = tmp_path / f"m{i % 4}.safetensors"
        mutated.write_bytes(bytes(data))
        try:
            loaded = PagedKvCacheManager.load(mutated)
        except CorruptCacheFile:
            clean_errors += 1
            continue
        assert_same(want, contents(loaded))
        identical += 1
    assert clean_errors + identical == 1000 and clean_errors > 900


def test_a_failing_copy_into_the_device_takes_no_blocks(tmp_path, monkeypatch):
    m = build()
    populate(m)
    m.save(tmp_path / "p.safetensors", sequences=["a"])
    other = build()

    def broken(host, block_ids):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(other.storage, "swap_in", broken)
    before = other.stats()
    with pytest.raises(RuntimeError):
        other.load_prompt_cache(tmp_path / "p.safetensors")
    assert other.stats() == before
    other.check_invariants()
