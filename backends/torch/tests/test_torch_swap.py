"""Swap to the host tier and back: bit-exact round trips, int8 on the way out, moves across backends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import fill, make_config  # noqa: E402

from pagedkv_core.contract.quant import quantize_blocks  # noqa: E402
from pagedkv_core.contract.storage import HostBlocks, NumpyHostBlocks  # noqa: E402
from pagedkv_numpy.storage import NumpyStorage  # noqa: E402
from pagedkv_torch import storage as storage_module  # noqa: E402
from pagedkv_torch.convert import bits  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "int8"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_round_trip_is_bit_exact(backend, dtype):
    storage = backend.create_storage(make_config(dtype), "cpu")
    fill(backend, storage, np.random.default_rng(10))
    before = [t.clone() for t in storage._tensors()]
    src, dst = [5, 0, 13], [20, 21, 2]
    host = storage.swap_out(src)
    assert isinstance(host, HostBlocks)
    assert host.num_blocks == 3 and host.dtype == dtype
    host.wait()
    assert host.nbytes == 3 * storage.config.bytes_per_block
    for old, now in zip(before, storage._tensors()):
        assert torch.equal(old, now)  # swap_out leaves the device blocks alone
    storage.swap_in(host, dst)
    for old, now in zip(before, storage._tensors()):
        assert torch.equal(now[:, dst], old[:, src])


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_blocks_to_numpy(backend, dtype):
    storage = backend.create_storage(make_config(dtype), "cpu")
    fill(backend, storage, np.random.default_rng(11))
    portable = storage.swap_out([3, 7]).to_numpy()
    assert isinstance(portable, NumpyHostBlocks) and portable.dtype == dtype
    np.testing.assert_array_equal(portable.k, backend.to_numpy(storage.k[:, [3, 7]]))
    assert (portable.k_scale is None) == (dtype != "int8")


def test_quantize_on_swap_out_matches_the_host_reference(backend):
    storage = backend.create_storage(make_config("float32"), "cpu")
    fill(backend, storage, np.random.default_rng(12))
    host = storage.swap_out([1, 9, 4], quantize="int8")
    assert host.dtype == "int8" and host.k.dtype == torch.int8
    want_k, want_scale = quantize_blocks(storage.k[:, [1, 9, 4]].numpy())
    np.testing.assert_array_equal(host.k.numpy(), want_k)
    np.testing.assert_array_equal(host.k_scale.numpy(), want_scale)
    storage.swap_in(host, [20, 21, 22])  # dequantized into the float pool
    error = (storage.k[:, [20, 21, 22]] - storage.k[:, [1, 9, 4]]).abs()
    step = torch.from_numpy(want_scale)[:, :, None, :, None]
    assert bool((error <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_blocks_cross_from_numpy_and_back(backend, dtype):
    rng = np.random.default_rng(13)
    config = make_config(dtype)
    numpy_storage = NumpyStorage(config)
    slots = np.arange(config.num_blocks * config.block_size)
    for layer in range(config.num_layers):
        k, v = (rng.standard_normal((slots.size, 2, 32)).astype(np.float32) for _ in range(2))
        numpy_storage.write(layer, slots, k, v)
    storage = backend.create_storage(config, "cpu")
    storage.swap_in(numpy_storage.swap_out([2, 3, 4]), [10, 11, 12])
    for layer in range(config.num_layers):
        np.testing.assert_array_equal(storage.to_numpy(layer)[0][[10, 11, 12]], numpy_storage.to_numpy(layer)[0][2:5])
    back = NumpyStorage(config)
    back.swap_in(storage.swap_out([10, 11, 12]).to_numpy(), [0, 1, 2])
    np.testing.assert_array_equal(back.k[:, :3], numpy_storage.k[:, 2:5])
    np.testing.assert_array_equal(back.v[:, :3], numpy_storage.v[:, 2:5])


@pytest.mark.parametrize("pool, host", [("bfloat16", "float32"), ("float32", "bfloat16"), ("int8", "float16"),
                                        ("float16", "int8")])
def test_swap_in_converts_between_dtypes(backend, pool, host):
    rng = np.random.default_rng(14)
    source = backend.create_storage(make_config(host), "cpu")
    fill(backend, source, rng)
    target = backend.create_storage(make_config(pool), "cpu")
    target.swap_in(source.swap_out([0, 6]), [3, 4])
    got, want = target.to_numpy(1)[0][[3, 4]], source.to_numpy(1)[0][[0, 6]]
    tol = {"float32": 1e-7, "bfloat16": 1e-2, "float16": 1e-3, "int8": 5e-2}[pool]
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Exercise the float8 code path on CPU (the backend offers float8 pools only on CUDA sm_89+)."""
    monkeypatch.setattr(storage_module, "quantized_dtypes", lambda device: ("int8", "float8_e4m3fn"))


def test_float8_pool_logic(backend, fp8_on_cpu):
    rng = np.random.default_rng(15)
    storage = storage_module.TorchStorage(make_config("float8_e4m3fn"), "cpu")
    fill(backend, storage, rng)
    reference = NumpyStorage(make_config("float32"))
    fill(backend, reference, np.random.default_rng(15))
    got, want = storage.to_numpy(0)[0], reference.to_numpy(0)[0]
    scale = np.abs(want).max(axis=(1, 3), keepdims=True)
    assert np.all(np.abs(got - want) <= scale / 448 + np.abs(want) / 16)  # e4m3: 3 mantissa bits
    before = [t.clone() for t in storage._tensors()]
    storage.swap_in(storage.swap_out([1, 2]), [8, 9])  # float8 + scales travel raw
    for old, now in zip(before, storage._tensors()):
        assert torch.equal(bits(now)[:, [8, 9]], bits(old)[:, [1, 2]])
    portable = storage.swap_out([1]).to_numpy()
    assert portable.k.dtype == np.float32 and portable.dtype == "float8_e4m3fn"
    for dtype, atol in (("float32", 0.0), ("int8", float(scale[1].max()) / 127)):
        other = backend.create_storage(make_config(dtype), "cpu")
        other.swap_in(portable, [0])  # the portable float8 form: raw values as float32, plus scales
        np.testing.assert_allclose(other.to_numpy(0)[0][0], got[1], atol=atol, rtol=1e-6)
