"""Bad input fails with the typed error, before any state changes (the pools are compared byte for byte)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import fill, make_config  # noqa: E402

from pagedkv_core.contract.storage import NumpyHostBlocks  # noqa: E402
from pagedkv_core.errors import (  # noqa: E402
    DeviceMismatch,
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    OutOfBounds,
    ShapeMismatch,
    UnsupportedOperation,
)
from pagedkv_torch.attention import TorchAttention, triton_interpreting  # noqa: E402


@pytest.fixture(params=["float32", "int8"])
def storage(request, backend):
    s = backend.create_storage(make_config(request.param), "cpu")
    fill(backend, s, np.random.default_rng(20))
    return s


def _kv(n=2, heads=2, dim=32, dtype=torch.float32, device="cpu"):
    return torch.ones(n, heads, dim, dtype=dtype, device=device), torch.ones(n, heads, dim, dtype=dtype, device=device)


def _unchanged(storage, fn, error, match=None):
    before = [t.clone() for t in storage._tensors()]
    with pytest.raises(error, match=match):
        fn()
    for old, now in zip(before, storage._tensors()):
        assert torch.equal(old, now), "a failed call changed the pools"


WRITES = {
    "layer out of range": (lambda s: s.write(2, [0, 1], *_kv()), InvalidArgument),
    "slot past the pool": (lambda s: s.write(0, [0, 24 * 8], *_kv()), InvalidBlock),
    "slot below -1": (lambda s: s.write(0, [0, -2], *_kv()), InvalidBlock),
    "float slots": (lambda s: s.write(0, np.array([0.0, 1.0]), *_kv()), InvalidArgument),
    "slots of the wrong length": (lambda s: s.write(0, [0, 1, 2], *_kv()), ShapeMismatch),
    "k with wrong head_dim": (lambda s: s.write(0, [0, 1], *_kv(dim=16)), ShapeMismatch),
    "k and v differ": (lambda s: s.write(0, [0, 1], _kv()[0], _kv(n=3)[1]), ShapeMismatch),
    "integer k": (lambda s: s.write(0, [0, 1], *_kv(dtype=torch.int32)), DTypeMismatch),
    "k on another device": (lambda s: s.write(0, [0, 1], *_kv(device="meta")), DeviceMismatch),
    "k is a list": (lambda s: s.write(0, [0, 1], [[0.0]], [[0.0]]), DTypeMismatch),
}


@pytest.mark.parametrize("case", list(WRITES), ids=list(WRITES))
def test_bad_write(storage, case):
    fn, error = WRITES[case]
    _unchanged(storage, lambda: fn(storage), error)


def _host(storage, n, shape_fix=None):
    c = storage.config
    shape = (c.num_layers, n, c.block_size, c.num_kv_heads, shape_fix or c.head_dim)
    return NumpyHostBlocks(np.ones(shape, np.float32), np.ones(shape, np.float32), "float32")


def _quantized_host(storage, n):
    host = _host(storage, n)
    c = storage.config
    scales = np.ones((c.num_layers, n, c.num_kv_heads), np.float32)
    return NumpyHostBlocks(host.k, host.v, "int8", scales, scales.copy())


MOVES = {
    "copy into its own source": (lambda s: s.copy_blocks([1, 2], [2, 3]), InvalidArgument),
    "copy to a duplicate": (lambda s: s.copy_blocks([1, 2], [5, 5]), InvalidArgument),
    "copy from outside the pool": (lambda s: s.copy_blocks([24], [3]), InvalidBlock),
    "copy lists of different lengths": (lambda s: s.copy_blocks([1, 2], [3]), ShapeMismatch),
    "swap out a negative id": (lambda s: s.swap_out([0, -1]), InvalidBlock),
    "swap out to fp4": (lambda s: s.swap_out([0], quantize="fp4"), UnsupportedOperation),
    "swap in the wrong shape": (lambda s: s.swap_in(_host(s, 2, shape_fix=16), [0, 1]), ShapeMismatch),
    "swap in too few blocks": (lambda s: s.swap_in(_host(s, 1), [0, 1]), ShapeMismatch),
    "swap in to a duplicate": (lambda s: s.swap_in(_host(s, 2), [4, 4]), InvalidArgument),
    "swap in outside the pool": (lambda s: s.swap_in(_host(s, 1), [99]), InvalidBlock),
    "swap in a non-host object": (lambda s: s.swap_in(object(), [0]), InvalidArgument),
    "swap in int8 that is not int8": (lambda s: s.swap_in(_quantized_host(s, 1), [0]), DTypeMismatch),
    "gather past the table": (lambda s: s.gather(0, [1, 2], 17), OutOfBounds),
}


@pytest.mark.parametrize("case", list(MOVES), ids=list(MOVES))
def test_bad_block_moves(storage, case):
    fn, error = MOVES[case]
    _unchanged(storage, lambda: fn(storage), error)


def test_storage_refuses_dtypes_it_cannot_hold(backend):
    for dtype in ("float8_e4m3fn", "float64"):
        with pytest.raises(UnsupportedOperation, match=dtype):
            backend.create_storage(make_config(dtype), "cpu")


def _decode(storage, kernel="torch", **kw):
    args = dict(q=torch.ones(2, 4, 32), layer=0, block_tables=np.array([[0, 1], [2, 3]]),
                seq_lens=np.array([9, 3]))
    args.update(kw)
    return TorchAttention(kernel).decode(args["q"], storage, args["layer"], args["block_tables"], args["seq_lens"])


ATTENTION = {
    "q of another dtype": (dict(q=torch.ones(2, 4, 32, dtype=torch.float64)), DTypeMismatch),
    "q on another device": (dict(q=torch.ones(2, 4, 32, device="meta")), DeviceMismatch),
    "q with the wrong head_dim": (dict(q=torch.ones(2, 4, 16)), ShapeMismatch),
    "q heads not a multiple of kv heads": (dict(q=torch.ones(2, 3, 32)), ShapeMismatch),
    "q rows != batch": (dict(q=torch.ones(3, 4, 32)), ShapeMismatch),
    "block id past the pool": (dict(block_tables=np.array([[0, 24], [2, 3]])), InvalidBlock),
    "seq_len past the table": (dict(seq_lens=np.array([17, 3])), OutOfBounds),
    "empty sequence in decode": (dict(seq_lens=np.array([9, 0])), InvalidArgument),
    "layer out of range": (dict(layer=5), InvalidArgument),
}


@pytest.mark.parametrize("kernel", ["torch", "auto"], ids=["torch ops", "auto (the compiled kernel where built)"])
@pytest.mark.parametrize("case", list(ATTENTION), ids=list(ATTENTION))
def test_bad_attention_input(storage, case, kernel):
    kw, error = ATTENTION[case]
    if case == "q of another dtype" and storage.quantized:
        kw = dict(q=torch.ones(2, 4, 32, dtype=torch.int32))
    _unchanged(storage, lambda: _decode(storage, kernel, **kw), error)


def test_bad_attention_parameters(storage):
    attention = TorchAttention("torch")
    table, lens = np.array([[0, 1]]), np.array([9])
    for kw in (dict(scale=0.0), dict(sliding_window=0), dict(soft_cap=-1.0)):
        with pytest.raises(InvalidArgument):
            attention.plan(storage, table, lens, **kw)
    with pytest.raises(ShapeMismatch):
        attention.plan(storage, table, lens, np.array([0, 1, 2]))
    with pytest.raises(InvalidArgument, match="queries"):
        attention.plan(storage, table, lens, np.array([0, 10]))
    with pytest.raises(InvalidArgument, match="kernel"):
        TorchAttention("cuda-graphs")
    with pytest.raises(InvalidArgument, match="TorchStorage"):
        attention.plan(object(), table, lens)


def test_triton_on_cpu_needs_the_interpreter(storage):
    if triton_interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    with pytest.raises(UnsupportedOperation, match="TRITON_INTERPRET|triton"):
        TorchAttention("triton").plan(storage, np.array([[0, 1]]), np.array([9]))


HAND_MADE = {  # (tables, seq_lens) of a hand-made BatchIndex (no check_batch) -> error; the pool has 24 blocks
    "block id 100": (np.array([[0, 100], [2, 3]]), np.array([9, 3]), InvalidBlock),
    "block id 10**6": (np.array([[0, 1], [10**6, 3]]), np.array([9, 3]), InvalidBlock),
    "block id -1": (np.array([[-1, 1], [2, 3]]), np.array([9, 3]), InvalidBlock),
    "block id past int32": (np.array([[0, 2**32 + 1], [2, 3]]), np.array([9, 3]), InvalidBlock),
    "seq_len past the table": (np.array([[0, 1], [2, 3]]), np.array([17, 3]), OutOfBounds),
}


def _hand_made(tables, lens, prefill: bool):
    from pagedkv_core.contract.attention import BatchIndex

    qsl = np.array([0, 2, 3]) if prefill else np.arange(3)
    return BatchIndex(tables.astype(np.int64), lens.astype(np.int64), qsl, np.diff(qsl), not prefill)


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", list(HAND_MADE), ids=list(HAND_MADE))
def test_plan_index_refuses_a_hand_made_index_out_of_range(storage, case, prefill, kernel):
    """Every plan class, whether it checks in Python or (the compiled decode) in C, raises the typed error."""
    from pagedkv_core.contract.attention import AttentionParams
    from pagedkv_torch.native_decode import native_unavailable_reason

    if kernel == "native" and native_unavailable_reason(storage) is not None:
        pytest.skip(native_unavailable_reason(storage))
    tables, lens, error = HAND_MADE[case]
    index = _hand_made(tables, lens, prefill)
    q = torch.ones(int(index.query_start_loc[-1]), 4, 32)
    attention = TorchAttention(kernel)
    _unchanged(storage, lambda: attention.plan_index(storage, index, AttentionParams.make(32)).run(q, 0), error)


def test_plan_index_refuses_another_storage_and_loose_params(storage):
    from pagedkv_core.contract.attention import AttentionParams

    index = _hand_made(np.array([[0, 1], [2, 3]]), np.array([9, 3]), False)
    with pytest.raises(DeviceMismatch, match="TorchStorage"):
        TorchAttention().plan_index(object(), index, AttentionParams.make(32))
    with pytest.raises(InvalidArgument, match="AttentionParams"):
        TorchAttention("torch").plan_index(storage, index, {"scale": 1.0})


BAD_SINKS = {  # sinks for 4 query heads -> error
    "too few heads": (np.zeros(3, np.float32), ShapeMismatch),
    "one per KV head": (np.zeros(2, np.float32), ShapeMismatch),
    "2-D": (np.zeros((1, 4), np.float32), ShapeMismatch),
    "a scalar": (np.float32(1.0), DTypeMismatch),
    "NaN": (np.array([0.0, np.nan, 0.0, 0.0], np.float32), InvalidArgument),
    "infinity": (np.array([0.0, 0.0, -np.inf, 0.0], np.float32), InvalidArgument),
    "beyond float32": (np.array([0.0, 1e39, 0.0, 0.0]), InvalidArgument),
    "integers": (np.arange(4), DTypeMismatch),
    "a list": ([0.0, 1.0, 2.0, 3.0], DTypeMismatch),
    "integer tensor": (torch.arange(4), DTypeMismatch),
    "tensor NaN": (torch.tensor([0.0, 0.0, 0.0, float("nan")], dtype=torch.bfloat16), InvalidArgument),
    "tensor of the wrong shape": (torch.zeros(8), ShapeMismatch),
    "tensor on another device": (torch.zeros(4, device="meta"), DeviceMismatch),
}


@pytest.mark.parametrize("kernel", ["torch", "auto"], ids=["torch ops", "auto (the compiled kernel where built)"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", list(BAD_SINKS), ids=list(BAD_SINKS))
def test_bad_sinks(storage, case, prefill, kernel):
    """Refused with the typed error before any kernel runs (the same error from every kernel)."""
    sinks, error = BAD_SINKS[case]
    plan = TorchAttention(kernel).plan(storage, np.array([[0, 1], [2, 3]]), np.array([9, 3]),
                                       np.array([0, 2, 3]) if prefill else None, chunk_size=4)
    _unchanged(storage, lambda: plan.run(torch.ones(3 if prefill else 2, 4, 32), 0, sinks=sinks), error)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, "8"])
def test_bad_chunk_size(storage, chunk_size):
    with pytest.raises(InvalidArgument, match="chunk_size"):
        TorchAttention("torch").plan(storage, np.array([[0, 1]]), np.array([9]), chunk_size=chunk_size)
