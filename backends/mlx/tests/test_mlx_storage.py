"""MLX block storage: writes and reads round-trip, int8 scales, bit-exact copies and swaps."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import DTYPES, fill, import_mlx, make_config, random_kv

mx = import_mlx()

from pagedkv_core.contract.quant import INT8_MAX, dequantize_blocks, quantize_blocks  # noqa: E402
from pagedkv_core.contract.storage import BlockStorage, NumpyHostBlocks  # noqa: E402

FLOATS = ("float32", "float16", "bfloat16")


def representable(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float32, so a float pool must return it exactly."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return x


def test_is_a_block_storage(backend):
    storage = backend.create_storage(make_config(), "cpu")
    assert isinstance(storage, BlockStorage)
    c = storage.config
    assert storage.nbytes == 2 * c.num_layers * c.num_blocks * c.block_size * c.num_kv_heads * c.head_dim * 4
    quantized = backend.create_storage(make_config("int8"), "cpu")
    assert quantized.nbytes == quantized.config.bytes_per_block * c.num_blocks
    storage.synchronize()


@pytest.mark.parametrize("dtype", FLOATS)
def test_write_then_read_exactly(backend, rng, dtype):
    """Written tokens land at their slots (NHD layout), other slots stay zero, gather returns the sequence."""
    storage = backend.create_storage(make_config(dtype), "cpu")
    c = storage.config
    k, v = (representable(x, dtype) for x in random_kv(rng, 10, c))
    slots = rng.choice(c.num_blocks * c.block_size, 10, replace=False)
    storage.write(1, slots, backend.asarray(k, "cpu", dtype), backend.asarray(v, "cpu", dtype))
    k_pool, v_pool = storage.to_numpy(1)
    assert k_pool.shape == (c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
    assert k_pool.dtype == (np.float16 if dtype == "float16" else np.float32)  # bfloat16 comes as float32
    np.testing.assert_array_equal(k_pool[slots // c.block_size, slots % c.block_size], k)
    np.testing.assert_array_equal(v_pool[slots // c.block_size, slots % c.block_size], v)
    untouched = np.ones(c.num_blocks * c.block_size, bool)
    untouched[slots] = False
    assert not k_pool.reshape(-1, c.num_kv_heads, c.head_dim)[untouched].any()
    assert not storage.to_numpy(0)[0].any()
    table = np.array([5, 9, 2])  # a sequence of 11 tokens in blocks 5, 9, 2
    seq = np.concatenate([b * c.block_size + np.arange(c.block_size) for b in table])[:11]
    k, v = (representable(x, dtype) for x in random_kv(rng, 11, c))
    storage.write(0, seq, backend.asarray(k, "cpu", dtype), backend.asarray(v, "cpu", dtype))
    gk, gv = storage.gather(0, table, 11)
    assert gk.shape == (11, c.num_kv_heads, c.head_dim) and gk.dtype == backend.asarray(k, "cpu", dtype).dtype
    np.testing.assert_array_equal(backend.to_numpy(gk), k)
    np.testing.assert_array_equal(backend.to_numpy(gv), v)
    empty, _ = storage.gather(0, table, 0)
    assert empty.shape == (0, c.num_kv_heads, c.head_dim)


def test_write_casts_and_accepts_native_indices(backend, rng):
    """float32 NumPy values into a float16 pool are rounded once; MLX int32 slots work like NumPy ones."""
    storage = backend.create_storage(make_config("float16"), "cpu")
    k, v = random_kv(rng, 4, storage.config)
    storage.write(0, mx.array(np.array([0, 5, 9, 30], np.int32)), k, mx.array(v))
    k_pool, _ = storage.to_numpy(0)
    flat = k_pool.reshape(-1, *k.shape[1:])
    np.testing.assert_array_equal(flat[[0, 5, 9, 30]], k.astype(np.float16).astype(np.float32))


def test_int8_write_quantizes_per_block_and_head(backend, rng):
    """A block written whole holds exactly the core's quantization of it; scales are absmax / 127."""
    storage = backend.create_storage(make_config("int8"), "cpu")
    c = storage.config
    k, v = random_kv(rng, c.block_size, c)
    storage.write(1, 6 * c.block_size + np.arange(c.block_size), k, v)
    qk, sk = quantize_blocks(k[None])
    np.testing.assert_array_equal(storage.to_numpy(1)[0][6], dequantize_blocks(qk, sk)[0])
    k_scale, _ = storage.scales(1)
    np.testing.assert_allclose(np.array(k_scale[6]), np.abs(k).max(axis=(0, 2)) / INT8_MAX, rtol=1e-7)


def test_int8_requantizes_like_the_numpy_backend(backend, rng):
    """Token-by-token writes with growing magnitudes: same int8 values and scales as NumpyStorage."""
    numpy_storage = pytest.importorskip("pagedkv_numpy.storage", reason="pagedkv-numpy is the reference")
    config = make_config("int8")
    ours, ref = backend.create_storage(config, "cpu"), numpy_storage.NumpyStorage(config)
    for step in range(12):
        k, v = random_kv(rng, 3, config)
        k *= 1.0 + step  # later tokens are larger: the block's scale grows and old values are requantized
        slots = np.array([step, 20 + step, 40 + 2 * step])
        ours.write(0, slots, k, v)
        ref.write(0, slots, k, v)
    for a, b in zip(ours.to_numpy(0), ref.to_numpy(0)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.array(ours.scales(0)[0]), ref.scales(0)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_round_trip_is_bit_exact(backend, rng, dtype):
    storage = backend.create_storage(make_config(dtype), "cpu")
    fill(storage, rng)
    ids = np.array([7, 2, 30])
    host = storage.swap_out(ids)
    assert host.num_blocks == 3 and host.dtype == dtype
    assert host.k.shape == (2, 3, 4, 2, 8)
    assert host.k.dtype == (np.int8 if dtype == "int8" else np.float16 if dtype == "float16" else np.float32)
    assert host.nbytes == host.k.nbytes * 2 + (0 if host.k_scale is None else host.k_scale.nbytes * 2)
    before = [storage.to_numpy(layer) for layer in range(2)]
    target = np.array([1, 44, 45])
    storage.swap_in(host, target)
    for layer in range(2):
        for now, old in zip(storage.to_numpy(layer), before[layer]):
            np.testing.assert_array_equal(now[target], old[ids])
            np.testing.assert_array_equal(now[ids], old[ids])


def test_swap_out_is_a_zero_copy_view_of_a_fresh_gather(backend, rng):
    """The host arrays view the gathered MLX buffer (no second copy) and never alias the pool."""
    storage = backend.create_storage(make_config(), "cpu")
    fill(storage, rng)
    host = storage.swap_out([4, 5])
    assert host.k.base is not None and not host.k.flags.owndata
    saved = host.k.copy()
    k, v = random_kv(rng, 8, storage.config)
    storage.write(0, 4 * 4 + np.arange(8), k, v)  # overwrite blocks 4 and 5 on the device
    np.testing.assert_array_equal(host.k, saved)


def test_swap_out_quantized_matches_the_core_quantizer(backend, rng):
    storage = backend.create_storage(make_config("float32"), "cpu")
    fill(storage, rng)
    ids = [3, 9]
    host = storage.swap_out(ids, quantize="int8")
    assert host.dtype == "int8" and host.k.dtype == np.int8 and host.k_scale.shape == (2, 2, 2)
    k_pool = np.stack([storage.to_numpy(layer)[0][ids] for layer in range(2)])
    qk, sk = quantize_blocks(k_pool)
    np.testing.assert_array_equal(host.k, qk)
    np.testing.assert_array_equal(host.k_scale, sk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_in_converts_foreign_host_blocks(backend, rng, dtype):
    """Host blocks from another backend: float64 (cast), int8 with scales (dequantized or kept), float (quantized)."""
    storage = backend.create_storage(make_config(dtype), "cpu")
    c = storage.config
    shape = (c.num_layers, 2, c.block_size, c.num_kv_heads, c.head_dim)
    values = rng.standard_normal(shape)
    storage.swap_in(NumpyHostBlocks(values, -values, "float64"), [8, 9])
    k_pool, v_pool = storage.to_numpy(1)
    if dtype == "int8":
        qk, sk = quantize_blocks(values[1])
        np.testing.assert_array_equal(k_pool[[8, 9]], dequantize_blocks(qk, sk))
    else:
        np.testing.assert_allclose(k_pool[[8, 9]], values[1], rtol={"float32": 1e-7}.get(dtype, 8e-3))
        np.testing.assert_array_equal(v_pool[[8, 9]], -k_pool[[8, 9]])
    qk, sk = quantize_blocks(values)
    storage.swap_in(NumpyHostBlocks(qk, qk, "int8", sk, sk), [3, 4])
    k_pool, _ = storage.to_numpy(0)
    expected = dequantize_blocks(qk[0], sk[0])
    if dtype in ("float16", "bfloat16"):
        np.testing.assert_allclose(k_pool[[3, 4]], expected, rtol=8e-3)
    else:
        np.testing.assert_array_equal(k_pool[[3, 4]], expected)


def _peak_growth(action) -> int:
    """Bytes MLX allocated at peak during ``action`` beyond what was live before it."""
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    action()
    return mx.get_peak_memory() - before


@pytest.mark.parametrize("dtype", DTYPES)
def test_updates_happen_in_place(backend, rng, dtype):
    """write, copy_blocks, swap_in, and a write after attention, never copy a pool (MLX donates its buffer).

    A copy would allocate a whole pool array at peak; the control at the end
    shows the measurement sees one when an evaluated view keeps the old pool alive.
    """
    from pagedkv_mlx.attention import MlxAttention

    storage = backend.create_storage(make_config(dtype, num_blocks=512, block_size=16, heads=2, head_dim=32), "cpu")
    pool_bytes = storage.k.nbytes
    k, v = (mx.array(x) for x in random_kv(rng, 8, storage.config))
    mx.eval(k, v)
    slots = np.arange(8) * 16 + 3
    host = storage.swap_out([3, 4])
    q = backend.asarray(rng.standard_normal((2, 4, 32)), "cpu", "float32" if dtype == "int8" else dtype)
    write = lambda: storage.write(1, slots, k, v)  # noqa: E731
    for name, update in {"write": write, "copy_blocks": lambda: storage.copy_blocks([1, 2], [5, 6]),
                         "swap_in": lambda: storage.swap_in(host, [7, 8])}.items():
        assert _peak_growth(update) < pool_bytes // 4, f"{name} copied a pool"
    outputs = []
    for kernel in ("host", "mlx"):  # the mlx kernel's output stays lazy across the write
        outputs.append(MlxAttention(kernel).decode(q, storage, 1, [[0, 1], [2, 3]], [20, 9]))
        assert _peak_growth(write) < pool_bytes // 4, f"the write after {kernel} attention copied a pool"
    mx.eval(outputs)
    view = storage.k[:, :1]
    mx.eval(view)
    assert _peak_growth(lambda: storage.write(1, slots, k, v)) >= pool_bytes
