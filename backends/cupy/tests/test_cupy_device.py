"""What only a real CUDA device can show: DLPack with torch, pinned asynchronous swaps, compiled-once kernels.

Every test skips with the backend probe's reason where no GPU is visible.
"""

from __future__ import annotations

import numpy as np
import pytest
from cupy_cases import block_tables, config

from pagedkv_core.errors import DeviceMismatch
from pagedkv_cupy.runtime import CudaRuntime, bfloat16_support


def torch_cuda_or_skip():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA on this machine")
    return torch


def test_torch_tensors_flow_in_and_out_without_copies(cuda_backend):
    torch = torch_cuda_or_skip()
    storage = cuda_backend.create_storage(config("float16"), "cuda:0")
    k = torch.randn(20, 2, 16, dtype=torch.float16, device="cuda:0")
    v = torch.randn(20, 2, 16, dtype=torch.float16, device="cuda:0")
    assert storage.runtime.native(k, "k").data.ptr == k.data_ptr()  # zero-copy import
    tables = block_tables(np.array([20]), 16, 96, np.random.default_rng(0))
    slots = tables[0][np.arange(20) // 16].astype(np.int64) * 16 + np.arange(20) % 16
    storage.write(0, slots, k, v)
    torch.cuda.synchronize()
    k_pool, _ = storage.to_numpy(0)
    np.testing.assert_array_equal(k_pool.reshape(-1, 2, 16)[slots], k.cpu().numpy())
    q = torch.randn(1, 4, 16, dtype=torch.float16, device="cuda:0")
    out = cuda_backend.attention.decode(q, storage, 0, tables, np.array([20]))
    as_torch = torch.from_dlpack(out)  # zero-copy export
    assert as_torch.data_ptr() == out.data.ptr and as_torch.dtype == torch.float16
    pool_k, _ = storage.pools(0)
    assert torch.from_dlpack(pool_k).data_ptr() == pool_k.data.ptr


def test_host_arrays_are_the_wrong_device(cuda_backend):
    storage = cuda_backend.create_storage(config("float32"), "cuda:0")
    k = np.zeros((1, 2, 16), np.float32)
    with pytest.raises(DeviceMismatch):
        storage.write(0, np.array([0]), k, k)


def test_arrays_of_another_gpu_are_refused(cuda_backend):
    if len(cuda_backend.devices()) < 2:
        pytest.skip("needs two GPUs")
    import cupy

    storage = cuda_backend.create_storage(config("float32"), "cuda:0")
    with cupy.cuda.Device(1):
        k = cupy.zeros((1, 2, 16), cupy.float32)
    with pytest.raises(DeviceMismatch):
        storage.write(0, np.array([0]), k, k)


def test_swap_out_lands_in_pinned_memory_asynchronously(cuda_backend):
    import cupy

    storage = cuda_backend.create_storage(config("float16", num_blocks=512), "cuda:0")
    storage.k[...] = cupy.random.standard_normal(storage.k.shape).astype(cupy.float16)
    host = storage.swap_out(np.arange(0, 512, 2))
    attributes = cupy.cuda.runtime.pointerGetAttributes(host.k.ctypes.data)
    assert attributes.type == cupy.cuda.runtime.memoryTypeHost
    host.wait()
    assert host.ready
    np.testing.assert_array_equal(host.k, cupy.asnumpy(storage.k[:, 0:512:2]))


def test_each_kernel_module_compiles_once(cuda_backend):
    storage = cuda_backend.create_storage(config("float32"), "cuda:0")
    tables = block_tables(np.array([30, 5]), 16, 96, np.random.default_rng(1))
    q = cuda_backend.asarray(np.ones((2, 4, 16)), "cuda:0", "float32")
    cuda_backend.attention.decode(q, storage, 0, tables, np.array([30, 5]))
    compiled = len(CudaRuntime.kernels)
    for layer in (0, 1, 0):
        cuda_backend.attention.decode(q, storage, layer, tables, np.array([30, 5]))
    assert len(CudaRuntime.kernels) == compiled


def test_bfloat16_is_declared_exactly_when_cupy_can_hold_it(cuda_backend):
    dtype, reason = bfloat16_support()
    capabilities = cuda_backend.capabilities("cuda:0")
    assert ("bfloat16" in capabilities.dtypes) == (dtype is not None), reason
    assert capabilities.supports_dtype("int8") and capabilities.max_head_dim == 256
