"""The compiled CPU decode kernel checks block ids and lengths itself (issue #15, item 10).

A ``NativeDecodePlan`` may be built from a hand-made ``BatchIndex``
(``TorchAttention.plan_index``, or the class directly), and no Python bounds
check runs on that path: the C ``decode`` checks every sequence's length
against the table width and every block id its length reaches against
``num_blocks`` before it reads anything, and ``run`` raises the typed error.
These tests also run under AddressSanitizer and UBSan
(``test_torch_native_sanitized.py``), which would catch a read the check let through.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_core.contract.attention import AttentionParams, BatchIndex  # noqa: E402
from pagedkv_core.errors import (  # noqa: E402
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    OutOfBounds,
    ShapeMismatch,
)
from pagedkv_torch import native_decode, plan_base  # noqa: E402
from pagedkv_torch.attention import TorchAttention  # noqa: E402
from pagedkv_torch.native_decode import NativeDecodePlan, native_unavailable_reason, native_variant  # noqa: E402

pytestmark = pytest.mark.skipif(native_unavailable_reason() is not None, reason=str(native_unavailable_reason()))

LENS = [17, 5, 40, 1, 8]  # block size 8: 3, 1, 5, 1 and 1 blocks
VARIANTS = [v for v in ("generic", "avx2", "avx512")
            if native_variant() is not None
            and ("generic", "avx2", "avx512").index(v) <= ("generic", "avx2", "avx512").index(native_variant())]


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request):
    with _torch_threads(request.param):
        yield request.param


@pytest.fixture
def no_python_bounds_check(monkeypatch):
    """Make sure the error comes from C: the Python bounds check would fail the test if the plan called it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("NativeDecodePlan must leave id and length checks to the kernel")

    monkeypatch.setattr(plan_base, "check_index_bounds", forbidden)


def _hand_made(tables, lens) -> BatchIndex:
    lens = np.asarray(lens, np.int64)
    return BatchIndex(np.asarray(tables, np.int64), lens, np.arange(lens.size + 1, dtype=np.int64),
                      np.ones(lens.size, np.int64), True)


def _setup(backend, dtype="float32", lens=LENS):
    rng = np.random.default_rng(70)
    batch = make_batch(backend, make_config(dtype, blocks=24), rng, lens, pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    return batch, q, q_np


def _plan(batch, tables=None, lens=None, variant="auto", **kw) -> NativeDecodePlan:
    tables = batch.block_tables if tables is None else tables
    lens = batch.seq_lens if lens is None else lens
    params = AttentionParams.make(batch.storage.config.head_dim, **kw)
    return NativeDecodePlan(batch.storage, _hand_made(tables, lens), params, variant)


@pytest.mark.parametrize("bad_id", [100, 10**6, -1, 24, 2**31, 2**32 + 3],
                         ids=["100", "1e6", "-1", "num_blocks", "2^31", "past int32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_out_of_range_block_id_raises_with_the_id(backend, no_python_bounds_check, variant, bad_id, threads):
    batch, q, _ = _setup(backend, "bfloat16")
    tables = batch.block_tables.astype(np.int64)
    tables[2, 3] = bad_id  # sequence 2 (40 tokens) reads five blocks
    plan = _plan(batch, tables, variant=variant)
    with pytest.raises(InvalidBlock) as info:
        plan.run(q, 0)
    assert info.value.block_id == bad_id and info.value.num_blocks == 24
    assert "block_tables[2, 3]" in str(info.value)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_ids_before_a_sliding_window_are_checked_too(backend, no_python_bounds_check, dtype):
    """The kernel reads only the window's blocks, but the same index must fail the same way on every path."""
    batch, q, _ = _setup(backend, dtype)
    tables = batch.block_tables.astype(np.int64)
    tables[2, 0] = 10**6
    with pytest.raises(InvalidBlock, match="block_tables\\[2, 0\\]"):
        _plan(batch, tables, sliding_window=8).run(q, 1)


def test_seq_len_past_the_table_raises(backend, no_python_bounds_check, threads):
    batch, q, _ = _setup(backend)
    width = batch.block_tables.shape[1]
    lens = batch.seq_lens.astype(np.int64)
    lens[1] = width * 8 + 1
    with pytest.raises(OutOfBounds) as info:
        _plan(batch, lens=lens).run(q, 0)
    assert (info.value.position, info.value.allocated) == (width * 8, width * 8)


@pytest.mark.parametrize("bad_len", [0, -5])
def test_empty_or_negative_sequence_raises(backend, no_python_bounds_check, bad_len, threads):
    """A decode query needs its own token in the cache; an empty sequence would divide 0 by 0."""
    batch, q, _ = _setup(backend)
    lens = batch.seq_lens.astype(np.int64)
    lens[4] = bad_len
    with pytest.raises(InvalidArgument, match=f"seq_lens\\[4\\] = {bad_len}"):
        _plan(batch, lens=lens).run(q, 0)


def test_the_first_bad_sequence_is_reported_on_any_thread_count(backend):
    batch, q, _ = _setup(backend)
    tables = batch.block_tables.astype(np.int64)
    tables[1, 0], tables[3, 0] = 500, 600
    for n in (1, 2, 4):
        with _torch_threads(n), pytest.raises(InvalidBlock) as info:
            _plan(batch, tables).run(q, 0)
        assert info.value.block_id == 500, f"{n} threads"


def test_ids_past_seq_len_are_padding_and_never_read(backend, no_python_bounds_check, threads):
    batch, q, q_np = _setup(backend, "float16")
    assert (batch.block_tables == 10**6).any()  # make_batch pads with 10**6
    out = _plan(batch).run(q, 1)
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 1), "float16", "padded hand-made index")


def test_a_failed_run_leaves_the_plan_and_the_thread_pool_usable(backend):
    """Every task is waited for before the error is raised; later runs on the same threads are unaffected."""
    batch, q, q_np = _setup(backend)
    tables = batch.block_tables.astype(np.int64)
    tables[0, 2] = -3
    bad, good = _plan(batch, tables), _plan(batch)
    with _torch_threads(3):
        for _ in range(3):
            with pytest.raises(InvalidBlock):
                bad.run(q, 0)
            assert_close(backend.to_numpy(good.run(q, 0)).astype(np.float64), oracle(batch, q_np, 0), "float32",
                         "valid plan after a failed one")


def test_the_kernel_reads_nothing_when_a_check_fails(backend):
    """``decode`` itself returns (kind, row, col, value) and leaves ``out`` untouched."""
    batch, q, _ = _setup(backend)
    c = batch.storage.config
    k, v = batch.storage.pools(0)
    tables = torch.from_numpy(batch.block_tables.astype(np.int64))
    tables[2, 4] = 24
    lens = torch.from_numpy(batch.seq_lens.astype(np.int64))
    qf = q.float().contiguous()
    out = torch.full_like(qf, 7.0)
    cd = native_decode._cpu_decode
    found = cd.decode(qf.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), 0, 0, tables.data_ptr(),
                      lens.data_ptr(), len(LENS), tables.shape[1], c.num_blocks, c.num_kv_heads, 2, c.head_dim,
                      c.block_size, 0, k.element_size(), c.num_kv_heads, 0, 0.1, 0.0, 0, len(LENS))
    assert found == (cd.BOUNDS_BAD_BLOCK, 2, 4, 24)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="past the batch"):
        cd.decode(qf.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), 0, 0, tables.data_ptr(),
                  lens.data_ptr(), len(LENS), tables.shape[1], c.num_blocks, c.num_kv_heads, 2, c.head_dim,
                  c.block_size, 0, k.element_size(), c.num_kv_heads, 0, 0.1, 0.0, 0, len(LENS) + 1)


def test_shapes_the_kernel_cannot_check_are_checked_in_python(backend):
    batch, _, _ = _setup(backend)
    params = AttentionParams.make(32)
    tables, lens = batch.block_tables.astype(np.int64), batch.seq_lens.astype(np.int64)
    qsl, ones = np.arange(lens.size + 1), np.ones(lens.size, np.int64)
    with pytest.raises(ShapeMismatch):  # more sequences than table rows: C would read past the table
        NativeDecodePlan(batch.storage, BatchIndex(tables[:3], lens, qsl, ones, True), params)
    with pytest.raises(InvalidArgument):  # num_queries != batch: C would read past q
        NativeDecodePlan(batch.storage, BatchIndex(tables, lens, np.array([0, 1, 2, 3, 4, 6]),
                                                   np.array([1, 1, 1, 1, 2]), False), params)
    with pytest.raises(DTypeMismatch):
        NativeDecodePlan(batch.storage, BatchIndex(tables.tolist(), lens, qsl, ones, True), params)
    with pytest.raises(DTypeMismatch):
        NativeDecodePlan(batch.storage, BatchIndex(tables.astype(np.float32), lens, qsl, ones, True), params)


def test_the_plan_owns_its_index(backend, threads):
    """Writing into the caller's arrays after planning changes nothing the kernel reads."""
    batch, q, q_np = _setup(backend)
    index = _hand_made(batch.block_tables, batch.seq_lens)
    plan = TorchAttention("native").plan_index(batch.storage, index, AttentionParams.make(32))
    index.block_tables[:] = 10**6
    index.seq_lens[:] = 0
    assert_close(backend.to_numpy(plan.run(q, 0)).astype(np.float64), oracle(batch, q_np, 0), "float32",
                 "index changed after planning")


def test_plan_index_matches_plan(backend, threads):
    batch, q, _ = _setup(backend, "bfloat16")
    attention = TorchAttention("native")
    params = AttentionParams.make(32, sliding_window=9, soft_cap=3.0)
    got = attention.plan_index(batch.storage, _hand_made(batch.block_tables, batch.seq_lens), params)
    want = attention.plan(batch.storage, batch.block_tables, batch.seq_lens, sliding_window=9, soft_cap=3.0)
    assert isinstance(got, NativeDecodePlan)
    assert torch.equal(got.run(q, 1), want.run(q, 1))
