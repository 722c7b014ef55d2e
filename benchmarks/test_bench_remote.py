"""The remote tier on a loopback redis-server: block sizes, put/get throughput, probe latency, load vs recompute.

Run: ``OPENBLAS_NUM_THREADS=1 python -m pytest benchmarks/test_bench_remote.py -m benchmark --benchmark-only -s``
(needs ``redis-server``; figures and method in docs/scale-out.md).
"""

import statistics
import time

import numpy as np
import pytest
from redis_server import RedisServer

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager
from pagedkv_core.app.demo.engine import PagedRunner
from pagedkv_core.app.demo.model import ModelConfig, TinyDecoder
from pagedkv_core.contract.storage import NumpyHostBlocks
from pagedkv_core.plugins import default_registry
from pagedkv_core.remote import BlockTier, LayoutFingerprint

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install 'pagedkv[redis]'")
from pagedkv_core.remote.redis_store import RedisStore  # noqa: E402

DEMO = ModelConfig()
LAYOUTS = {  # name: (layers, kv heads, head dim, dtype)
    "demo model (4 x 2 x 64, float32)": (DEMO.num_layers, DEMO.num_kv_heads, DEMO.head_dim, "float32"),
    "8B-class (32 x 8 x 128, float16)": (32, 8, 128, "float16"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    yield s
    s.stop()


def tier_for(server, layers, heads, head_dim, dtype, model_id="bench"):
    layout = LayoutFingerprint(model_id, dtype, layers, heads, head_dim, 16, "sha256", 0)
    return BlockTier(RedisStore(server.url, socket_timeout=30), layout)


def random_blocks(layout, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (layout.num_layers, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
    k = rng.standard_normal(shape, np.float32).astype(layout.dtype)
    return NumpyHostBlocks(k, -k, layout.dtype)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.benchmark
def test_put_get_throughput(benchmark, server):
    print("\nlayout | bytes/block | blocks/batch | put MB/s | get MB/s | put blocks/s | get blocks/s (median)")
    for name, dims in LAYOUTS.items():
        tier = tier_for(server, *dims)
        tag = tier.tagger.for_salt(None)
        for n in (1, 4, 16, 64):
            host = random_blocks(tier.layout, n)
            hashes = [b"%d-%d" % (n, i) for i in range(n)]
            repeats = 20 if n * host.nbytes / n < 1 << 20 else 5
            sent = tier.put(tag, hashes, host)
            put = statistics.median(timed(lambda: tier.put(tag, hashes, host), repeats))  # noqa: B023
            got = statistics.median(timed(lambda: tier.fetch(tag, hashes), repeats))  # noqa: B023
            assert tier.fetch(tag, hashes).num_blocks == n
            print(f"{name} | {sent // n:,} | {n} | {sent / put / 1e6:,.0f} | {sent / got / 1e6:,.0f} | "
                  f"{n / put:,.0f} | {n / got:,.0f}")
        tier.store.client.flushdb()
    tier = tier_for(server, *LAYOUTS["demo model (4 x 2 x 64, float32)"])
    host, hashes, tag = random_blocks(tier.layout, 64), [b"%d" % i for i in range(64)], tier.tagger.for_salt(None)
    tier.put(tag, hashes, host)
    benchmark.pedantic(tier.fetch, args=(tag, hashes), rounds=20, iterations=1)


@pytest.mark.benchmark
def test_probe_latency(benchmark, server):
    tier = tier_for(server, *LAYOUTS["demo model (4 x 2 x 64, float32)"])
    tag = tier.tagger.for_salt(None)
    hashes = [b"p%d" % i for i in range(256)]
    tier.put(tag, hashes, random_blocks(tier.layout, 256))
    keys = tier.keys(tag, hashes)
    print("\nblocks probed | p50 us | p99 us (one round trip: the Lua walk of EXISTS) | "
          "p50 us, pipelined EXISTS (the fallback)")
    for n in (1, 16, 64, 256):
        times = sorted(timed(lambda: tier.probe(tag, hashes[:n]), 500))  # noqa: B023
        piped = sorted(timed(lambda: tier.store.exists_many(keys[:n]), 200))  # noqa: B023
        assert tier.probe(tag, hashes[:n]) == n and all(tier.store.exists_many(keys[:n]))
        print(f"{n} | {1e6 * times[len(times) // 2]:,.0f} | {1e6 * times[int(len(times) * 0.99)]:,.0f} | "
              f"{1e6 * piped[len(piped) // 2]:,.0f}")
    benchmark.pedantic(tier.probe, args=(tag, hashes[:64]), rounds=200, iterations=1)
    tier.store.client.flushdb()


def _first_token(backend, model, tokens, store=None, repeats=5, model_id="demo"):
    """Median seconds from admission to the first generated token, and the tokens served by the tiers."""
    impl = default_registry().get(backend)
    cfg = CacheConfig(num_layers=DEMO.num_layers, num_kv_heads=DEMO.num_kv_heads, head_dim=DEMO.head_dim,
                      num_blocks=len(tokens) // 16 + 8, block_size=16, dtype="float32")
    times, cached = [], 0
    for _ in range(repeats):
        m = PagedKvCacheManager(impl.create_storage(cfg, "cpu"))
        if store is not None:
            m.attach_remote(BlockTier(store, LayoutFingerprint.for_manager(m, model_id)))
        runner = PagedRunner(model, impl, m.storage, "cpu")
        start = time.perf_counter()
        cached = m.allocate(AllocationRequest("r", token_ids=tuple(tokens))).num_cached_tokens
        meta = m.batch_metadata(["r"], [len(tokens) - cached])
        runner.step(meta, np.asarray(tokens[cached:]), np.arange(cached, len(tokens)), prefill=True)
        times.append(time.perf_counter() - start)
        if m.remote is not None:
            m.remote.commit()
            m.remote.close()
    return statistics.median(times), cached


@pytest.mark.benchmark
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_load_versus_recompute(benchmark, server, backend):
    if not default_registry().available_backends()[backend].available:
        pytest.skip(f"{backend} is not available")
    model = TinyDecoder.create(DEMO, 0)
    store = RedisStore(server.url, socket_timeout=30)
    rng = np.random.default_rng(1)
    print(f"\n{backend}: prefix tokens | recompute ms | recompute, tier missed ms | load from Redis ms | "
          "tokens loaded | load / recompute")
    ratios = {}
    for length in (16, 32, 64, 128, 256, 512, 1024, 2048):
        tokens = [int(t) for t in rng.integers(0, DEMO.vocab_size, length + 1)]
        recompute, _ = _first_token(backend, model, tokens)
        missed = min(_first_token(backend, model, tokens, store, 1, model_id=f"cold-{i}")[0] for i in range(5))
        _first_token(backend, model, tokens, store, repeats=1)  # publish the prefix
        load, cached = _first_token(backend, model, tokens, store)
        assert cached == length // 16 * 16
        ratios[length] = load / recompute
        print(f"{length} | {1e3 * recompute:.2f} | {1e3 * missed:.2f} | {1e3 * load:.2f} | {cached} | "
              f"{load / recompute:.2f}")
    even = next((n for n, r in ratios.items() if r < 1), None)
    print(f"{backend}: break-even prefix length: {even} tokens (the shortest measured prefix loaded faster)")
    tokens = [int(t) for t in rng.integers(0, DEMO.vocab_size, 1025)]
    _first_token(backend, model, tokens, store, repeats=1)
    benchmark.pedantic(_first_token, args=(backend, model, tokens, store, 1), rounds=5, iterations=1)
    store.client.flushdb()
