"""Decode bandwidth of the cupy backend's paged kernel on a CUDA device.

Batch 32 x 4,096 cached tokens, fp16, 32 query / 8 KV heads, head dim 128,
block size 16, blocks scattered at random through the pool. The kernel must
read every K and V byte once, so its achieved bandwidth is (K + V bytes) /
time, reported as a fraction of the device's measured copy bandwidth (bytes
read + written by a device-to-device copy). Side by side: torch's
``scaled_dot_product_attention`` on the same K/V laid out contiguously, and
the torch backend's paged kernel, each where available. Goal on an H100:
>= 70 % of copy bandwidth.

Run: ``pytest backends/cupy/benchmarks/test_bench_cupy.py --benchmark-enable -s``;
skips with the backend probe's reason without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.benchmark

BATCH, SEQ_LEN, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4096, 32, 8, 128, 16
DEVICE = "cuda:0"


def cupy_backend_or_skip() -> Any:
    try:
        from pagedkv_cupy.backend import CupyBackend

        backend = CupyBackend()
    except ImportError as exc:
        pytest.skip(f"cupy backend cannot load: {exc}")
    probe = backend.probe(DEVICE)
    if not probe.available:
        pytest.skip(f"no CUDA device: {probe.reason}")
    return backend


def seconds_per_call(fn: Callable[[], Any], iterations: int = 50, warmup: int = 5) -> float:
    """Mean device time of ``fn`` between CUDA events (launch overhead included, as a model sees it)."""
    import cupy

    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / iterations


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    import cupy

    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    return 2 * nbytes / seconds_per_call(lambda: cupy.copyto(dst, src), iterations=20)


def contiguous_reference(q: Any, k: Any, v: Any) -> Any:
    """Attention on contiguous ``k, v [batch, seq, kv_heads, dim]`` in float32 (cupy), the check of the paged kernel."""
    import cupy

    group = Q_HEADS // KV_HEADS
    qf = q.astype(cupy.float32).reshape(BATCH, KV_HEADS, group, HEAD_DIM)
    scores = cupy.einsum("bkgd,bskd->bkgs", qf, k.astype(cupy.float32)) / np.sqrt(HEAD_DIM)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = cupy.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = cupy.einsum("bkgs,bskd->bkgd", weights, v.astype(cupy.float32))
    return out.reshape(BATCH, Q_HEADS, HEAD_DIM)


def torch_sdpa(q: Any, k: Any, v: Any) -> tuple[float, Any] | str:
    """Seconds per call of torch SDPA on contiguous K/V ``[batch, kv_heads, seq, dim]``, or why it cannot run."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return f"torch unavailable: {exc}"
    if not torch.cuda.is_available():
        return "torch has no CUDA"
    tq = torch.from_dlpack(q).unsqueeze(2)                      # [B, Hq, 1, D]
    tk = torch.from_dlpack(k).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, S, D]
    tv = torch.from_dlpack(v).permute(0, 2, 1, 3).contiguous()
    try:
        run = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)  # noqa: E731
        out = run()
    except (TypeError, RuntimeError) as exc:
        return f"SDPA failed: {exc}"
    torch.cuda.synchronize()
    return seconds_per_call(run), out.squeeze(2)


def torch_paged(k: Any, v: Any, tables: np.ndarray, lens: np.ndarray, q: Any) -> float | str:
    """Seconds per call of the torch backend's paged decode on the same data, or why it cannot run."""
    try:
        import torch

        from pagedkv_core.plugins import get_backend

        backend = get_backend("torch")
        if not backend.probe(DEVICE).available:
            return f"torch backend unavailable: {backend.probe(DEVICE).reason}"
        from pagedkv_core.config import CacheConfig

        config = CacheConfig(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=BATCH * SEQ_LEN // BLOCK,
                             block_size=BLOCK, dtype="float16")
        storage = backend.create_storage(config, DEVICE)
        pos = np.arange(SEQ_LEN)
        slots = (tables[:, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK).reshape(-1)
        storage.write(0, slots, torch.from_dlpack(k).reshape(-1, KV_HEADS, HEAD_DIM),
                      torch.from_dlpack(v).reshape(-1, KV_HEADS, HEAD_DIM))
        plan = backend.attention.plan(storage, tables, lens)
        tq = torch.from_dlpack(q)
        plan.run(tq, 0)
        torch.cuda.synchronize()
        return seconds_per_call(lambda: plan.run(tq, 0))
    except Exception as exc:  # a sibling backend's absence or failure is reported, not fatal
        return f"{type(exc).__name__}: {exc}"


def test_decode_bandwidth(benchmark):
    backend = cupy_backend_or_skip()
    import cupy

    from pagedkv_core.config import CacheConfig

    num_blocks = BATCH * SEQ_LEN // BLOCK
    config = CacheConfig(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=num_blocks,
                         block_size=BLOCK, dtype="float16")
    storage = backend.create_storage(config, DEVICE)
    rng = cupy.random.default_rng(0)
    storage.k[...] = rng.standard_normal(storage.k.shape, dtype=cupy.float32).astype(cupy.float16)
    storage.v[...] = rng.standard_normal(storage.v.shape, dtype=cupy.float32).astype(cupy.float16)
    tables = np.random.default_rng(0).permutation(num_blocks).reshape(BATCH, SEQ_LEN // BLOCK).astype(np.int32)
    lens = np.full(BATCH, SEQ_LEN, np.int32)
    q = rng.standard_normal((BATCH, Q_HEADS, HEAD_DIM), dtype=cupy.float32).astype(cupy.float16)

    plan = backend.attention.plan(storage, tables, lens)
    out = plan.run(q, 0)  # compiles on first use
    k_pool, v_pool = storage.pools(0)
    k = k_pool[cupy.asarray(tables)].reshape(BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM)
    v = v_pool[cupy.asarray(tables)].reshape(BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM)
    expected = contiguous_reference(q, k, v)
    np.testing.assert_allclose(cupy.asnumpy(out.astype(cupy.float32)), cupy.asnumpy(expected), atol=4e-3, rtol=4e-3)

    kv_bytes = 2 * BATCH * SEQ_LEN * KV_HEADS * HEAD_DIM * 2
    paged = seconds_per_call(lambda: plan.run(q, 0))
    copy = copy_bandwidth()
    rows = {"cupy paged decode": paged}
    sdpa = torch_sdpa(q, k, v)
    if isinstance(sdpa, tuple):
        rows["torch SDPA, contiguous K/V"] = sdpa[0]
        np.testing.assert_allclose(cupy.asnumpy(cupy.from_dlpack(sdpa[1]).astype(cupy.float32)),
                                   cupy.asnumpy(expected), atol=4e-3, rtol=4e-3)
    torch_backend = torch_paged(k, v, tables, lens, q)
    if isinstance(torch_backend, float):
        rows["torch backend paged decode"] = torch_backend

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"\n{name.decode() if isinstance(name, bytes) else name}: copy bandwidth {copy / 1e12:.2f} TB/s (read + write)")
    for label, seconds in rows.items():
        bandwidth = kv_bytes / seconds
        print(f"  {label:30s} {seconds * 1e6:9.1f} us  {bandwidth / 1e12:6.2f} TB/s  {bandwidth / copy:6.1%} of copy")
        benchmark.extra_info[label] = {"us": seconds * 1e6, "TB/s": bandwidth / 1e12, "of_copy": bandwidth / copy}
    for label, value in (("torch SDPA", sdpa), ("torch backend", torch_backend)):
        if isinstance(value, str):
            print(f"  {label}: not measured ({value})")
            benchmark.extra_info[f"{label} skipped"] = value
    benchmark.extra_info["copy TB/s"] = copy / 1e12
    benchmark.extra_info["split_len"] = plan._decode_geometry(Q_HEADS)[0].split_len

    def step() -> None:
        plan.run(q, 0)
        cupy.cuda.get_current_stream().synchronize()

    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    assert kv_bytes / paged > 0
