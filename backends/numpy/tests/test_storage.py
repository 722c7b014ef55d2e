"""NumPy block storage: scatter/gather, int8 with per-(block, head) scales, copies and swaps, bad input."""

import numpy as np
import pytest

from pagedkv_core import (
    CacheConfig,
    InvalidArgument,
    InvalidBlock,
    NumpyHostBlocks,
    OutOfBounds,
    ShapeMismatch,
    UnsupportedOperation,
)
from pagedkv_core.errors import DTypeMismatch
from pagedkv_numpy.storage import NumpyStorage


def config(dtype="float32", **kw):
    values = dict(num_layers=3, num_kv_heads=2, head_dim=8, num_blocks=10, block_size=4, dtype=dtype)
    values.update(kw)
    return CacheConfig(**values)


def random_kv(n, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 2, 8)) * scale).astype(np.float32), (rng.standard_normal((n, 2, 8)) * scale).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_write_then_gather_is_bit_exact_across_shuffled_blocks(dtype):
    storage = NumpyStorage(config(dtype))
    table = np.array([7, 2, 9, 0], np.int32)  # non-monotonic
    k, v = random_kv(14)
    slots = np.array([table[p // 4] * 4 + p % 4 for p in range(14)])
    storage.write(1, slots, k.astype(dtype), v.astype(dtype))
    gk, gv = storage.gather(1, table, 14)
    np.testing.assert_array_equal(gk, k.astype(dtype))
    np.testing.assert_array_equal(gv, v.astype(dtype))
    assert not storage.to_numpy(0)[0].any()  # other layers untouched


def test_int8_write_keeps_per_block_head_error_bound_and_rescales():
    storage = NumpyStorage(config("int8"))
    small_k, small_v = random_kv(2, seed=1, scale=0.01)
    big_k, big_v = random_kv(2, seed=2, scale=10.0)
    storage.write(0, np.array([4, 5]), small_k, small_v)
    storage.write(0, np.array([6, 7]), big_k, big_v)  # same block: the scale grows, old values requantized
    k, _ = storage.gather(0, np.array([1]), 4)
    want = np.concatenate([small_k, big_k])
    step = np.abs(want).max(axis=(0, 2)) / 127  # final scale per head
    assert (np.abs(k - want) <= step[None, :, None] * 1.01).all()
    assert storage.k_scale[0, 1].tolist() == pytest.approx(step.tolist(), rel=1e-6)


def test_copy_blocks_moves_every_layer_bit_exactly():
    storage = NumpyStorage(config())
    for layer in range(3):
        k, v = random_kv(8, seed=layer)
        storage.write(layer, np.arange(8), k, v)
    before = [storage.to_numpy(layer) for layer in range(3)]
    storage.copy_blocks([0, 1], [5, 8])
    for layer in range(3):
        k, v = storage.to_numpy(layer)
        np.testing.assert_array_equal(k[[5, 8]], before[layer][0][[0, 1]])
        np.testing.assert_array_equal(v[[5, 8]], before[layer][1][[0, 1]])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_swap_out_and_in_round_trip(dtype):
    storage = NumpyStorage(config(dtype))
    k, v = random_kv(12, seed=3)
    storage.write(2, np.arange(12), k, v)
    before = storage.to_numpy(2)
    host = storage.swap_out([0, 1, 2])
    assert host.num_blocks == 3 and host.nbytes > 0
    storage.swap_in(host, [9, 4, 6])
    after = storage.to_numpy(2)
    np.testing.assert_array_equal(after[0][[9, 4, 6]], before[0][[0, 1, 2]])
    np.testing.assert_array_equal(after[1][[9, 4, 6]], before[1][[0, 1, 2]])


def test_quantized_swap_out_shrinks_and_dequantizes_on_the_way_in():
    storage = NumpyStorage(config("float32"))
    k, v = random_kv(8, seed=4)
    storage.write(0, np.arange(8), k, v)
    host = storage.swap_out([0, 1], quantize="int8")
    assert host.dtype == "int8" and host.k.dtype == np.int8
    full = storage.swap_out([0, 1])
    assert host.nbytes < full.nbytes / 3
    storage.swap_in(host, [5, 6])
    got, _ = storage.gather(0, np.array([5, 6]), 8)
    np.testing.assert_allclose(got, k, atol=np.abs(k).max() / 127 * 0.51)


def test_swap_in_accepts_blocks_from_another_dtype():
    src = NumpyStorage(config("float64"))
    k, v = random_kv(4, seed=5)
    src.write(0, np.arange(4), k.astype(np.float64), v.astype(np.float64))
    dst = NumpyStorage(config("float32"))
    dst.swap_in(src.swap_out([0]), [3])
    np.testing.assert_array_equal(dst.gather(0, np.array([3]), 4)[0], k)


def test_nbytes_counts_pools_and_scales():
    assert NumpyStorage(config()).nbytes == 2 * 3 * 10 * 4 * 2 * 8 * 4
    assert NumpyStorage(config("int8")).nbytes == 2 * 3 * 10 * 4 * 2 * 8 + 2 * 3 * 10 * 2 * 4


@pytest.mark.parametrize("call, error", [
    (lambda s, k, v: s.write(3, np.arange(4), k, v), InvalidArgument),
    (lambda s, k, v: s.write(0, np.arange(3), k, v), ShapeMismatch),
    (lambda s, k, v: s.write(0, np.array([0, 1, 2, 40]), k, v), InvalidBlock),
    (lambda s, k, v: s.write(0, np.array([0, 1, 2, -2]), k, v), InvalidBlock),
    (lambda s, k, v: s.write(0, np.arange(4), k[:, :1], v[:, :1]), ShapeMismatch),
    (lambda s, k, v: s.write(0, np.arange(4), k.astype(np.int32), v), DTypeMismatch),
    (lambda s, k, v: s.write(0, np.arange(4.0), k, v), InvalidArgument),
    (lambda s, k, v: s.gather(0, np.array([0, 11]), 8), InvalidBlock),
    (lambda s, k, v: s.gather(0, np.array([0]), 5), OutOfBounds),
    (lambda s, k, v: s.gather(0, np.array([0]), -1), InvalidArgument),
    (lambda s, k, v: s.copy_blocks([0, 1], [2]), ShapeMismatch),
    (lambda s, k, v: s.copy_blocks([0, 1], [2, 2]), InvalidArgument),
    (lambda s, k, v: s.copy_blocks([0, 1], [1, 2]), InvalidArgument),
    (lambda s, k, v: s.copy_blocks([0], [10]), InvalidBlock),
    (lambda s, k, v: s.swap_out([10]), InvalidBlock),
    (lambda s, k, v: s.swap_out([0], quantize="int4"), UnsupportedOperation),
    (lambda s, k, v: s.swap_in(s.swap_out([0, 1]), [3]), ShapeMismatch),
    (lambda s, k, v: s.swap_in(s.swap_out([0, 1]), [3, 3]), InvalidArgument),
    (lambda s, k, v: s.swap_in(NumpyHostBlocks(np.zeros((3, 1, 4, 2, 7)), np.zeros((3, 1, 4, 2, 7)), "float32"),
                               [3]), ShapeMismatch),
], ids=["layer", "slots-short", "slot-past-pool", "slot-negative", "kv-heads", "kv-dtype", "slot-dtype",
        "table-id", "seq-past-table", "seq-negative", "copy-lengths", "copy-dup-dst", "copy-overlap",
        "copy-id", "swap-id", "swap-kind", "swap-in-count", "swap-in-dup", "swap-in-shape"])
def test_bad_input_raises_and_changes_nothing(call, error):
    storage = NumpyStorage(config())
    k, v = random_kv(4, seed=6)
    storage.write(0, np.arange(4), k, v)
    before = storage.k.copy(), storage.v.copy()
    with pytest.raises(error):
        call(storage, k, v)
    np.testing.assert_array_equal(storage.k, before[0])
    np.testing.assert_array_equal(storage.v, before[1])


def test_unsupported_dtype_and_device():
    with pytest.raises(UnsupportedOperation):
        NumpyStorage(config("bfloat16"))
    with pytest.raises(InvalidArgument):
        NumpyStorage(config(), device="cuda:0")
