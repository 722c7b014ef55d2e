"""Batch export: padded tables, slot mapping, query offsets and the CSR form agree with the block tables."""

import numpy as np
import pytest

from kvhelpers import request


@pytest.fixture
def batch(make_manager):
    m = make_manager(num_blocks=32)
    for rid, n in (("a", 1), ("b", 4), ("c", 5), ("d", 13)):
        m.allocate(request(rid, n=n))
    return m


def test_decode_metadata(batch):
    meta = batch.batch_metadata(["c", "a", "d"])
    tables = [batch.get_handle(r).block_table for r in ("c", "a", "d")]
    assert meta.block_tables.dtype == np.int32 and meta.block_tables.shape == (3, 4)
    assert meta.seq_lens.tolist() == [5, 1, 13]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3]
    assert meta.slot_mapping.tolist() == [t.slot(t.num_tokens - 1) for t in tables]
    for row, t in zip(meta.block_tables, tables):
        assert row[:t.num_blocks].tolist() == list(t.block_ids) and (row[t.num_blocks:] == -1).all()
    assert meta.is_decode and meta.batch == 3


def test_prefill_metadata_covers_the_last_tokens(batch):
    meta = batch.batch_metadata(["b", "d"], [4, 3])
    tb, td = batch.get_handle("b").block_table, batch.get_handle("d").block_table
    assert meta.query_start_loc.tolist() == [0, 4, 7]
    assert meta.slot_mapping.tolist() == [tb.slot(p) for p in range(4)] + [td.slot(p) for p in (10, 11, 12)]
    assert not meta.is_decode and meta.num_new_tokens == 7


def test_csr_form(batch):
    meta = batch.batch_metadata(["a", "b", "c", "d"])
    tables = [batch.get_handle(r).block_table for r in "abcd"]
    assert meta.indptr.tolist() == [0, 1, 2, 4, 8]
    assert meta.indices.tolist() == [b for t in tables for b in t.block_ids]
    assert meta.last_page_len.tolist() == [1, 4, 1, 1]


def test_append_slots_returns_the_step_metadata(batch):
    meta = batch.append_slots(["a", "b"], [10, 11])
    assert meta.seq_lens.tolist() == [2, 5]
    tb = batch.get_handle("b").block_table
    assert meta.slot_mapping[1] == tb.slot(4)


def test_rows_grow_past_the_initial_capacity(make_manager):
    m = make_manager(num_blocks=256, max_seq_len=8)
    for i in range(100):
        m.allocate(request(f"s{i}", n=1))
    meta = m.batch_metadata([f"s{i}" for i in range(100)])
    assert meta.block_tables.shape == (100, 1) and len(set(meta.block_tables[:, 0])) == 100
    m.check_invariants()
