"""Bad input fails with the typed errors of pagedkv_core.errors, before any state changes."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import assert_unchanged, fill, import_mlx, make_config, random_kv, snapshot

mx = import_mlx()

from pagedkv_core.contract.storage import NumpyHostBlocks  # noqa: E402
from pagedkv_core.errors import (  # noqa: E402
    BackendUnavailable,
    DeviceMismatch,
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    OutOfBounds,
    ShapeMismatch,
    UnsupportedOperation,
)
from pagedkv_mlx.attention import MlxAttention  # noqa: E402


@pytest.fixture(params=["float32", "int8"])
def storage(request, backend):
    storage = backend.create_storage(make_config(request.param), "cpu")
    fill(storage, np.random.default_rng(7))
    return storage


def _kv(storage, n=3):
    return random_kv(np.random.default_rng(3), n, storage.config)


WRITES = {
    "layer-out-of-range": (lambda s: (2, [0, 1, 2], *_kv(s)), InvalidArgument),
    "negative-layer": (lambda s: (-1, [0, 1, 2], *_kv(s)), InvalidArgument),
    "slot-past-pool": (lambda s: (0, [0, 1, 48 * 4], *_kv(s)), InvalidBlock),
    "slot-below-minus-one": (lambda s: (0, [0, -2, 5], *_kv(s)), InvalidBlock),
    "float-slots": (lambda s: (0, np.array([0.0, 1.0, 2.0]), *_kv(s)), InvalidArgument),
    "slots-wrong-length": (lambda s: (0, [0, 1], *_kv(s)), ShapeMismatch),
    "k-v-shapes-differ": (lambda s: (0, [0, 1, 2], _kv(s)[0], _kv(s, 4)[1]), ShapeMismatch),
    "wrong-head-dim": (lambda s: (0, [0, 1, 2], np.zeros((3, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32)),
                       ShapeMismatch),
    "integer-values": (lambda s: (0, [0, 1, 2], np.ones((3, 2, 8), np.int32), np.ones((3, 2, 8), np.int32)),
                       DTypeMismatch),
    "integer-mx-values": (lambda s: (0, [0, 1, 2], mx.ones((3, 2, 8), mx.int32), mx.ones((3, 2, 8), mx.int32)),
                          DTypeMismatch),
}


@pytest.mark.parametrize("case", list(WRITES), ids=list(WRITES))
def test_bad_write_changes_nothing(storage, case):
    make_args, error = WRITES[case]
    before = snapshot(storage)
    with pytest.raises(error):
        storage.write(*make_args(storage))
    assert_unchanged(storage, before)


def test_bad_block_moves_change_nothing(storage):
    before = snapshot(storage)
    with pytest.raises(InvalidBlock):
        storage.copy_blocks([1, 2], [3, 48])
    with pytest.raises(InvalidArgument):
        storage.copy_blocks([1, 2], [2, 5])  # dst overlaps src
    with pytest.raises(InvalidArgument):
        storage.copy_blocks([1, 2], [5, 5])  # dst repeats
    with pytest.raises(ShapeMismatch):
        storage.copy_blocks([1, 2], [5])
    with pytest.raises(InvalidBlock):
        storage.swap_out([0, -1])
    with pytest.raises(UnsupportedOperation):
        storage.swap_out([0], quantize="fp4")
    host = storage.swap_out([0, 1])
    with pytest.raises(ShapeMismatch):
        storage.swap_in(host, [5, 6, 7])
    with pytest.raises(InvalidArgument):
        storage.swap_in(host, [5, 5])
    with pytest.raises(InvalidBlock):
        storage.swap_in(host, [5, 99])
    shape = host.k.shape
    with pytest.raises(DTypeMismatch):
        storage.swap_in(NumpyHostBlocks(np.ones(shape, np.int32), np.ones(shape, np.int32), "int32"), [5, 6])
    scales = np.ones(shape[:2] + (shape[3],), np.float32)
    with pytest.raises(InvalidArgument):
        storage.swap_in(NumpyHostBlocks(np.ones(shape, np.int8), np.ones(shape, np.int8), "int8",
                                        scales, scales[:, :1]), [5, 6])
    with pytest.raises(OutOfBounds):
        storage.gather(0, [1, 2], 9)
    with pytest.raises(InvalidBlock):
        storage.gather(0, [1, 48], 5)
    assert_unchanged(storage, before)


ATTENTION = {  # (block_tables, seq_lens, query_start_loc, kwargs) -> error, raised by plan
    "block-outside-pool": (([[1, 2], [3, 48]], [5, 6], None, {}), InvalidBlock),
    "negative-block": (([[1, 2], [-1, 4]], [5, 6], None, {}), InvalidBlock),
    "seq-longer-than-table": (([[1, 2], [3, 4]], [5, 9], None, {}), OutOfBounds),
    "decode-empty-sequence": (([[1, 2], [3, 4]], [5, 0], None, {}), InvalidArgument),
    "lengths-wrong-shape": (([[1, 2], [3, 4]], [5, 6, 7], None, {}), ShapeMismatch),
    "table-not-2d": (([1, 2, 3], [5], None, {}), ShapeMismatch),
    "more-queries-than-tokens": (([[1, 2], [3, 4]], [5, 2], [0, 1, 4], {}), InvalidArgument),
    "query-offsets-decrease": (([[1, 2], [3, 4]], [5, 6], [0, 3, 2], {}), InvalidArgument),
    "bad-window": (([[1, 2]], [5], None, {"sliding_window": 0}), InvalidArgument),
    "bad-soft-cap": (([[1, 2]], [5], None, {"soft_cap": -1.0}), InvalidArgument),
    "bad-scale": (([[1, 2]], [5], None, {"scale": float("nan")}), InvalidArgument),
}


@pytest.mark.parametrize("case", list(ATTENTION), ids=list(ATTENTION))
def test_bad_batch_is_refused_by_plan(storage, case):
    (tables, lens, qsl, kwargs), error = ATTENTION[case]
    with pytest.raises(error):
        MlxAttention().plan(storage, np.array(tables), np.array(lens), None if qsl is None else np.array(qsl),
                            **kwargs)


@pytest.mark.parametrize("kernel", ["host", "mlx"])
def test_bad_query_is_refused_by_run(backend, storage, kernel):
    plan = MlxAttention(kernel).plan(storage, np.array([[1, 2], [3, 4]]), np.array([5, 6]))
    good = backend.asarray(np.zeros((2, 4, 8)), "cpu", "float32")
    with pytest.raises(DeviceMismatch):
        plan.run(np.zeros((2, 4, 8), np.float32), 0)
    with pytest.raises(ShapeMismatch):
        plan.run(good[:1], 0)  # one query for two sequences
    with pytest.raises(ShapeMismatch):
        plan.run(backend.asarray(np.zeros((2, 3, 8)), "cpu", "float32"), 0)  # 3 heads over 2 KV heads
    with pytest.raises(ShapeMismatch):
        plan.run(backend.asarray(np.zeros((2, 4, 4)), "cpu", "float32"), 0)
    with pytest.raises(InvalidArgument):
        plan.run(good, 2)
    with pytest.raises(DTypeMismatch):
        plan.run(good.astype(mx.int32), 0)
    if not storage.quantized:
        with pytest.raises(DTypeMismatch):
            plan.run(good.astype(mx.float16), 0)  # float pools need q in the pool's dtype
    assert plan.run(good, 1).shape == good.shape


def test_bad_storage_requests(backend):
    with pytest.raises(UnsupportedOperation):
        backend.create_storage(make_config("float64"), "cpu")
    with pytest.raises(InvalidArgument):
        backend.create_storage(make_config(), "tpu")
    with pytest.raises(InvalidArgument):
        MlxAttention(kernel="cuda")
    with pytest.raises(DeviceMismatch):
        MlxAttention().plan(object(), [[0]], [1])
    if not backend.probe("gpu").available:
        with pytest.raises(BackendUnavailable, match="no GPU"):
            backend.create_storage(make_config(), "gpu")


HAND_MADE = {  # (block_tables, seq_lens) of a hand-made BatchIndex (no check_batch) -> error; the pool has 48 blocks
    "block-id-100": (([[1, 100], [3, 4]], [5, 6]), InvalidBlock),
    "block-id-1e6": (([[1, 2], [3, 10**6]], [5, 6]), InvalidBlock),
    "block-id-minus-1": (([[-1, 2], [3, 4]], [5, 6]), InvalidBlock),
    "seq-len-past-table": (([[1, 2], [3, 4]], [5, 9]), OutOfBounds),
}


@pytest.mark.parametrize("kernel", ["host", "mlx"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", list(HAND_MADE), ids=list(HAND_MADE))
def test_hand_made_index_is_refused_by_plan_index(backend, storage, case, prefill, kernel):
    """Both kernels gather through the ids unchecked (MLX's take would read anywhere): the plan checks first."""
    from pagedkv_core.contract.attention import AttentionParams, BatchIndex

    (tables, lens), error = HAND_MADE[case]
    qsl = np.array([0, 2, 3]) if prefill else np.arange(3)
    index = BatchIndex(np.array(tables, np.int64), np.array(lens, np.int64), qsl, np.diff(qsl), not prefill)
    q = backend.asarray(np.zeros((int(qsl[-1]), 4, 8)), "cpu", "float32")
    before = snapshot(storage)
    with pytest.raises(error):
        MlxAttention(kernel).plan_index(storage, index, AttentionParams.make(8)).run(q, 0)
    assert_unchanged(storage, before)
    with pytest.raises(DeviceMismatch, match="MlxStorage"):
        MlxAttention(kernel).plan_index(object(), index, AttentionParams.make(8))
