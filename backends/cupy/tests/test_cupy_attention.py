"""Paged decode and prefill against the float64 oracle, on the emulator and on a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
from cupy_cases import block_tables, check_attention, config, fill

import pagedkv_cupy.launch as launch
from pagedkv_core.errors import (
    DeviceMismatch,
    DTypeMismatch,
    InvalidArgument,
    InvalidBlock,
    OutOfBounds,
    ShapeMismatch,
    UnsupportedOperation,
)

# (query dtype, pool dtype): float pools take queries of their own dtype, int8 pools any float.
COMBOS = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "int8")]
GQA = [(4, 4), (8, 2), (6, 2)]  # (num_q_heads, num_kv_heads): MHA, group 4, group 3
FEATURES = {
    "plain": {},
    "window": {"sliding_window": 7},
    "softcap": {"soft_cap": 2.5},
    "window-softcap-scale": {"sliding_window": 20, "soft_cap": 4.0, "scale": 0.3},
}


def skip_unsupported(cupy_target, *dtypes: str) -> None:
    for dtype in dtypes:
        reason = cupy_target.unsupported(dtype)
        if reason:
            pytest.skip(reason)


def setup(cupy_target, kv_dtype: str, lens, *, num_kv_heads: int = 2, head_dim: int = 16, block_size: int = 16,
          num_blocks: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    storage = cupy_target.storage(config(kv_dtype, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                                    num_blocks=num_blocks))
    lens = np.asarray(lens)
    tables = block_tables(lens, block_size, num_blocks, rng)
    pools = fill(cupy_target, storage, 1, tables, lens, rng)
    return storage, tables, lens, pools, rng


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_decode_matches_oracle(cupy_target, q_dtype, kv_dtype, heads, feature):
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, [1, 17, 70, 33], num_kv_heads=heads[1])
    check_attention(cupy_target, storage, 1, q_dtype, heads[0], tables, lens, None, rng, pools, **FEATURES[feature])


@pytest.mark.parametrize("feature", ["plain", "window-softcap-scale"])
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_decode_split_context_matches_oracle(cupy_target, q_dtype, kv_dtype, feature, monkeypatch):
    """Short splits force the flash-decoding path: partial results per split, then the reduction kernel."""
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    monkeypatch.setattr(launch, "MIN_SPLIT_LEN", 16)
    monkeypatch.setattr(launch, "SPLIT_ALIGN", 16)
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, [3, 90, 150, 16], num_blocks=40, block_size=8)
    plan = cupy_target.attention.plan(storage, tables, lens, **FEATURES[feature])
    geometry = plan._decode_geometry(4)[0]
    assert geometry.max_splits > 1
    check_attention(cupy_target, storage, 1, q_dtype, 4, tables, lens, None, rng, pools, plan=plan, **FEATURES[feature])


def test_decode_long_context_with_default_geometry(cupy_target):
    storage, tables, lens, pools, rng = setup(cupy_target, "float16", [1, 700, 2100], num_blocks=200)
    check_attention(cupy_target, storage, 1, "float16", 8, tables, lens, None, rng, pools)


def test_decode_benchmark_layout(cupy_target):
    """The benchmark's shape at a smaller context: fp16, 32 query / 8 KV heads, head dim 128."""
    storage, tables, lens, pools, rng = setup(cupy_target, "float16", [40, 300, 129], num_kv_heads=8, head_dim=128,
                                              num_blocks=40)
    check_attention(cupy_target, storage, 1, "float16", 32, tables, lens, None, rng, pools)


PREFILL_CASES = {
    # name: (seq_lens, query_start_loc): full prompts, chunks over a cached prefix, a sequence with no query
    "full-prompts": ([5, 40, 33], [0, 5, 45, 78]),
    "chunked": ([30, 70, 1], [0, 4, 41, 42]),
    "with-empty": ([12, 0, 50, 9], [0, 12, 12, 15, 24]),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_prefill_matches_oracle(cupy_target, q_dtype, kv_dtype, feature, causal):
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    lens, qsl = PREFILL_CASES["chunked" if causal else "full-prompts"]
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, lens)
    check_attention(cupy_target, storage, 1, q_dtype, 8, tables, lens, np.asarray(qsl), rng, pools, causal=causal,
                    **FEATURES[feature])


@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("heads", GQA + [(16, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_prefill_shapes_match_oracle(cupy_target, case, heads):
    lens, qsl = PREFILL_CASES[case]
    storage, tables, lens, pools, rng = setup(cupy_target, "float32", lens, num_kv_heads=heads[1], block_size=5,
                                              num_blocks=64)
    check_attention(cupy_target, storage, 1, "float32", heads[0], tables, lens, np.asarray(qsl), rng, pools,
                    sliding_window=9)


def test_single_query_prefill_runs_the_decode_kernel(cupy_target):
    storage, tables, lens, pools, rng = setup(cupy_target, "float32", [4, 30, 19])
    qsl = np.arange(4)
    plan = cupy_target.attention.plan(storage, tables, lens, qsl, sliding_window=6)
    assert plan.is_decode
    check_attention(cupy_target, storage, 1, "float32", 4, tables, lens, qsl, rng, pools, plan=plan, sliding_window=6)


def test_one_plan_serves_every_layer(cupy_target):
    rng = np.random.default_rng(3)
    storage = cupy_target.storage(config("float32"))
    lens = np.array([9, 41])
    tables = block_tables(lens, 16, 96, rng)
    pools = [fill(cupy_target, storage, layer, tables, lens, rng) for layer in (0, 1)]
    plan = cupy_target.attention.plan(storage, tables, lens, soft_cap=3.0)
    for layer in (0, 1):
        check_attention(cupy_target, storage, layer, "float32", 4, tables, lens, None, rng, pools[layer], plan=plan,
                        soft_cap=3.0)


def test_bad_block_id_inside_the_kernel_is_masked_never_read(cupy_target):
    """Bypass the host check: a block id outside the pool drops its tokens and reads nothing outside the pool."""
    storage, tables, lens, pools, rng = setup(cupy_target, "float32", [48, 64], block_size=16)
    plan = cupy_target.attention.plan(storage, tables, lens)
    bad_tables = tables.copy()
    bad_tables[0, 1] = storage.config.num_blocks + 5
    bad_tables[1, 2] = -7
    plan.tables = storage.runtime.upload(bad_tables)
    q = cupy_target.put(rng.standard_normal((2, 4, 16)), "float32")
    got = cupy_target.get(plan.run(q, 1))
    # Reference: the same sequences without the masked blocks (decode sees every key, positions do not matter).
    kept = np.full((2, tables.shape[1]), -1, np.int32)
    kept[0, :2] = tables[0, [0, 2]]
    kept[1, :3] = tables[1, [0, 1, 3]]
    from pagedkv_conformance.oracle import reference_attention

    expected = reference_attention(cupy_target.get(q), *pools, kept, np.array([32, 48]))
    np.testing.assert_allclose(got, expected, atol=3e-5, rtol=3e-5)


def test_plan_rejects_bad_block_ids_before_any_launch(cupy_target):
    storage, tables, lens, _, _ = setup(cupy_target, "float32", [20, 8])
    before = cupy_target.launch_count()
    bad = tables.copy()
    bad[0, 1] = storage.config.num_blocks
    with pytest.raises(InvalidBlock):
        cupy_target.attention.plan(storage, bad, lens)
    assert cupy_target.launch_count() == before


def test_query_checks(cupy_target):
    storage, tables, lens, _, rng = setup(cupy_target, "float16", [20, 8])
    plan = cupy_target.attention.plan(storage, tables, lens)
    with pytest.raises(DTypeMismatch):
        plan.run(cupy_target.put(rng.standard_normal((2, 4, 16)), "float32"), 0)
    with pytest.raises(DeviceMismatch):
        plan.run(cupy_target.foreign(rng.standard_normal((2, 4, 16)).astype(np.float16)), 0)
    with pytest.raises(ShapeMismatch):
        plan.run(cupy_target.put(rng.standard_normal((3, 4, 16)), "float16"), 0)
    with pytest.raises(ShapeMismatch):
        plan.run(cupy_target.put(rng.standard_normal((2, 3, 16)), "float16"), 0)


def test_int8_pool_takes_any_float_query_dtype(cupy_target):
    storage, tables, lens, pools, rng = setup(cupy_target, "int8", [20, 8])
    for q_dtype in ("float32", "float16"):
        check_attention(cupy_target, storage, 1, q_dtype, 4, tables, lens, None, rng, pools)
    with pytest.raises(DTypeMismatch):
        cupy_target.attention.plan(storage, tables, lens).run(cupy_target.put(np.zeros((2, 4, 16)), "int8"), 1)


def test_head_dim_beyond_the_kernels_is_refused(cupy_target):
    storage = cupy_target.storage(config("float32", head_dim=320, num_blocks=4, num_layers=1))
    with pytest.raises(UnsupportedOperation):
        cupy_target.attention.plan(storage, np.zeros((1, 1), np.int32), np.array([1]))


def test_prefill_without_queries_returns_empty(cupy_target):
    storage, tables, lens, _, _ = setup(cupy_target, "float32", [5, 3])
    out = cupy_target.attention.prefill(cupy_target.put(np.zeros((0, 4, 16)), "float32"), storage, 0, tables, lens,
                                   np.array([0, 0, 0]))
    assert tuple(out.shape) == (0, 4, 16)


@pytest.mark.parametrize("bad_id", [100, 10**6, -1], ids=["100", "1e6", "-1"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_plan_index_refuses_a_hand_made_index_before_any_launch(cupy_target, prefill, bad_id):
    """The kernels would skip an out-of-range id silently (a wrong result): the plan refuses it on the host."""
    from dataclasses import replace

    from pagedkv_core.contract.attention import AttentionParams, BatchIndex

    storage, tables, lens, _, _ = setup(cupy_target, "float32", [20, 8])
    qsl = np.array([0, 3, 5]) if prefill else np.arange(3)
    good = BatchIndex(tables.astype(np.int64), lens.astype(np.int64), qsl, np.diff(qsl), not prefill)
    bad_tables = good.block_tables.copy()
    bad_tables[0, 1] = bad_id  # 20 tokens of 16-token blocks: column 1 is read
    params = AttentionParams.make(16)
    before = cupy_target.launch_count()
    with pytest.raises(InvalidBlock) as info:
        cupy_target.attention.plan_index(storage, replace(good, block_tables=bad_tables), params)
    assert info.value.block_id == bad_id
    too_long = good.seq_lens.copy()
    too_long[1] = good.block_tables.shape[1] * 16 + 1
    with pytest.raises(OutOfBounds):
        cupy_target.attention.plan_index(storage, replace(good, seq_lens=too_long), params)
    assert cupy_target.launch_count() == before
    q = cupy_target.put(np.random.default_rng(4).standard_normal((int(qsl[-1]), 4, 16)), "float32")
    got = cupy_target.get(cupy_target.attention.plan_index(storage, good, params).run(q, 1))
    want = cupy_target.get(cupy_target.attention.plan(storage, tables, lens, qsl if prefill else None).run(q, 1))
    np.testing.assert_array_equal(got, want)


# -- chunked-local attention and attention sinks -----------------------------------------------------------------


def check_with_sinks(cupy_target, storage, q_dtype: str, num_q_heads: int, tables, lens, qsl, rng, pools,
                     sinks, plan=None, **params) -> np.ndarray:
    """``check_attention`` with sinks given to ``run``, within the conformance suite's per-dtype tolerance."""
    from pagedkv_conformance.oracle import reference_attention
    from pagedkv_conformance.tolerances import DEFAULT_TOLERANCES

    num_queries = len(lens) if qsl is None else int(qsl[-1])
    q = cupy_target.put(rng.standard_normal((num_queries, num_q_heads, storage.config.head_dim)), q_dtype)
    if plan is None:
        plan = cupy_target.attention.plan(storage, tables, lens, qsl, **params)
    out = plan.run(q, 1, sinks=sinks)
    assert tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
    got = cupy_target.get(out)
    host_sinks = None if sinks is None else np.asarray(cupy_target.get(sinks), np.float64)
    expected = reference_attention(cupy_target.get(q), *pools, tables, lens, qsl, sinks=host_sinks, **params)
    atol, rtol = DEFAULT_TOLERANCES[q_dtype]  # int8 pools: the query's dtype rounds the output
    np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol,
                               err_msg=f"{q_dtype} q, {storage.config.dtype} pool, params {params}, sinks {sinks}")
    return got


# blocks of 16 tokens here: chunks smaller than a block, one block, not dividing it, and with a window and cap
CHUNKS = {
    "chunk-5": {"chunk_size": 5},
    "chunk-16": {"chunk_size": 16},
    "chunk-24": {"chunk_size": 24},
    "chunk-window-softcap": {"chunk_size": 20, "sliding_window": 9, "soft_cap": 3.0, "scale": 0.3},
}
SINKS = {
    "large": [30.0, -30.0, 1e4, -1e4, 2.0, -2.0, 0.0, 5.0],
    "ordinary": [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 3.0, -3.0],
}


def sinks_for(cupy_target, name: str, heads: int, dtype: str = "float32"):
    return cupy_target.put(np.resize(np.asarray(SINKS[name]), heads), dtype)


@pytest.mark.parametrize("feature", list(CHUNKS))
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_decode_chunked_matches_oracle(cupy_target, q_dtype, kv_dtype, heads, feature):
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, [1, 17, 70, 33, 48, 49],
                                              num_kv_heads=heads[1])
    check_with_sinks(cupy_target, storage, q_dtype, heads[0], tables, lens, None, rng, pools, None, **CHUNKS[feature])


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("feature", ["plain", "chunk-5", "chunk-window-softcap"])
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_decode_sinks_match_oracle(cupy_target, q_dtype, kv_dtype, feature, sinks):
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, [1, 17, 70, 33], num_kv_heads=2)
    check_with_sinks(cupy_target, storage, q_dtype, 8, tables, lens, None, rng, pools,
                     sinks_for(cupy_target, sinks, 8), **CHUNKS.get(feature, {}))


SPLIT_FEATURES = {  # chunks and windows long enough to split (16-token splits)
    "plain": {},
    "chunk-60": {"chunk_size": 60},
    "chunk-window-softcap": {"chunk_size": 70, "sliding_window": 50, "soft_cap": 3.0, "scale": 0.3},
}


@pytest.mark.parametrize("feature", list(SPLIT_FEATURES))
@pytest.mark.parametrize("sinks", [None, "large", "ordinary"])
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_decode_split_context_chunked_and_sinks(cupy_target, q_dtype, kv_dtype, sinks, feature, monkeypatch):
    """Split contexts: each split's partial carries no sink; the reduction joins it once."""
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    monkeypatch.setattr(launch, "MIN_SPLIT_LEN", 16)
    monkeypatch.setattr(launch, "SPLIT_ALIGN", 16)
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, [3, 90, 150, 16], num_blocks=40, block_size=8)
    kw = SPLIT_FEATURES[feature]
    plan = cupy_target.attention.plan(storage, tables, lens, **kw)
    assert plan._decode_geometry(4)[0].max_splits > 1
    check_with_sinks(cupy_target, storage, q_dtype, 4, tables, lens, None, rng, pools,
                     None if sinks is None else sinks_for(cupy_target, sinks, 4), plan=plan, **kw)


PREFILL_CHUNKED = {
    # name: (seq_lens, query_start_loc, params): queries over cached prefixes cross chunk boundaries
    "prefix-chunk-5": ([30, 70, 1], [0, 4, 41, 42], {"chunk_size": 5}),
    "prefix-chunk-16": ([30, 70, 1], [0, 20, 60, 61], {"chunk_size": 16}),
    "prefix-chunk-24": ([30, 70, 1], [0, 20, 60, 61], {"chunk_size": 24}),
    "chunk-window-softcap": ([30, 70], [0, 25, 95], {"chunk_size": 20, "sliding_window": 9, "soft_cap": 3.0}),
    "bidirectional-chunk-12": ([5, 40, 33], [0, 5, 45, 78], {"chunk_size": 12, "causal": False}),
}


@pytest.mark.parametrize("sinks", [None, "large", "ordinary"])
@pytest.mark.parametrize("case", list(PREFILL_CHUNKED))
@pytest.mark.parametrize("q_dtype,kv_dtype", COMBOS, ids=lambda d: d)
def test_prefill_chunked_and_sinks_match_oracle(cupy_target, q_dtype, kv_dtype, case, sinks):
    skip_unsupported(cupy_target, q_dtype, kv_dtype)
    lens, qsl, kw = PREFILL_CHUNKED[case]
    storage, tables, lens, pools, rng = setup(cupy_target, kv_dtype, lens)
    check_with_sinks(cupy_target, storage, q_dtype, 8, tables, lens, np.asarray(qsl), rng, pools,
                     None if sinks is None else sinks_for(cupy_target, sinks, 8), **kw)


@pytest.mark.parametrize("heads", GQA + [(16, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_prefill_sinks_with_gqa(cupy_target, heads):
    lens, qsl, kw = PREFILL_CHUNKED["prefix-chunk-5"]
    storage, tables, lens, pools, rng = setup(cupy_target, "float32", lens, num_kv_heads=heads[1], block_size=5,
                                              num_blocks=64)
    sinks = cupy_target.put(rng.uniform(-4, 4, heads[0]), "float32")
    check_with_sinks(cupy_target, storage, "float32", heads[0], tables, lens, np.asarray(qsl), rng, pools, sinks, **kw)


@pytest.mark.parametrize("sink_dtype", ["float16", "bfloat16", "float64"])
def test_sinks_of_any_float_dtype(cupy_target, sink_dtype):
    skip_unsupported(cupy_target, sink_dtype if sink_dtype != "float64" else "float32")
    storage, tables, lens, pools, rng = setup(cupy_target, "float32", [9, 41])
    sinks = cupy_target.put(np.array([1.5, -2.0, 0.25, 3.0]), sink_dtype)
    check_with_sinks(cupy_target, storage, "float32", 4, tables, lens, None, rng, pools, sinks, chunk_size=7)
    check_with_sinks(cupy_target, storage, "float32", 4, tables, lens, None, rng, pools,
                     np.array([1.5, -2.0, 0.25, 3.0]))  # host NumPy too


BAD_SINKS = {  # for 4 query heads
    "too few heads": (np.zeros(3, np.float32), ShapeMismatch),
    "2-D": (np.zeros((1, 4), np.float32), ShapeMismatch),
    "NaN": (np.array([0.0, np.nan, 0.0, 0.0], np.float32), InvalidArgument),
    "infinity": (np.array([0.0, 0.0, -np.inf, 0.0], np.float32), InvalidArgument),
    "beyond float32": (np.array([0.0, 1e39, 0.0, 0.0]), InvalidArgument),
    "int8": (np.zeros(4, np.int8), DTypeMismatch),
}


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", list(BAD_SINKS))
def test_bad_sinks_are_refused_before_any_launch(cupy_target, case, prefill):
    sinks, error = BAD_SINKS[case]
    storage, tables, lens, _, rng = setup(cupy_target, "float32", [20, 8])
    qsl = np.array([0, 3, 5]) if prefill else None
    plan = cupy_target.attention.plan(storage, tables, lens, qsl, chunk_size=4)
    q = cupy_target.put(rng.standard_normal((5 if prefill else 2, 4, 16)), "float32")
    before = cupy_target.launch_count()
    with pytest.raises(error):
        plan.run(q, 1, sinks=sinks if cupy_target.name == "emu" or case == "int8" else cupy_target.put(sinks))
    assert cupy_target.launch_count() == before


def test_sinks_on_a_foreign_device_are_refused(cupy_target):
    storage, tables, lens, _, rng = setup(cupy_target, "float32", [20, 8])
    plan = cupy_target.attention.plan(storage, tables, lens)
    q = cupy_target.put(rng.standard_normal((2, 4, 16)), "float32")
    with pytest.raises(DeviceMismatch):
        plan.run(q, 1, sinks=[0.0, 0.0, 0.0, 0.0])


def test_backend_declares_chunked_local_and_sinks(cupy_target):
    assert {"chunked_local", "sinks"} <= set(cupy_target.backend.capabilities("cuda:0").kernels)
