"""Block storage on the emulator and on a CUDA device: writes, reads, copies and swaps, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from cupy_cases import config

from pagedkv_core.contract import quant
from pagedkv_core.contract.storage import NumpyHostBlocks
from pagedkv_core.errors import (
    DeviceMismatch,
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    ShapeMismatch,
    UnsupportedOperation,
)
from pagedkv_numpy.storage import NumpyStorage

NUMPY_DTYPES = ("float16", "float32", "int8")  # what the NumPy backend can mirror bit for bit


def random_writes(cupy_target, storages, rng, steps: int = 12) -> None:
    """The same random writes (padding slots, repeated blocks, growing magnitudes) into every storage."""
    c = storages[0].config
    source = "float32" if c.quantized else c.dtype
    for step in range(steps):
        n = int(rng.integers(1, 24))
        slots = rng.choice(np.arange(-1, c.num_blocks * c.block_size), size=n, replace=False)
        spread = float(rng.uniform(0.1, 4.0))
        k = (rng.standard_normal((n, c.num_kv_heads, c.head_dim)) * spread).astype(np.float32)
        v = (rng.standard_normal((n, c.num_kv_heads, c.head_dim)) * spread).astype(np.float32)
        for storage in storages:
            if isinstance(storage, NumpyStorage):
                cast = k if c.quantized else k.astype(c.dtype)
                storage.write(step % c.num_layers, slots, cast, v if c.quantized else v.astype(c.dtype))
            else:
                storage.write(step % c.num_layers, slots, cupy_target.put(k, source), cupy_target.put(v, source))


def small(dtype: str):
    return config(dtype, num_kv_heads=3, head_dim=8, num_blocks=12, block_size=4)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_writes_match_the_numpy_backend_bit_for_bit(cupy_target, dtype):
    """Including int8: scales grow and existing values are requantized on the device exactly as on the host."""
    rng = np.random.default_rng(1)
    storage, mirror = cupy_target.storage(small(dtype)), NumpyStorage(small(dtype))
    random_writes(cupy_target, [storage, mirror], rng)
    for layer in range(2):
        for got, expected in zip(storage.to_numpy(layer), mirror.to_numpy(layer)):
            np.testing.assert_array_equal(got, expected)
    if dtype == "int8":
        for layer in range(2):
            k_scale, v_scale = storage.scales(layer)
            np.testing.assert_array_equal(cupy_target.get(k_scale), mirror.k_scale[layer])
            np.testing.assert_array_equal(cupy_target.get(v_scale), mirror.v_scale[layer])


def test_bfloat16_round_trips_exactly(cupy_target):
    if cupy_target.unsupported("bfloat16"):
        pytest.skip(cupy_target.unsupported("bfloat16"))
    rng = np.random.default_rng(2)
    storage = cupy_target.storage(small("bfloat16"))
    values = cupy_target.get(cupy_target.put(rng.standard_normal((5, 3, 8)), "bfloat16"))  # representable in bfloat16
    slots = np.array([0, 7, -1, 20, 47])
    storage.write(1, slots, cupy_target.put(values, "bfloat16"), cupy_target.put(-values, "bfloat16"))
    k, v = storage.to_numpy(1)
    assert k.dtype == np.float32
    keep = slots >= 0
    np.testing.assert_array_equal(k.reshape(-1, 3, 8)[slots[keep]], values[keep])
    np.testing.assert_array_equal(v.reshape(-1, 3, 8)[slots[keep]], -values[keep])


def test_write_casts_other_float_inputs(cupy_target):
    storage = cupy_target.storage(small("float32"))
    k = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) / 7
    storage.write(0, np.array([5, 9]), cupy_target.put(k, "float16"), cupy_target.put(k, "float16"))
    got = storage.to_numpy(0)[0].reshape(-1, 3, 8)[[5, 9]]
    np.testing.assert_array_equal(got, k.astype(np.float16).astype(np.float32))


def test_gather_returns_the_sequence_in_order(cupy_target):
    rng = np.random.default_rng(3)
    storage = cupy_target.storage(small("float16"))
    random_writes(cupy_target, [storage], rng)
    k_pool, v_pool = storage.to_numpy(0)
    table = np.array([7, 2, 11])
    k, v = storage.gather(0, table, 10)
    np.testing.assert_array_equal(cupy_target.get(k), k_pool[table].reshape(-1, 3, 8)[:10])
    np.testing.assert_array_equal(cupy_target.get(v), v_pool[table].reshape(-1, 3, 8)[:10])


@pytest.mark.parametrize("dtype", NUMPY_DTYPES + ("bfloat16",))
def test_copy_blocks_is_bit_exact_and_leaves_others(cupy_target, dtype):
    if cupy_target.unsupported(dtype):
        pytest.skip(cupy_target.unsupported(dtype))
    rng = np.random.default_rng(4)
    storage = cupy_target.storage(small(dtype))
    random_writes(cupy_target, [storage], rng)
    before = [cupy_target.get(a) for a in storage._arrays()]
    storage.copy_blocks([1, 4, 9], [10, 0, 3])
    after = [cupy_target.get(a) for a in storage._arrays()]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new[:, [10, 0, 3]], old[:, [1, 4, 9]])
        untouched = [b for b in range(12) if b not in (10, 0, 3)]
        np.testing.assert_array_equal(new[:, untouched], old[:, untouched])


@pytest.mark.parametrize("dtype", NUMPY_DTYPES + ("bfloat16",))
def test_swap_out_and_in_is_bit_exact(cupy_target, dtype):
    if cupy_target.unsupported(dtype):
        pytest.skip(cupy_target.unsupported(dtype))
    rng = np.random.default_rng(5)
    storage = cupy_target.storage(small(dtype))
    random_writes(cupy_target, [storage], rng)
    before = [cupy_target.get(a) for a in storage._arrays()]
    host = storage.swap_out([2, 5, 6])
    host.wait()
    assert host.num_blocks == 3 and host.dtype == dtype and host.nbytes > 0
    portable = host.to_numpy()
    pools = [storage.to_numpy(layer) for layer in range(2)]
    for layer in range(2):
        k, v = portable.k[layer], portable.v[layer]
        if dtype == "int8":
            k, v = quant.dequantize_blocks(k, portable.k_scale[layer]), quant.dequantize_blocks(v, portable.v_scale[layer])
        np.testing.assert_array_equal(k, pools[layer][0][[2, 5, 6]])
        np.testing.assert_array_equal(v, pools[layer][1][[2, 5, 6]])
    storage.swap_in(host, [8, 0, 11])
    after = [cupy_target.get(a) for a in storage._arrays()]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new[:, [8, 0, 11]], old[:, [2, 5, 6]])
        np.testing.assert_array_equal(new[:, [2, 5, 6]], old[:, [2, 5, 6]])  # swap_out leaves the device blocks


@pytest.mark.parametrize("dtype", ("float16", "float32"))
def test_swap_out_quantized_matches_host_quantization(cupy_target, dtype):
    rng = np.random.default_rng(6)
    storage = cupy_target.storage(small(dtype))
    random_writes(cupy_target, [storage], rng)
    ids = [3, 0, 10]
    host = storage.swap_out(ids, quantize="int8").to_numpy()
    assert host.dtype == "int8"
    for layer in range(2):
        q, scale = quant.quantize_blocks(storage.to_numpy(layer)[0][ids])
        np.testing.assert_array_equal(host.k[layer], q)
        np.testing.assert_array_equal(host.k_scale[layer], scale)
    # Back in, dequantized exactly as the NumPy backend does it.
    mirror = NumpyStorage(small(dtype))
    mirror.swap_in(host, [1, 2, 4])
    storage.swap_in(host, [1, 2, 4])
    for layer in range(2):
        np.testing.assert_array_equal(storage.to_numpy(layer)[0][[1, 2, 4]], mirror.to_numpy(layer)[0][[1, 2, 4]])


@pytest.mark.parametrize("pool_dtype,host_dtype", [("float16", "float32"), ("int8", "float32"), ("float32", "int8"),
                                                   ("int8", "int8"), ("float16", "float16")])
def test_swap_in_from_numpy_host_blocks_converts_like_the_numpy_backend(cupy_target, pool_dtype, host_dtype):
    rng = np.random.default_rng(7)
    source = NumpyStorage(small(host_dtype))
    random_writes(cupy_target, [source], rng)
    host = source.swap_out([0, 1, 2, 3])
    storage, mirror = cupy_target.storage(small(pool_dtype)), NumpyStorage(small(pool_dtype))
    storage.swap_in(host, [4, 5, 6, 7])
    mirror.swap_in(host, [4, 5, 6, 7])
    for layer in range(2):
        for got, expected in zip(storage.to_numpy(layer), mirror.to_numpy(layer)):
            np.testing.assert_array_equal(got, expected)


def test_host_blocks_cross_to_the_numpy_backend(cupy_target):
    rng = np.random.default_rng(8)
    storage = cupy_target.storage(small("float16"))
    random_writes(cupy_target, [storage], rng)
    mirror = NumpyStorage(small("float16"))
    mirror.swap_in(storage.swap_out([9, 10]), [0, 1])
    for layer in range(2):
        np.testing.assert_array_equal(mirror.to_numpy(layer)[0][[0, 1]], storage.to_numpy(layer)[0][[9, 10]])


def test_facts(cupy_target):
    c = small("int8")
    storage = cupy_target.storage(c)
    assert storage.nbytes == c.bytes_per_block * c.num_blocks
    k, v = storage.pools(1)
    assert tuple(k.shape) == tuple(v.shape) == (12, 4, 3, 8)
    assert tuple(storage.scales(1)[0].shape) == (12, 3)
    assert cupy_target.storage(small("float16")).scales(0) is None
    storage.synchronize()


def test_bad_input_fails_before_any_change(cupy_target):
    rng = np.random.default_rng(9)
    storage = cupy_target.storage(small("float16"))
    random_writes(cupy_target, [storage], rng)
    before = [cupy_target.get(a) for a in storage._arrays()]
    k = rng.standard_normal((2, 3, 8))
    with pytest.raises(InvalidBlock):
        storage.write(0, np.array([3, 48]), cupy_target.put(k, "float16"), cupy_target.put(k, "float16"))
    with pytest.raises(InvalidArgument):
        storage.write(2, np.array([3, 4]), cupy_target.put(k, "float16"), cupy_target.put(k, "float16"))
    with pytest.raises(DeviceMismatch):
        storage.write(0, np.array([3, 4]), cupy_target.foreign(k.astype(np.float16)), cupy_target.put(k, "float16"))
    with pytest.raises(DTypeMismatch):
        storage.write(0, np.array([3, 4]), cupy_target.put(k, "int8"), cupy_target.put(k, "int8"))
    with pytest.raises(ShapeMismatch):
        storage.write(0, np.array([3, 4, 5]), cupy_target.put(k, "float16"), cupy_target.put(k, "float16"))
    with pytest.raises(InvalidBlock):
        storage.copy_blocks([0, 12], [1, 2])
    with pytest.raises(InvalidArgument):
        storage.copy_blocks([0, 1], [1, 2])  # dst overlaps src
    with pytest.raises(UnsupportedOperation):
        storage.swap_out([0], quantize="int4")
    host = storage.swap_out([0, 1])
    with pytest.raises(ShapeMismatch):
        storage.swap_in(host, [2, 3, 4])
    with pytest.raises(InvalidArgument):
        storage.swap_in(host, [5, 5])
    with pytest.raises(ShapeMismatch):
        bad = NumpyHostBlocks(np.zeros((2, 2, 4, 3, 8), np.int8), np.zeros((2, 2, 4, 3, 8), np.int8), "int8",
                              np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.float32))
        storage.swap_in(bad, [2, 3])
    for old, new in zip(before, [cupy_target.get(a) for a in storage._arrays()]):
        np.testing.assert_array_equal(new, old)


def test_unsupported_dtype_is_refused(cupy_target):
    with pytest.raises(UnsupportedOperation):
        cupy_target.storage(small("float64"))


def test_write_kernels_skip_slots_and_blocks_outside_the_pool(cupy_target):
    """Bypass the host checks: the kernels themselves never write outside the pools (guard bytes on the emulator)."""
    from pagedkv_cupy.kernels import WRITE_INT8, ModuleKey, write_name

    module = ModuleKey("write")
    storage = cupy_target.storage(small("float32"))
    rt = storage.runtime
    k = cupy_target.put(np.ones((3, 3, 8)), "float32")
    slots = np.array([48, -5, 7], np.int64)  # past the pool, negative, valid
    rt.launch(module, write_name(4), (3,), (128,), (storage.k[0], storage.v[0], k, k, rt.upload(slots),
                                                    np.int64(48), np.int32(24)))
    pool = storage.to_numpy(0)[0].reshape(-1, 3, 8)
    assert (pool[7] == 1).all() and (np.delete(pool, 7, axis=0) == 0).all()

    quantized = cupy_target.storage(small("int8"))
    rt = quantized.runtime
    blocks = np.array([12, -1, 1], np.int64)  # one destination block each: two invalid, then block 1
    args = (quantized.k[0], quantized.v[0], quantized.k_scale[0], quantized.v_scale[0], k, k,
            rt.upload(np.array([0, 1, 5], np.int64)), rt.upload(blocks), rt.upload(np.arange(4, dtype=np.int32)),
            rt.upload(np.arange(3, dtype=np.int32)), np.int32(12), np.int32(4), np.int32(3), np.int32(8))
    rt.launch(module, WRITE_INT8, (3, 3, 2), (128,), args)
    values = quantized.to_numpy(0)[0].reshape(-1, 3, 8)
    np.testing.assert_allclose(values[5], 1.0, rtol=1e-6)
    assert (np.delete(values, 5, axis=0) == 0).all()


@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_an_int8_pool_refuses_non_finite_values_and_changes_nothing(cupy_target, bad):
    from pagedkv_core.errors import NonFiniteValue

    storage = cupy_target.storage(small("int8"))
    rng = np.random.default_rng(3)
    k = rng.standard_normal((3, 3, 8)).astype(np.float32)
    storage.write(0, np.array([4, 5, 6]), cupy_target.put(k, "float32"), cupy_target.put(-k, "float32"))
    before = [a.copy() for a in storage.to_numpy(0)]
    k[2, 2, 3] = bad
    with pytest.raises(NonFiniteValue):
        storage.write(0, np.array([7, -1, 8]), cupy_target.put(k, "float32"), cupy_target.put(-k, "float32"))
    for got, want in zip(storage.to_numpy(0), before):
        np.testing.assert_array_equal(got, want)
    k[2, 2, 3] = 0.0  # the same write without the bad value goes through; a bad value in a skipped row is ignored
    k[1, 0, 0] = bad
    storage.write(0, np.array([7, -1, 8]), cupy_target.put(k, "float32"), cupy_target.put(-k, "float32"))
    assert np.isfinite(storage.to_numpy(0)[0]).all()


def test_a_pool_beyond_the_device_is_refused_before_allocation(cupy_target):
    from pagedkv_core.errors import InsufficientMemory

    with pytest.raises(InsufficientMemory):
        cupy_target.storage(config("float16", num_kv_heads=8, head_dim=128, num_blocks=10**11, block_size=16))
