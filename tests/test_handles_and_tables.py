"""Handles belong to one admission; block tables cost what the sequences hold, not what the pool holds."""

import numpy as np
import pytest

from kvhelpers import request
from pagedkv_core import OutOfBounds, StaleHandle, UnknownSequence
from pagedkv_core.blocks.tables import TableArrays


def test_a_handle_goes_stale_when_its_id_is_admitted_again(manager):
    old = manager.allocate(request("a", n=9))
    old_blocks = old.block_table.block_ids
    manager.deallocate("a")
    assert not old.is_valid()
    new = manager.allocate(request("a", n=2))
    assert new.is_valid() and not old.is_valid()
    for read in (lambda h: h.block_table, lambda h: h.num_tokens, lambda h: h.stats(), lambda h: h.state,
                 lambda h: h.clone_handle("fork")):
        with pytest.raises(StaleHandle, match="stale handle"):
            read(old)
    assert not manager.has_sequence("fork")  # the stale handle forked nothing
    assert new.block_table.num_tokens == 2 and old_blocks != new.block_table.block_ids[:3]
    assert "valid=False" in repr(old)
    assert issubclass(StaleHandle, UnknownSequence)  # callers catching UnknownSequence keep working
    manager.check_invariants()


def test_a_handle_survives_swap_and_defragmentation(manager):
    handle = manager.allocate(request("a", n=6))
    manager.allocate(request("b", n=4))
    manager.deallocate("b")
    manager.swap_out("a")
    manager.swap_in("a")
    manager.defragment()
    assert handle.is_valid() and handle.num_tokens == 6
    assert manager.get_handle("a").block_table == handle.block_table


def test_rows_grow_with_the_sequence_not_with_the_pool(make_manager):
    manager = make_manager(num_blocks=65_536, block_size=4, num_host_blocks=0)
    for i in range(64):
        manager.allocate(request(f"s{i}", n=9))  # 3 blocks each
    small = manager.tables.tables.shape
    assert small[1] <= 32 and manager.tables.tables.nbytes <= 64 * 32 * 4
    manager.extend("s0", 400)  # 103 blocks: the array widens by doubling, up to what it needs
    assert 103 <= manager.tables.width <= 206 and manager.tables.max_width == 65_536
    meta = manager.batch_metadata(["s0", "s1"], [1, 1])
    assert meta.block_tables.shape == (2, 103) and (meta.block_tables[1, 3:] == -1).all()
    manager.trim("s0", 400)
    assert (manager.tables.tables[manager.get_record("s0").row, 3:] == -1).all()
    manager.check_invariants()


def test_a_decode_step_widens_the_table_when_a_block_starts_past_its_width(make_manager):
    manager = make_manager(num_blocks=256, block_size=1, num_host_blocks=0)
    manager.allocate(request("a", n=32))
    assert manager.tables.width == 32
    meta = manager.append_slots(["a"])
    assert manager.tables.width == 64 and meta.block_tables.shape == (1, 33)
    assert meta.slot_mapping[0] == meta.block_tables[0, 32]
    manager.check_invariants()


def test_max_seq_len_still_bounds_a_row(make_manager):
    manager = make_manager(num_blocks=64, block_size=4, max_seq_len=40)
    manager.allocate(request("a", n=40))
    with pytest.raises(OutOfBounds):
        manager.extend("a", 1)
    manager.check_invariants()


def test_table_arrays_touch_only_used_entries():
    tables = TableArrays(max_width=1_000_000, initial_rows=2, initial_width=4)
    row = tables.acquire()
    tables.set_row(row, [5, 6, 7], 10)
    tables.append(row, 3, 8)
    tables.append(row, 4, 9)  # past the width: doubles to 8
    assert tables.width == 8 and tables.used[row] == 5
    assert tables.tables[row].tolist() == [5, 6, 7, 8, 9, -1, -1, -1]
    tables.set_row(row, [1], 2)
    assert tables.tables[row].tolist() == [1] + [-1] * 7 and tables.used[row] == 1
    other = tables.acquire()
    third = tables.acquire()  # the rows double too, keeping the width
    assert tables.tables.shape == (4, 8) and other != third
    tables.release(row)
    assert (tables.tables[row] == -1).all() and tables.lens[row] == 0 and tables.used[row] == 0
    assert np.array_equal(tables.tables[third], np.full(8, -1))
