"""CUDA: storage with the pinned, asynchronous host tier, and the compiled Triton kernels against the oracle.

Every test skips with the backend probe's reason where no CUDA device is usable.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, fill, make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_torch.attention import TorchAttention  # noqa: E402

DEVICE = "cuda:0"


@pytest.fixture(scope="module")
def cuda(backend):
    probe = backend.probe(DEVICE)
    if not probe.available:
        pytest.skip(probe.reason)
    return backend


def _dtypes(backend):
    caps = backend.capabilities(DEVICE)
    return list(caps.dtypes) + list(caps.quantized)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"])
def test_swap_is_asynchronous_and_bit_exact(cuda, dtype):
    if dtype not in _dtypes(cuda):
        pytest.skip(f"{dtype} pools need a newer GPU (compute capability 8.9+)")
    storage = cuda.create_storage(make_config(dtype), DEVICE)
    fill(cuda, storage, np.random.default_rng(60))
    before = [t.clone() for t in storage._tensors()]
    host = storage.swap_out([2, 7, 11])
    assert host.k.device.type == "cpu" and host.k.is_pinned()
    host.wait()
    assert host.ready
    storage.swap_in(host, [20, 21, 22])
    storage.copy_blocks([20], [0])
    storage.synchronize()
    for old, now in zip(before, storage._tensors()):
        assert torch.equal(now[:, [20, 21, 22]].view(torch.uint8), old[:, [2, 7, 11]].view(torch.uint8))
        assert torch.equal(now[:, 0].view(torch.uint8), old[:, 2].view(torch.uint8))
    cpu = cuda.create_storage(make_config(dtype if dtype != "float8_e4m3fn" else "int8"), "cpu")
    cpu.swap_in(storage.swap_out([2]), [5])  # device -> host object -> another device
    np.testing.assert_allclose(cpu.to_numpy(0)[0][5], storage.to_numpy(0)[0][2], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("split_tokens", [None, 64], ids=["auto splits", "64-token splits"])
@pytest.mark.parametrize("feature", [{}, {"sliding_window": 50, "soft_cap": 2.0}], ids=["plain", "window+cap"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"])
def test_triton_decode(cuda, dtype, feature, split_tokens):
    if dtype not in _dtypes(cuda):
        pytest.skip(f"{dtype} pools need a newer GPU (compute capability 8.9+)")
    rng = np.random.default_rng(61)
    batch = make_batch(cuda, make_config(dtype, blocks=128, block_size=16, head_dim=128), rng,
                       [300, 17, 1, 700], device=DEVICE, pad_value=10**6)
    q, q_np = random_query(cuda, batch, rng, 8, "float16" if dtype in ("int8", "float8_e4m3fn") else dtype)
    out = TorchAttention("triton", split_tokens=split_tokens).decode(
        q, batch.storage, 1, batch.block_tables, batch.seq_lens, **feature)
    assert out.dtype == q.dtype and out.device == q.device
    assert_close(cuda.to_numpy(out).astype(np.float64), oracle(batch, q_np, 1, **feature),
                 "float16" if dtype in ("int8", "float8_e4m3fn") else dtype, f"cuda decode {dtype}")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_torch_kernel_decode_on_cuda(cuda, dtype):
    """The fallback used on CUDA machines without triton."""
    rng = np.random.default_rng(63)
    batch = make_batch(cuda, make_config(dtype, blocks=64, block_size=16, head_dim=64), rng, [200, 3, 90],
                       device=DEVICE)
    q, q_np = random_query(cuda, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    for kw in ({}, {"sliding_window": 40, "soft_cap": 3.0}):
        out = TorchAttention("torch").decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens, **kw)
        assert_close(cuda.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0, **kw), dtype,
                     f"cuda torch decode {dtype} {kw}")


@pytest.mark.parametrize("kernel", ["triton", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_prefill_on_cuda(cuda, dtype, kernel):
    rng = np.random.default_rng(62)
    batch = make_batch(cuda, make_config(dtype, blocks=64, block_size=16, head_dim=64), rng,
                       [200, 0, 90, 33], [200, 0, 17, 1], device=DEVICE)
    q, q_np = random_query(cuda, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    for kw in ({}, {"sliding_window": 40, "soft_cap": 3.0}, {"causal": False}):
        out = TorchAttention(kernel).prefill(q, batch.storage, 0, batch.block_tables, batch.seq_lens,
                                             batch.query_start_loc, **kw)
        assert_close(cuda.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0, **kw), dtype,
                     f"cuda {kernel} prefill {dtype} {kw}")


def test_auto_kernel_on_cuda(cuda):
    storage = cuda.create_storage(make_config(), DEVICE)
    want = "triton" if importlib.util.find_spec("triton") else "torch"
    assert cuda.attention.kernel_for(storage) == want
