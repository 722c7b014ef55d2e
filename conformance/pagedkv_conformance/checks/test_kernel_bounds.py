"""Bad input at the lowest kernel entry: a hand-made ``BatchIndex`` through ``plan_index`` never reads outside the pool.

``plan(...)`` validates raw arrays with ``check_batch``; ``plan_index(storage,
index, params)`` takes a :class:`~pagedkv_core.contract.attention.BatchIndex` as
given (an engine that builds metadata with the manager calls it to skip the
conversion), so nothing above the backend stands between a wrong id and the
kernel. Each case builds the index by hand, bypassing ``check_batch``, and
requires the typed error of :mod:`pagedkv_core.errors` — from
``plan_index`` or from the plan's ``run``, whichever the backend checks in —
with the pools unchanged. A kernel that read the block instead would crash
the run or return garbage; both fail here (a crash ends the pytest process,
which the run reports as a failure). A valid hand-made index, padded with
ids far outside the pool where no sequence reaches, must give ``plan``'s output.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import assert_close, make_config, make_query, make_storage, storage_state, write_random
from pagedkv_core import errors
from pagedkv_core.contract.attention import AttentionParams, BatchIndex

pytestmark = pytest.mark.pagedkv_area("bad_input")

NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, Q_HEADS, LAYER = 8, 4, 64, 4, 1
TABLES = np.array([[3, 1, -1], [0, 2, 5]], np.int64)  # 7 tokens reach blocks 3, 1; 10 tokens reach 0, 2, 5
LENS = np.array([7, 10], np.int64)
QSL = np.array([0, 2, 5], np.int64)  # prefill: 2 and 3 queries at the end of each sequence
KINDS = ("decode", "prefill")


def _index(kind: str, tables=TABLES, lens=LENS, qsl=None, query_lens=None) -> BatchIndex:
    """A BatchIndex made by hand, as an engine would: no check_batch in between."""
    tables, lens = np.asarray(tables, np.int64), np.asarray(lens, np.int64)
    if qsl is None:
        qsl = np.arange(lens.size + 1, dtype=np.int64) if kind == "decode" else QSL
    qsl = np.asarray(qsl, np.int64)
    query_lens = np.diff(qsl) if query_lens is None else np.asarray(query_lens, np.int64)
    return BatchIndex(tables, lens, qsl, query_lens, kind == "decode")


def _with(row: int, col: int, block_id: int) -> np.ndarray:
    tables = TABLES.copy()
    tables[row, col] = block_id
    return tables


# name -> (kinds, build(kind) -> BatchIndex, error, the bad block id an InvalidBlock must carry)
CASES = {
    "block-id-100": (KINDS, lambda k: _index(k, _with(0, 1, 100)), errors.InvalidBlock, 100),
    "block-id-1e6": (KINDS, lambda k: _index(k, _with(1, 2, 10**6)), errors.InvalidBlock, 10**6),
    "block-id-minus-1": (KINDS, lambda k: _index(k, _with(1, 0, -1)), errors.InvalidBlock, -1),
    "block-id-past-int32": (KINDS, lambda k: _index(k, _with(0, 0, 2**32 + 3)), errors.InvalidBlock, 2**32 + 3),
    "seq-len-past-table": (KINDS, lambda k: _index(k, lens=[7, 13]), errors.OutOfBounds, None),
    "decode-empty-sequence": (("decode",), lambda k: _index(k, lens=[7, 0]), errors.InvalidArgument, None),
    "seq-lens-shape": (KINDS, lambda k: _index(k, lens=[7, 10, 3], qsl=[0, 1, 2, 3] if k == "decode" else
                                                [0, 2, 5, 6]), errors.ShapeMismatch, None),
    "query-lens-disagree": (KINDS, lambda k: _index(k, query_lens=[1, 2]), errors.InvalidArgument, None),
}
PARAMS = [pytest.param(name, kind, id=f"{kind}-{name}") for name, (kinds, *_) in CASES.items() for kind in kinds]


@pytest.fixture
def setup(target, dtype):
    attention = target.backend.attention
    if not callable(getattr(attention, "plan_index", None)):
        pytest.skip(f"{target.id}: its attention has no plan_index (it implements only the Attention protocol, "
                    "whose plan validates the raw arrays), so there is no lower kernel entry to check")
    storage = make_storage(target, make_config(dtype, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                               head_dim=HEAD_DIM))
    write_random(target, storage, np.arange(NUM_BLOCKS * BLOCK_SIZE), np.random.default_rng(0))
    return attention, storage


def _needs(target, kind: str) -> None:
    if kind not in target.capabilities.kernels:
        pytest.skip(f"{target.id} has no {kind} kernel")


def _query(target, dtype: str, index: BatchIndex):
    return make_query(target, np.random.default_rng(1), int(index.query_start_loc[-1]), Q_HEADS, HEAD_DIM, dtype)[0]


@pytest.mark.parametrize("case, kind", PARAMS)
def test_hand_made_index_out_of_range_raises(target, dtype, setup, case, kind):
    _needs(target, kind)
    attention, storage = setup
    _, build, error, bad_id = CASES[case]
    index = build(kind)
    q = _query(target, dtype, index)
    before = storage_state(target, storage)
    with pytest.raises(error) as info:
        attention.plan_index(storage, index, AttentionParams.make(HEAD_DIM)).run(q, LAYER)
    if bad_id is not None:
        assert info.value.block_id == bad_id, f"InvalidBlock names block {info.value.block_id}, the bad one is {bad_id}"
    for got, want in zip(storage_state(target, storage), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_hand_made_valid_index_matches_plan(target, dtype, setup, kind):
    """Padding past a sequence's last block is never read, whatever it holds; the result is ``plan``'s."""
    _needs(target, kind)
    attention, storage = setup
    padded = _with(0, 2, 10**6)  # row 0's 7 tokens reach two blocks: column 2 is padding
    index = _index(kind, padded)
    q = _query(target, dtype, index)
    params = AttentionParams.make(HEAD_DIM, sliding_window=6)
    got = attention.plan_index(storage, index, params).run(q, LAYER)
    qsl = None if kind == "decode" else QSL.astype(np.int32)
    want = attention.plan(storage, TABLES.astype(np.int32), LENS.astype(np.int32), qsl,
                          sliding_window=6).run(q, LAYER)
    assert_close(target, got, np.asarray(target.backend.to_numpy(want), np.float64), kind, dtype,
                 f"{kind} through plan_index with a hand-made index vs plan")
