"""Attention against the float64 oracle: decode and prefill over shuffled pages, every dimension.

Chunked-local attention (``chunk_size``) and attention sinks (``run(...,
sinks=)``) are features a backend declares in ``Capabilities.kernels``
(``chunked_local``, ``sinks``): cases that use one skip, with that reason,
on a target that does not list it, and such a target must refuse the
feature with ``UnsupportedOperation`` rather than ignore it. The refusals of
bad feature values (wrong sink shape, non-finite sinks, bad chunk sizes)
count in the ``bad_input`` area.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pagedkv_conformance.cases import DEFAULT_CASES, AttentionCase, feature_sweep_cases, sink_logits, sweep_cases
from pagedkv_conformance.helpers import (
    assert_close,
    make_config,
    make_query,
    make_storage,
    random_tables,
    slots_for,
    storage_state,
    write_random,
)
from pagedkv_conformance.oracle import reference_attention
from pagedkv_core import errors

pytestmark = pytest.mark.pagedkv_area("attention")


def require(target, *features: str) -> None:
    """Skip, naming the first missing one, unless the target's capabilities list every feature."""
    for feature in features:
        if feature not in target.capabilities.kernels:
            pytest.skip(f"{target.id} does not support {feature}")


def run_case(target, dtype: str, case: AttentionCase, layer: int = 1, sinks_as=None) -> None:
    """Run ``case`` on the target and compare with the oracle.

    ``sinks_as(logits) -> array``: how the float32 NumPy sink logits are
    handed to ``run`` (default: as they are); the oracle gets exactly the
    values handed over, read back through the backend.
    """
    kernel = "decode" if case.query_lens is None else "prefill"
    if kernel not in target.capabilities.kernels:
        pytest.skip(f"{target.id} has no {kernel} kernel")
    require(target, *case.features)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    config = make_config(dtype, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, num_blocks=case.num_blocks,
                         block_size=case.block_size)
    storage = make_storage(target, config)
    tables = random_tables(rng, case.seq_lens, case.block_size, case.num_blocks)
    write_random(target, storage, slots_for(tables, case.seq_lens, case.block_size), rng)
    seq_lens = np.asarray(case.seq_lens, np.int32)
    num_queries = len(case.seq_lens) if case.query_lens is None else sum(case.query_lens)
    q, q64 = make_query(target, rng, num_queries, case.num_q_heads, case.head_dim, dtype)
    options = dict(scale=case.scale, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    if case.chunk_size is not None:  # passed only when used: a backend without the feature never sees the keyword
        options["chunk_size"] = case.chunk_size
    sinks = sinks64 = None
    if case.sinks is not None:
        sinks = sink_logits(case.sinks, case.num_q_heads, rng)
        sinks = sinks if sinks_as is None else sinks_as(sinks)
        sinks64 = np.asarray(target.backend.to_numpy(sinks), np.float64)
    attention = target.backend.attention
    extra = {} if sinks is None else {"sinks": sinks}
    if case.query_lens is None:
        out = attention.decode(q, storage, layer, tables, seq_lens, **options, **extra)
        qsl = None
    else:
        qsl = np.concatenate([[0], np.cumsum(case.query_lens)]).astype(np.int32)
        out = attention.prefill(q, storage, layer, tables, seq_lens, qsl, causal=case.causal, **options, **extra)
    k_pool, v_pool = storage.to_numpy(layer)
    want = reference_attention(q64, k_pool, v_pool, tables, seq_lens, qsl, causal=case.causal, sinks=sinks64,
                               **options)
    assert_close(target, out, want, kernel, dtype, case.describe())
    assert target.backend.to_numpy(out).dtype == target.backend.to_numpy(q).dtype


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.name)
def test_attention_matches_oracle(target, dtype, case):
    run_case(target, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep_cases(), ids=lambda c: c.name)
def test_attention_sweep(target, dtype, case):
    run_case(target, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", feature_sweep_cases(), ids=lambda c: c.name)
def test_attention_feature_sweep(target, dtype, case):
    run_case(target, dtype, case)


ONE_CALL_CASES = [AttentionCase("one-call-decode", (20, 7, 33), group=2, chunk_size=8, sinks="moderate"),
                  AttentionCase("one-call-prefill", (20, 7, 33), (9, 7, 1), group=2, block_size=8, chunk_size=5,
                                sinks="moderate")]


@pytest.mark.parametrize("case", ONE_CALL_CASES, ids=lambda c: c.name)
def test_one_call_forms_take_chunk_size_and_sinks(target, dtype, case):
    """``decode``/``prefill`` pass ``chunk_size`` to the plan and ``sinks`` to ``run``: the same output as plan/run."""
    kernel = "decode" if case.query_lens is None else "prefill"
    require(target, kernel, *case.features)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    config = make_config(dtype, num_kv_heads=case.num_kv_heads, num_blocks=case.num_blocks,
                         block_size=case.block_size)
    storage = make_storage(target, config)
    tables = random_tables(rng, case.seq_lens, case.block_size, case.num_blocks)
    write_random(target, storage, slots_for(tables, case.seq_lens, case.block_size), rng)
    seq_lens = np.asarray(case.seq_lens, np.int32)
    num_queries = len(case.seq_lens) if case.query_lens is None else sum(case.query_lens)
    q, _ = make_query(target, rng, num_queries, case.num_q_heads, 64, dtype)
    sinks = sink_logits(case.sinks, case.num_q_heads, rng)
    attention = target.backend.attention
    if case.query_lens is None:
        got = attention.decode(q, storage, 0, tables, seq_lens, chunk_size=case.chunk_size, sinks=sinks)
        qsl = None
    else:
        qsl = np.concatenate([[0], np.cumsum(case.query_lens)]).astype(np.int32)
        got = attention.prefill(q, storage, 0, tables, seq_lens, qsl, chunk_size=case.chunk_size, sinks=sinks)
    want = attention.plan(storage, tables, seq_lens, qsl, chunk_size=case.chunk_size).run(q, 0, sinks=sinks)
    assert_close(target, got, np.asarray(target.backend.to_numpy(want), np.float64), kernel, dtype,
                 f"{case.describe()} (one-call form vs plan/run)")


NATIVE_SINK_CASES = [AttentionCase("native-sinks-decode", (1, 16, 17, 40), group=4, sinks="moderate"),
                     AttentionCase("native-sinks-prefill", (20, 9), (6, 9), block_size=8, group=2, sinks="moderate")]


@pytest.mark.parametrize("sink_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", NATIVE_SINK_CASES, ids=lambda c: c.name)
def test_sinks_as_native_arrays_of_any_float_dtype(target, dtype, case, sink_dtype):
    """Sinks may come as the backend's own array in any float dtype it has; the oracle gets the values as given."""
    if sink_dtype not in target.capabilities.dtypes:
        pytest.skip(f"{target.id} has no {sink_dtype} arrays")
    run_case(target, dtype, case, sinks_as=lambda logits: target.backend.asarray(logits, target.device, sink_dtype))


# -- bad feature values, and features a target does not list ------------------------------------------------

BAD_TABLES = np.array([[3, 1, -1], [0, 2, 5]], np.int32)
BAD_LENS = np.array([7, 10], np.int32)


@pytest.fixture
def small(target, dtype):
    """Two decode sequences over a 6-block pool, and their query (4 query heads over 2 KV heads)."""
    storage = make_storage(target, make_config(dtype, num_blocks=6, block_size=4, head_dim=64))
    write_random(target, storage, np.arange(24), np.random.default_rng(0))
    q, _ = make_query(target, np.random.default_rng(1), 2, 4, 64, dtype)
    return storage, q


def _refused(target, storage, call, error) -> None:
    """``call()`` raises ``error`` and the pools are as they were."""
    before = storage_state(target, storage)
    with pytest.raises(error):
        call()
    for got, want in zip(storage_state(target, storage), before):
        np.testing.assert_array_equal(got, want)


BAD_SINKS = {
    "sinks-too-few": (lambda: np.zeros(3, np.float32), errors.ShapeMismatch),
    "sinks-per-kv-head": (lambda: np.zeros(2, np.float32), errors.ShapeMismatch),
    "sinks-2d": (lambda: np.zeros((1, 4), np.float32), errors.ShapeMismatch),
    "sinks-scalar": (lambda: np.full((), 0.5, np.float32), errors.ShapeMismatch),
    "sinks-nan": (lambda: np.array([0.0, np.nan, 1.0, 2.0], np.float32), errors.InvalidArgument),
    "sinks-inf": (lambda: np.array([0.0, 1.0, np.inf, 2.0], np.float32), errors.InvalidArgument),
    "sinks-minus-inf": (lambda: np.array([-np.inf, 1.0, 0.0, 2.0], np.float32), errors.InvalidArgument),
}


@pytest.mark.pagedkv_area("bad_input")
@pytest.mark.parametrize("case", list(BAD_SINKS), ids=list(BAD_SINKS))
def test_bad_sinks_are_refused(target, dtype, small, case):
    require(target, "decode", "sinks")
    storage, q = small
    make, error = BAD_SINKS[case]
    plan = target.backend.attention.plan(storage, BAD_TABLES, BAD_LENS)
    _refused(target, storage, lambda: plan.run(q, 0, sinks=make()), error)


@pytest.mark.pagedkv_area("bad_input")
@pytest.mark.parametrize("native", [False, True], ids=["numpy", "native"])
def test_bad_sinks_are_refused_in_the_backends_own_arrays(target, dtype, small, native):
    """The same refusals when the logits come as the backend's array (shape first, then values)."""
    require(target, "decode", "sinks")
    storage, q = small
    convert = (lambda a: target.backend.asarray(a, target.device, "float32")) if native else (lambda a: a)
    plan = target.backend.attention.plan(storage, BAD_TABLES, BAD_LENS)
    _refused(target, storage, lambda: plan.run(q, 0, sinks=convert(np.zeros(5, np.float32))), errors.ShapeMismatch)
    bad = np.array([0.0, 1.0, 2.0, np.nan], np.float32)
    _refused(target, storage, lambda: plan.run(q, 0, sinks=convert(bad)), errors.InvalidArgument)


BAD_CHUNKS = {"chunk-zero": 0, "chunk-negative": -4, "chunk-bool": True, "chunk-float": 2.5}


@pytest.mark.pagedkv_area("bad_input")
@pytest.mark.parametrize("case", list(BAD_CHUNKS), ids=list(BAD_CHUNKS))
def test_bad_chunk_sizes_are_refused(target, dtype, small, case):
    require(target, "decode", "prefill", "chunked_local")
    storage, q = small
    chunk, attention = BAD_CHUNKS[case], target.backend.attention
    _refused(target, storage, lambda: attention.plan(storage, BAD_TABLES, BAD_LENS, chunk_size=chunk),
             errors.InvalidArgument)
    _refused(target, storage, lambda: attention.decode(q, storage, 0, BAD_TABLES, BAD_LENS, chunk_size=chunk),
             errors.InvalidArgument)
    _refused(target, storage, lambda: attention.prefill(q, storage, 0, BAD_TABLES, BAD_LENS, np.array([0, 1, 2]),
                                                        chunk_size=chunk), errors.InvalidArgument)


@pytest.mark.pagedkv_area("bad_input")
@pytest.mark.parametrize("feature", ["chunked_local", "sinks"])
def test_an_unlisted_feature_is_refused(target, dtype, small, feature):
    """A target that does not list a feature raises ``UnsupportedOperation`` when asked for it, never ignores it."""
    if feature in target.capabilities.kernels:
        pytest.skip(f"{target.id} lists {feature}: its cases run against the oracle")
    require(target, "decode")
    storage, q = small
    attention = target.backend.attention
    if feature == "chunked_local":
        _refused(target, storage, lambda: attention.plan(storage, BAD_TABLES, BAD_LENS, chunk_size=4).run(q, 0),
                 errors.UnsupportedOperation)
    else:
        sinks = np.zeros(4, np.float32)
        _refused(target, storage, lambda: attention.plan(storage, BAD_TABLES, BAD_LENS).run(q, 0, sinks=sinks),
                 errors.UnsupportedOperation)


def test_plan_is_reused_across_layers(target, dtype):
    case = AttentionCase("plan-reuse", (9, 30), group=2)
    rng = np.random.default_rng(5)
    config = make_config(dtype, num_layers=3, num_blocks=case.num_blocks)
    storage = make_storage(target, config)
    tables = random_tables(rng, case.seq_lens, 16, case.num_blocks)
    write_random(target, storage, slots_for(tables, case.seq_lens, 16), rng)
    seq_lens = np.asarray(case.seq_lens, np.int32)
    plan = target.backend.attention.plan(storage, tables, seq_lens)
    q, q64 = make_query(target, rng, 2, case.num_q_heads, 64, dtype)
    for layer in range(3):
        k_pool, v_pool = storage.to_numpy(layer)
        want = reference_attention(q64, k_pool, v_pool, tables, seq_lens)
        assert_close(target, plan.run(q, layer), want, "decode", dtype, f"plan reused for layer {layer}")
