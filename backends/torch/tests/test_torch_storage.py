"""Storage round-trips: write / to_numpy / gather / copy_blocks, against the NumPy backend's storage."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import fill, make_config  # noqa: E402

from pagedkv_numpy.storage import NumpyStorage  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def _random_kv(rng, n, config, scale=1.0):
    shape = (n, config.num_kv_heads, config.head_dim)
    return (rng.standard_normal(shape).astype(np.float32) * scale,
            rng.standard_normal(shape).astype(np.float32) * scale)


def _expected_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a pool of ``dtype`` holds after storing float32 ``x``."""
    return torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_then_to_numpy(backend, dtype):
    rng = np.random.default_rng(1)
    config = make_config(dtype)
    storage = backend.create_storage(config, "cpu")
    reference = NumpyStorage(make_config("float32" if dtype in ("float16", "bfloat16") else dtype))
    slots = rng.permutation(config.num_blocks * config.block_size)[:50]
    for scale in (1.0, 3.0):  # the second write raises int8 scales: existing values are requantized
        k, v = _random_kv(rng, slots.size, config, scale)
        storage.write(1, slots, torch.from_numpy(k), torch.from_numpy(v))
        reference.write(1, slots, k, v)
    k_pool, v_pool = storage.to_numpy(1)
    want_k, want_v = reference.to_numpy(1)
    assert k_pool.shape == (config.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
    if dtype == "int8":  # the same arithmetic as the host reference, bit for bit
        np.testing.assert_array_equal(storage.k.numpy(), reference.k)
        np.testing.assert_array_equal(storage.k_scale.numpy(), reference.k_scale)
        np.testing.assert_array_equal(k_pool, want_k)
        np.testing.assert_array_equal(v_pool, want_v)
    else:
        np.testing.assert_array_equal(k_pool, _expected_float(want_k, dtype))
        np.testing.assert_array_equal(v_pool, _expected_float(want_v, dtype))
    untouched = storage.to_numpy(0)[0]
    assert not untouched.any()


def test_slot_minus_one_is_skipped(backend):
    rng = np.random.default_rng(2)
    config = make_config()
    storage = backend.create_storage(config, "cpu")
    k, v = _random_kv(rng, 4, config)
    storage.write(0, np.array([3, -1, 9, -1]), torch.from_numpy(k), torch.from_numpy(v))
    pool = storage.to_numpy(0)[0].reshape(-1, config.num_kv_heads, config.head_dim)
    np.testing.assert_array_equal(pool[[3, 9]], k[[0, 2]])
    assert np.count_nonzero(np.abs(pool).sum(axis=(1, 2))) == 2
    storage.write(0, np.array([-1, -1]), torch.from_numpy(k[:2]), torch.from_numpy(v[:2]))  # all padding


def test_to_numpy_is_a_snapshot(backend):
    storage = backend.create_storage(make_config(), "cpu")
    k_pool, _ = storage.to_numpy(0)
    storage.write(0, [0], torch.ones(1, 2, 32), torch.ones(1, 2, 32))
    assert not k_pool.any()  # unchanged by the write: a copy, not a view
    assert not np.shares_memory(backend.to_numpy(storage.k), storage.k.numpy())


def test_writes_are_not_recorded_by_autograd(backend):
    storage = backend.create_storage(make_config(), "cpu")
    k = torch.ones(1, 2, 32, requires_grad=True)
    storage.write(0, [3], k * 2, k * 3)
    assert not storage.k.requires_grad and float(storage.k[0, 0, 3, 0, 0]) == 2.0


@pytest.mark.parametrize("slot_dtype", ["int64", "int32"])
def test_write_takes_tensor_slots(backend, slot_dtype):
    rng = np.random.default_rng(3)
    config = make_config()
    storage = backend.create_storage(config, "cpu")
    k, v = _random_kv(rng, 3, config)
    slots = torch.tensor([5, 0, 17], dtype=getattr(torch, slot_dtype))
    storage.write(1, slots, torch.from_numpy(k), torch.from_numpy(v))
    pool = storage.to_numpy(1)[1].reshape(-1, config.num_kv_heads, config.head_dim)
    np.testing.assert_array_equal(pool[[5, 0, 17]], v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_follows_the_block_table(backend, dtype):
    from pagedkv_conformance.oracle import gather_sequence

    rng = np.random.default_rng(4)
    storage = backend.create_storage(make_config(dtype), "cpu")
    fill(backend, storage, rng)
    table = np.array([7, 2, 19, 0], np.int32)
    k, v = storage.gather(1, table, 27)
    k_pool, v_pool = storage.to_numpy(1)
    assert tuple(k.shape) == (27, 2, 32)
    np.testing.assert_array_equal(backend.to_numpy(k), gather_sequence(k_pool, table, 27).astype(np.float32))
    np.testing.assert_array_equal(backend.to_numpy(v), gather_sequence(v_pool, table, 27).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nbytes_and_accessors(backend, dtype):
    config = make_config(dtype)
    storage = backend.create_storage(config, "cpu")
    assert storage.nbytes == config.bytes_per_block * config.num_blocks
    k, v = storage.pools(1)
    assert tuple(k.shape) == (config.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
    assert k.data_ptr() == storage.k[1].data_ptr()  # live views, not copies
    scales = storage.scales(0)
    assert (scales is not None) == (dtype == "int8")
    if scales is not None:
        assert tuple(scales[0].shape) == (config.num_blocks, config.num_kv_heads)
    storage.synchronize()
