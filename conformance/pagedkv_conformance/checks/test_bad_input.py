"""Bad input: wrong shapes, dtypes, devices, out-of-range block ids, negative lengths — clear errors, nothing changed."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import input_dtype, make_config, make_query, make_storage, storage_state, write_random
from pagedkv_core import errors
from pagedkv_core.dtypes import is_quantized

pytestmark = pytest.mark.pagedkv_area("bad_input")

TABLES = np.array([[3, 1, -1], [0, 2, 5]], np.int32)
LENS = np.array([7, 10], np.int32)


@pytest.fixture
def setup(target, dtype):
    storage = make_storage(target, make_config(dtype, num_blocks=6, block_size=4, head_dim=64))
    write_random(target, storage, np.arange(24), np.random.default_rng(0))
    q, _ = make_query(target, np.random.default_rng(1), 2, 4, 64, dtype)
    return storage, q


def _other_float(dtype: str) -> str:
    return "float16" if input_dtype(dtype) != "float16" else "float32"


ATTENTION_CASES = {
    "q-wrong-rank": (lambda t, s, q: t.backend.attention.decode(q[0], s, 0, TABLES, LENS), errors.ShapeMismatch),
    "q-wrong-batch": (lambda t, s, q: t.backend.attention.decode(q[:1], s, 0, TABLES, LENS), errors.ShapeMismatch),
    "q-heads-not-multiple": (lambda t, s, q: t.backend.attention.decode(q[:, :3], s, 0, TABLES, LENS),
                             errors.ShapeMismatch),
    "block-id-past-pool": (lambda t, s, q: t.backend.attention.decode(
        q, s, 0, np.array([[3, 9, -1], [0, 2, 5]], np.int32), LENS), errors.InvalidBlock),
    "negative-block-id": (lambda t, s, q: t.backend.attention.decode(
        q, s, 0, np.array([[3, -1, -1], [0, 2, 5]], np.int32), LENS), errors.InvalidBlock),
    "negative-seq-len": (lambda t, s, q: t.backend.attention.decode(q, s, 0, TABLES, np.array([7, -1], np.int32)),
                         errors.InvalidArgument),
    "seq-len-past-table": (lambda t, s, q: t.backend.attention.decode(q, s, 0, TABLES, np.array([7, 13], np.int32)),
                           errors.OutOfBounds),
    "seq-lens-shape": (lambda t, s, q: t.backend.attention.decode(q, s, 0, TABLES, LENS[:1]), errors.ShapeMismatch),
    "layer-out-of-range": (lambda t, s, q: t.backend.attention.decode(q, s, 5, TABLES, LENS), errors.InvalidArgument),
    "query-start-loc-decreasing": (lambda t, s, q: t.backend.attention.prefill(
        q, s, 0, TABLES, LENS, np.array([0, 2, 1], np.int32)), errors.InvalidArgument),
    "more-queries-than-tokens": (lambda t, s, q: t.backend.attention.prefill(
        q, s, 0, TABLES, np.array([0, 10], np.int32), np.array([0, 1, 2], np.int32)), errors.InvalidArgument),
    "negative-window": (lambda t, s, q: t.backend.attention.decode(q, s, 0, TABLES, LENS, sliding_window=-2),
                        errors.InvalidArgument),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_attention_rejects_bad_input(target, dtype, setup, case):
    storage, q = setup
    call, error = ATTENTION_CASES[case]
    before = storage_state(target, storage)
    with pytest.raises(error):
        call(target, storage, q)
    for got, want in zip(storage_state(target, storage), before):
        np.testing.assert_array_equal(got, want)


def test_query_of_another_dtype_is_rejected(target, dtype, setup):
    if is_quantized(dtype):
        pytest.skip("quantized pools accept any float query")
    storage, _ = setup
    q = target.backend.asarray(np.zeros((2, 4, 64), np.float32), target.device, _other_float(dtype))
    with pytest.raises(errors.DTypeMismatch):
        target.backend.attention.decode(q, storage, 0, TABLES, LENS)


STORAGE_CASES = {
    "slot-past-pool": (lambda s, kv: s.write(0, np.array([0, 24]), kv, kv), errors.InvalidBlock),
    "slot-below-minus-one": (lambda s, kv: s.write(0, np.array([0, -5]), kv, kv), errors.InvalidBlock),
    "slots-count": (lambda s, kv: s.write(0, np.array([0]), kv, kv), errors.ShapeMismatch),
    "kv-shape": (lambda s, kv: s.write(0, np.array([0, 1]), kv[:, :1], kv[:, :1]), errors.ShapeMismatch),
    "layer": (lambda s, kv: s.write(7, np.array([0, 1]), kv, kv), errors.InvalidArgument),
    "copy-past-pool": (lambda s, kv: s.copy_blocks([0], [6]), errors.InvalidBlock),
    "copy-overlap": (lambda s, kv: s.copy_blocks([0, 1], [1, 2]), errors.InvalidArgument),
    "swap-out-past-pool": (lambda s, kv: s.swap_out([6]), errors.InvalidBlock),
    "swap-in-count": (lambda s, kv: s.swap_in(s.swap_out([0, 1]), [4]), errors.ShapeMismatch),
    "gather-past-table": (lambda s, kv: s.gather(0, np.array([0]), 5), errors.OutOfBounds),
    "gather-negative-len": (lambda s, kv: s.gather(0, np.array([0]), -1), errors.InvalidArgument),
}


@pytest.mark.parametrize("case", list(STORAGE_CASES), ids=list(STORAGE_CASES))
def test_storage_rejects_bad_input(target, dtype, setup, case):
    storage, _ = setup
    call, error = STORAGE_CASES[case]
    kv = target.backend.asarray(np.ones((2, 2, 64), np.float32), target.device, input_dtype(dtype))
    before = storage_state(target, storage)
    with pytest.raises(error):
        call(storage, kv)
    for got, want in zip(storage_state(target, storage), before):
        np.testing.assert_array_equal(got, want)


def test_arrays_on_another_device_are_rejected(target, dtype, setup):
    others = [d for d in target.backend.devices() if d != target.device and target.backend.probe(d).available]
    if not others:
        pytest.skip(f"{target.id}: no second usable device to send arrays from")
    storage, _ = setup
    kv = target.backend.asarray(np.ones((2, 2, 64), np.float32), others[0], input_dtype(dtype))
    before = storage_state(target, storage)
    with pytest.raises(errors.DeviceMismatch):
        storage.write(0, np.array([0, 1]), kv, kv)
    for got, want in zip(storage_state(target, storage), before):
        np.testing.assert_array_equal(got, want)
