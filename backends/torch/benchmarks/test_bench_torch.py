"""Torch backend benchmarks: paged attention against torch's SDPA over the same K/V laid out contiguously.

Shapes of issue 4. CPU: decode of 8 sequences x 2,048 tokens (float32 and
bfloat16; "paged" is the default kernel, the compiled one where it was built,
and "paged torch-ops" the torch-op kernel beside it) and causal prefill of
1 x 2,048 (float32); CUDA: decode of 32 x 4,096 in float16 (skipped without a
GPU). 32 query / 8 KV heads, head dim 128, block size 16; the pool holds twice
the blocks the batch uses and hands them out shuffled. The peer is ``scaled_dot_product_attention`` (with
``enable_gqa``) on ``[batch, kv_heads, seq, head_dim]`` contiguous tensors.
Every paged benchmark checks its output against the peer before timing it.
CPU decode of 32 x 8,192 (float32, 2 GiB of K/V) is timed against a 256 MiB
copy instead, round by round: its K/V read rate as a fraction of the copy's
bandwidth.

CPU timings run on one torch thread: on a shared machine a second intra-op
thread waits on a busy core and scatters every timing (both sides alike).
Separately timed peers can fall in differently loaded moments, so the
``paired`` tests also alternate paged and SDPA round by round and report the
median of per-round ratios. ``conftest.py`` prints the figures at the end.

Run: ``pytest backends/torch/benchmarks -m benchmark --benchmark-only -s``.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pagedkv_core.config import CacheConfig  # noqa: E402
from pagedkv_torch.attention import TorchAttention, triton_available  # noqa: E402
from pagedkv_torch.backend import TorchBackend  # noqa: E402
from pagedkv_torch.native_decode import native_unavailable_reason  # noqa: E402

pytestmark = pytest.mark.benchmark

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CPU_DECODE, CPU_PREFILL, CUDA_DECODE = (8, 2048), (1, 2048), (32, 4096)
CPU_DECODE_LARGE = (32, 8192)  # 2 GiB of float32 K/V: far beyond every cache
COPY_BYTES = 256 << 20  # far beyond the last-level cache
ROUNDS = 9
F = torch.nn.functional



class Case:
    """A paged pool holding a batch's K/V, the plan over it, and the same K/V contiguous for SDPA."""

    def __init__(self, dtype: str, batch: int, seq: int, device: str, *, queries: int = 1) -> None:
        backend = TorchBackend()
        per_seq = seq // BLOCK
        config = CacheConfig(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=2 * batch * per_seq,
                             block_size=BLOCK, dtype=dtype)
        self.storage = backend.create_storage(config, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for pool in (self.storage.k, self.storage.v):
            pool.copy_(torch.randn(pool.shape, generator=gen, device=device).to(pool.dtype))
        rng = np.random.default_rng(0)
        self.tables = rng.permutation(config.num_blocks)[: batch * per_seq].reshape(batch, per_seq).astype(np.int32)
        self.seq_lens = np.full(batch, seq, np.int32)
        ids = torch.from_numpy(self.tables.astype(np.int64)).to(device)
        self.k, self.v = (pool[0][ids].reshape(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
                          for pool in (self.storage.k, self.storage.v))  # [batch, kv_heads, seq, head_dim]
        self.q = torch.randn(batch * queries, Q_HEADS, HEAD_DIM, generator=gen, device=device).to(self.storage.dtype)
        self.kv_bytes = 2 * self.k.numel() * self.k.element_size()
        self.batch, self.seq, self.queries = batch, seq, queries

    def sdpa(self):
        q = self.q.view(self.batch, self.queries, Q_HEADS, HEAD_DIM).transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(q, self.k, self.v, is_causal=self.queries > 1, enable_gqa=True)

    def sdpa_output(self) -> torch.Tensor:
        return self.sdpa()().transpose(1, 2).reshape(self.q.shape)


@pytest.fixture(scope="module")
def decode_cases():
    return {dtype: Case(dtype, *CPU_DECODE, "cpu") for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def prefill_case():
    return Case("float32", *CPU_PREFILL, "cpu", queries=CPU_PREFILL[1])


def _record(benchmark, results: dict, name: str, **extra) -> None:
    stats = benchmark.stats.stats
    results[name] = {"min": stats.min, "median": stats.median, **extra}
    benchmark.extra_info.update(extra)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"paged output differs from SDPA by {err}"


@pytest.mark.benchmark(group="bandwidth")
def test_copy_bandwidth(benchmark, torch_bench_results):
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10, warmup_rounds=1)
    _record(benchmark, torch_bench_results, "copy cpu", bytes_moved=2 * COPY_BYTES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_sdpa(benchmark, decode_cases, torch_bench_results, dtype):
    case = decode_cases[dtype]
    benchmark.group = f"decode {dtype}"
    benchmark.pedantic(case.sdpa(), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, torch_bench_results, f"decode {dtype} sdpa", kv_bytes=case.kv_bytes, device="cpu")


def _decode_plans(case: Case) -> dict:
    """The default CPU decode (``auto``: the compiled kernel where built) and the torch-op kernel."""
    plans = {"paged": TorchAttention("auto").plan(case.storage, case.tables, case.seq_lens)}
    if native_unavailable_reason(case.storage) is None:
        plans["paged torch-ops"] = TorchAttention("torch").plan(case.storage, case.tables, case.seq_lens)
    return plans


@pytest.mark.parametrize("kernel", ["paged", "paged torch-ops"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_paged(benchmark, decode_cases, torch_bench_results, dtype, kernel):
    """One layer of paged decode (``plan.run``); the plan is per step, for every layer."""
    case = decode_cases[dtype]
    plan = _decode_plans(case).get(kernel)
    if plan is None:
        pytest.skip(f"'paged' already runs torch ops: {native_unavailable_reason(case.storage)}")
    _close(plan.run(case.q, 0), case.sdpa_output(), 1e-4 if dtype == "float32" else 2e-2)
    benchmark.group = f"decode {dtype}"
    benchmark.pedantic(plan.run, args=(case.q, 0), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, torch_bench_results, f"decode {dtype} {kernel}", kv_bytes=case.kv_bytes, device="cpu")


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _spread(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum of the per-round ratios ``a / b``."""
    ratios = [x / y for x, y in zip(a, b)]
    return statistics.median(ratios), min(ratios), max(ratios)


def test_decode_paired(benchmark, decode_cases, torch_bench_results, paired_session):
    """Paged vs SDPA in both dtypes, and bfloat16 vs float32 paged, round by round (each kernel)."""
    fns, kernels = {}, set()
    for dtype, case in decode_cases.items():
        for kernel, plan in _decode_plans(case).items():
            fns[f"{dtype} {kernel}"] = (lambda p, q: lambda: p.run(q, 0))(plan, case.q)
            kernels.add(kernel)
        fns[f"{dtype} sdpa"] = case.sdpa()
    t = paired_session(benchmark, "paired decode session", fns, 2 * ROUNDS)
    for kernel in sorted(kernels):
        suffix = "" if kernel == "paged" else f" ({kernel.removeprefix('paged ')})"
        for dtype in decode_cases:
            ratio, low, high = _spread(t[f"{dtype} {kernel}"], t[f"{dtype} sdpa"])
            torch_bench_results[f"decode {dtype} paired{suffix}"] = {"ratio": ratio}
            print(f"\ndecode {dtype}: {kernel} {1e3 * min(t[f'{dtype} {kernel}']):.1f} ms, "
                  f"SDPA {1e3 * min(t[f'{dtype} sdpa']):.1f} ms (min); paired ratio {ratio:.2f}x "
                  f"(range {low:.2f}-{high:.2f}, {len(t[f'{dtype} sdpa'])} rounds)")
        halves, low, high = _spread(t[f"bfloat16 {kernel}"], t[f"float32 {kernel}"])
        torch_bench_results[f"decode bfloat16 vs float32{suffix}"] = {"ratio": halves}
        print(f"decode: bfloat16 / float32 {kernel}, paired ratio {halves:.2f}x (range {low:.2f}-{high:.2f})")
    # the goals (<= 0.5x, bfloat16 < float32) are reported, not asserted: on a shared
    # machine they move with the load; paging must at least beat SDPA
    assert torch_bench_results["decode float32 paired"]["ratio"] < 1.0, "paged decode slower than SDPA"


def test_decode_bandwidth_large(benchmark, torch_bench_results, paired_session):
    """32 x 8,192 float32 decode: K/V bytes read per second as a fraction of the copy bandwidth, paired by round.

    The pool holds exactly the batch's blocks, shuffled (2 GiB; no SDPA copy
    beside it), filled by tiling 64 MiB of random values; two sequences are
    checked against SDPA over their own K/V before timing.
    """
    batch, seq = CPU_DECODE_LARGE
    per_seq = seq // BLOCK
    config = CacheConfig(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_blocks=batch * per_seq,
                         block_size=BLOCK, dtype="float32")
    storage = TorchBackend().create_storage(config, "cpu")
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(64 << 20 >> 2, generator=gen)
    for pool in (storage.k, storage.v):
        flat = pool.view(-1)
        for start in range(0, flat.numel(), tile.numel()):
            n = min(tile.numel(), flat.numel() - start)
            flat[start:start + n].copy_(tile[:n])
        tile = tile.roll(12345)
    tables = np.random.default_rng(0).permutation(config.num_blocks).reshape(batch, per_seq).astype(np.int32)
    plan = TorchAttention("auto").plan(storage, tables, np.full(batch, seq, np.int32))
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen)
    got = plan.run(q, 0)
    for b in (0, batch - 1):
        ids = torch.from_numpy(tables[b].astype(np.int64))
        k, v = (pool[0][ids].reshape(1, seq, KV_HEADS, HEAD_DIM).transpose(1, 2) for pool in (storage.k, storage.v))
        want = F.scaled_dot_product_attention(q[b:b + 1, :, None], k, v, enable_gqa=True)[:, :, 0]
        _close(got[b:b + 1], want, 1e-4)
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    kv_bytes = 2 * batch * seq * KV_HEADS * HEAD_DIM * 4
    t = paired_session(benchmark, "decode 32 x 8192 vs copy", {"paged": lambda: plan.run(q, 0),
                                                                "copy": lambda: dst.copy_(src)}, 5)
    fractions = [(kv_bytes / a) / (2 * COPY_BYTES / b) for a, b in zip(t["paged"], t["copy"])]
    fraction = statistics.median(fractions)
    torch_bench_results["decode float32 32x8192 vs copy"] = {"ratio": fraction}
    print(f"\ndecode float32 32 x 8,192: paged {1e3 * min(t['paged']):.0f} ms (min), K/V read at "
          f"{kv_bytes / min(t['paged']) / 1e9:.1f} GB/s; copy {2 * COPY_BYTES / min(t['copy']) / 1e9:.1f} GB/s "
          f"(read + write); paired rounds: K/V rate / copy bandwidth = {fraction:.0%} "
          f"(range {min(fractions):.0%}-{max(fractions):.0%}; goal >= 60 %)")


def test_prefill_sdpa(benchmark, prefill_case, torch_bench_results):
    benchmark.group = "prefill float32"
    benchmark.pedantic(prefill_case.sdpa(), rounds=3, warmup_rounds=1)
    _record(benchmark, torch_bench_results, "prefill float32 sdpa")


def _prefill_call(case: Case):
    qsl = np.array([0, case.seq], np.int32)
    attention = TorchAttention("torch")
    return lambda: attention.prefill(case.q, case.storage, 0, case.tables, case.seq_lens, qsl)


def test_prefill_paged(benchmark, prefill_case, torch_bench_results):
    """One call: plan and run (the plan is what paging adds besides the gather)."""
    call = _prefill_call(prefill_case)
    _close(call(), prefill_case.sdpa_output(), 1e-4)
    benchmark.group = "prefill float32"
    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    _record(benchmark, torch_bench_results, "prefill float32 paged")


def test_prefill_paired(benchmark, prefill_case, torch_bench_results, paired_session):
    t = paired_session(benchmark, "paired prefill session", {"paged": _prefill_call(prefill_case),
                                                       "sdpa": prefill_case.sdpa()}, 4)
    ratio = _median_ratio(t["paged"], t["sdpa"])
    torch_bench_results["prefill float32 paired"] = {"ratio": ratio}
    print(f"\nprefill: paged {min(t['paged']):.3f} s, SDPA {min(t['sdpa']):.3f} s (min); paired ratio {ratio:.2f}x")
    assert ratio <= 1.5, "paging adds more than half to prefill"  # the goal, <= 1.1x, is reported


def _cuda_time(fn, rounds: int = 20) -> list[float]:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def test_cuda_decode_bandwidth(benchmark, torch_bench_results):
    """Triton paged decode vs SDPA on the same K/V, as a fraction of the device's copy bandwidth."""
    probe = TorchBackend().probe("cuda:0")
    if not probe.available:
        pytest.skip(probe.reason)
    if not triton_available():
        pytest.skip("triton is not installed (pip install pagedkv-torch[triton])")
    case = Case("float16", *CUDA_DECODE, "cuda:0")
    src = torch.ones(1 << 28, device="cuda:0")  # 1 GiB
    dst = torch.empty_like(src)
    copy = _cuda_time(lambda: dst.copy_(src))
    torch_bench_results["copy cuda"] = {"min": min(copy), "median": statistics.median(copy),
                                        "bytes_moved": 2 * src.numel() * 4}
    plan = TorchAttention("triton").plan(case.storage, case.tables, case.seq_lens)
    _close(plan.run(case.q, 0), case.sdpa_output(), 2e-3)
    fns = {"paged (triton)": lambda: plan.run(case.q, 0), "sdpa": case.sdpa()}
    timings: dict[str, list[float]] = {}
    benchmark.group = "cuda decode session"
    benchmark.pedantic(lambda: timings.update({name: _cuda_time(fn) for name, fn in fns.items()}),
                       rounds=1, iterations=1)
    for name, t in timings.items():
        torch_bench_results[f"cuda decode float16 {name}"] = {"min": min(t), "median": statistics.median(t),
                                                             "kv_bytes": case.kv_bytes, "device": "cuda"}
        print(f"\ncuda decode {name}: {1e3 * min(t):.3f} ms min, {1e3 * statistics.median(t):.3f} ms median")
