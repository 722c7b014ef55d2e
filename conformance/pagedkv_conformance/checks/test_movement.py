"""Data movement: copy_blocks, swap out/in (native and portable host blocks), defragmentation — bit-exact."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import make_config, make_storage, storage_state, write_random
from pagedkv_core import AllocationRequest, PagedKvCacheManager

pytestmark = pytest.mark.pagedkv_area("movement")


def _filled(target, dtype, num_blocks=12, block_size=4):
    config = make_config(dtype, num_layers=3, num_blocks=num_blocks, block_size=block_size, head_dim=64,
                         num_host_blocks=num_blocks)
    storage = make_storage(target, config)
    write_random(target, storage, np.arange(num_blocks * block_size), np.random.default_rng(1))
    return storage


def _blocks(state, ids):
    return [np.asarray(pool)[ids] for pool in state]


def test_copy_blocks_all_layers(target, dtype):
    storage = _filled(target, dtype)
    before = storage_state(target, storage)
    storage.copy_blocks([0, 5, 3], [9, 1, 11])
    storage.synchronize()
    after = storage_state(target, storage)
    for b, a in zip(_blocks(before, [0, 5, 3]), _blocks(after, [9, 1, 11])):
        np.testing.assert_array_equal(a, b)
    untouched = [2, 4, 6, 7, 8, 10]
    for b, a in zip(_blocks(before, untouched), _blocks(after, untouched)):
        np.testing.assert_array_equal(a, b)


def test_swap_out_and_in(target, dtype):
    storage = _filled(target, dtype)
    before = storage_state(target, storage)
    host = storage.swap_out([7, 2, 4])
    host.wait()
    assert host.num_blocks == 3
    storage.copy_blocks([0, 1, 3], [7, 2, 4])  # overwrite the originals
    storage.swap_in(host, [10, 6, 8])
    storage.synchronize()
    after = storage_state(target, storage)
    for b, a in zip(_blocks(before, [7, 2, 4]), _blocks(after, [10, 6, 8])):
        np.testing.assert_array_equal(a, b)


def test_swap_through_portable_numpy_blocks(target, dtype):
    storage = _filled(target, dtype)
    before = storage_state(target, storage)
    portable = storage.swap_out([3, 9]).to_numpy()
    assert isinstance(portable.k, np.ndarray)
    storage.swap_in(portable, [0, 1])
    storage.synchronize()
    for b, a in zip(_blocks(before, [3, 9]), _blocks(storage_state(target, storage), [0, 1])):
        np.testing.assert_array_equal(a, b)


def test_defragmentation_through_the_manager(target, dtype):
    storage = make_storage(target, make_config(dtype, num_blocks=16, block_size=4, head_dim=64))
    manager = PagedKvCacheManager(storage)
    rng = np.random.default_rng(2)
    for i in range(6):
        manager.allocate(AllocationRequest(f"s{i}", initial_tokens=7))
        write_random(target, storage, manager.batch_metadata([f"s{i}"], [7]).slot_mapping, rng)
    for i in (0, 2, 3):
        manager.deallocate(f"s{i}")

    def contents():
        out = []
        for rid in ("s1", "s4", "s5"):
            table = manager.get_handle(rid).block_table
            for layer in range(2):
                k, v = storage.gather(layer, np.asarray(table.block_ids, np.int32), table.num_tokens)
                out += [target.backend.to_numpy(k), target.backend.to_numpy(v)]
        return out

    before = contents()
    result = manager.defragment()
    assert result.moved_blocks > 0 and result.holes_after == 0
    for b, a in zip(before, contents()):
        np.testing.assert_array_equal(a, b)
    manager.check_invariants()
