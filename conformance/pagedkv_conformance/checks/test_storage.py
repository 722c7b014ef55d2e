"""Storage: write/gather round trips, slots across block boundaries, shuffled tables, padding slots."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import input_dtype, make_config, make_storage, random_tables, slots_for
from pagedkv_core.dtypes import is_quantized

pytestmark = pytest.mark.pagedkv_area("storage")


def _roundtrip_values(target, x: np.ndarray, dtype: str) -> np.ndarray:
    """What the backend stores for ``x`` in ``dtype`` (its own rounding), as float64."""
    return np.asarray(target.backend.to_numpy(target.backend.asarray(x, target.device, dtype)), np.float64)


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_write_then_gather_round_trip(target, dtype, block_size):
    rng = np.random.default_rng(block_size)
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 1]
    config = make_config(dtype, block_size=block_size, num_blocks=16, head_dim=64)
    storage = make_storage(target, config)
    tables = random_tables(rng, seq_lens, block_size, config.num_blocks)
    slots = slots_for(tables, seq_lens, block_size)
    k = rng.standard_normal((slots.size, 2, 64)).astype(np.float32)
    v = rng.standard_normal((slots.size, 2, 64)).astype(np.float32)
    kind = input_dtype(dtype)
    storage.write(1, slots, target.backend.asarray(k, target.device, kind), target.backend.asarray(v, target.device, kind))
    start = 0
    for row, n in enumerate(seq_lens):
        gk, gv = storage.gather(1, tables[row], n)
        gk, gv = np.asarray(target.backend.to_numpy(gk), np.float64), np.asarray(target.backend.to_numpy(gv), np.float64)
        want_k, want_v = k[start:start + n], v[start:start + n]
        start += n
        if is_quantized(dtype):
            for got, want in ((gk, want_k), (gv, want_v)):
                step = np.abs(want).max() / 127  # per (block, head) scales are at most this
                np.testing.assert_allclose(got, want, atol=step * 0.51 + 1e-7, err_msg=f"seq {row} int8 error")
        else:
            np.testing.assert_array_equal(gk, _roundtrip_values(target, want_k, dtype), err_msg=f"K of seq {row}")
            np.testing.assert_array_equal(gv, _roundtrip_values(target, want_v, dtype), err_msg=f"V of seq {row}")
    other_k, _ = storage.to_numpy(0)
    assert not np.asarray(other_k).any(), "writing layer 1 changed layer 0"


def test_padding_slots_are_skipped(target, dtype):
    config = make_config(dtype, block_size=4, num_blocks=4, head_dim=64)
    storage = make_storage(target, config)
    x = np.ones((3, 2, 64), np.float32)
    kind = input_dtype(dtype)
    storage.write(0, np.array([2, -1, 9]), target.backend.asarray(x, target.device, kind),
                  target.backend.asarray(x, target.device, kind))
    k, _ = storage.to_numpy(0)
    filled = np.asarray(k).reshape(16, -1).any(axis=1)
    assert filled.nonzero()[0].tolist() == [2, 9]


def test_nbytes_covers_the_pools(target, dtype):
    config = make_config(dtype, num_blocks=8)
    storage = make_storage(target, config)
    values = 2 * config.num_layers * config.num_blocks * config.block_size * config.num_kv_heads * config.head_dim
    assert storage.nbytes >= values * (1 if is_quantized(dtype) else 2)


def test_to_numpy_is_a_snapshot(target, dtype):
    config = make_config(dtype, block_size=4, num_blocks=4, head_dim=64)
    storage = make_storage(target, config)
    first, _ = storage.to_numpy(0)
    x = np.ones((1, 2, 64), np.float32)
    native = target.backend.asarray(x, target.device, input_dtype(dtype))
    storage.write(0, np.array([5]), native, native)
    storage.synchronize()
    assert not np.asarray(first).any(), "to_numpy returned a live view: a later write changed it"
    assert np.asarray(storage.to_numpy(0)[0]).any()
