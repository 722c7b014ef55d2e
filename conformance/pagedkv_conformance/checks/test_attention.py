"""Attention against the float64 oracle: decode and prefill over shuffled pages, every dimension."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pagedkv_conformance.cases import DEFAULT_CASES, AttentionCase, sweep_cases
from pagedkv_conformance.helpers import (
    assert_close,
    make_config,
    make_query,
    make_storage,
    random_tables,
    slots_for,
    write_random,
)
from pagedkv_conformance.oracle import reference_attention

pytestmark = pytest.mark.pagedkv_area("attention")


def run_case(target, dtype: str, case: AttentionCase, layer: int = 1) -> None:
    kernel = "decode" if case.query_lens is None else "prefill"
    if kernel not in target.capabilities.kernels:
        pytest.skip(f"{target.id} has no {kernel} kernel")
    for feature, used in (("sliding_window", case.sliding_window), ("soft_cap", case.soft_cap)):
        if used is not None and feature not in target.capabilities.kernels:
            pytest.skip(f"{target.id} does not support {feature}")
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
    attention = target.backend.attention
    if case.query_lens is None:
        out = attention.decode(q, storage, layer, tables, seq_lens, **options)
        qsl = None
    else:
        qsl = np.concatenate([[0], np.cumsum(case.query_lens)]).astype(np.int32)
        out = attention.prefill(q, storage, layer, tables, seq_lens, qsl, causal=case.causal, **options)
    k_pool, v_pool = storage.to_numpy(layer)
    want = reference_attention(q64, k_pool, v_pool, tables, seq_lens, qsl, causal=case.causal, **options)
    assert_close(target, out, want, kernel, dtype, case.describe())
    assert target.backend.to_numpy(out).dtype == target.backend.to_numpy(q).dtype


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.name)
def test_attention_matches_oracle(target, dtype, case):
    run_case(target, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep_cases(), ids=lambda c: c.name)
def test_attention_sweep(target, dtype, case):
    run_case(target, dtype, case)


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
