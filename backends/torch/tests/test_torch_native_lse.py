"""The compiled CPU decode's softmax state (``NativeDecodePlan.state``) and its bfloat16 pair widening.

``state`` returns the float32 output and each query head's log-sum-exp of
its scaled (soft-capped) scores, sink included: a cascade merges its levels
by it, so it is checked against a float64 log-sum-exp computed here from the
stored pools, on every variant, dtype and feature the kernel has, on one and
two threads. The output beside it must be the one ``run`` gives.

bfloat16 rows whose head dim is a multiple of the accumulate tile (64 for
AVX-512, 16 for the 8-lane variants) are widened in even/odd pairs, with the
query and accumulator kept in that order; the shapes below reach that path
with query groups that fill the 4-head tile, leave a remainder, or are 1, and
head dims that take it or not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_torch_native_decode import AVAILABLE, DTYPES, FEATURES, _torch_threads, assert_oracle  # noqa: E402
from torch_helpers import make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_core.contract.attention import AttentionParams, check_batch  # noqa: E402
from pagedkv_torch.native_decode import NativeDecodePlan, native_unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(native_unavailable_reason() is not None, reason=str(native_unavailable_reason()))

LSE_TOLERANCE = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5, "int8": 2e-5}
"""Absolute, on log-sum-exps of order 1-10: the pools' values are what they are, so only float32 arithmetic
(scores, exp, the running sum) separates the kernel from the float64 reference, whatever the pool dtype."""


def reference_lse(batch, q64: np.ndarray, layer: int, *, scale: float | None = None,
                  sliding_window: int | None = None, soft_cap: float | None = None, chunk_size: int | None = None,
                  sinks: np.ndarray | None = None) -> np.ndarray:
    """``[batch, num_q_heads]`` float64 log-sum-exp of each decode query's visible scores (and its sink)."""
    k_pool = batch.storage.to_numpy(layer)[0].astype(np.float64)
    c = batch.storage.config
    num_q_heads = q64.shape[1]
    group = num_q_heads // c.num_kv_heads
    scale = 1.0 / math.sqrt(c.head_dim) if scale is None else scale
    out = np.empty((len(batch.seq_lens), num_q_heads))
    for b, n in enumerate(batch.seq_lens):
        n = int(n)
        blocks = batch.block_tables[b, :-(-n // c.block_size)]
        keys = k_pool[blocks].reshape(-1, c.num_kv_heads, c.head_dim)[:n]
        t = n - 1
        first = 0 if sliding_window is None else max(0, t - sliding_window + 1)
        if chunk_size is not None:
            first = max(first, t // chunk_size * chunk_size)
        for h in range(num_q_heads):
            s = scale * keys[first:, h // group] @ q64[b, h]
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            if sinks is not None:
                s = np.append(s, float(sinks[h]))
            top = s.max()
            out[b, h] = top + math.log(np.exp(s - top).sum())
    return out


def _plan(batch, variant: str, **kw) -> NativeDecodePlan:
    index = check_batch(batch.storage.config, batch.block_tables, batch.seq_lens, None)
    return NativeDecodePlan(batch.storage, index, AttentionParams.make(batch.storage.config.head_dim, **kw), variant)


@pytest.mark.parametrize("threads", [1, 2], ids=["1 thread", "2 threads"])
@pytest.mark.parametrize("feature", ["plain", "window", "soft cap", "chunk 12 (does not divide)", "chunk, window, cap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", AVAILABLE)
def test_lse_matches_the_float64_reference(backend, variant, dtype, feature, threads):
    rng = np.random.default_rng(70)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8], pad_value=10**6)
    q, q64 = random_query(backend, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    kw = FEATURES[feature]
    plan = _plan(batch, variant, **kw)
    with _torch_threads(threads):
        out, lse = plan.state(q, 1)
        again = plan.run(q, 1)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    np.testing.assert_allclose(lse.numpy(), reference_lse(batch, q64, 1, **kw), rtol=0,
                               atol=LSE_TOLERANCE[dtype], err_msg=f"lse {variant} {dtype} {feature}")
    assert torch.equal(out.to(q.dtype), again)  # the same output as run, before its rounding to q's dtype
    # unrounded, so within float32 arithmetic of the oracle on the stored values, whatever the pool dtype
    assert_oracle(out, oracle(batch, q64, 1, **kw), "float32", f"state output {variant} {dtype} {feature}")


@pytest.mark.parametrize("variant", AVAILABLE)
def test_lse_includes_the_sink(backend, variant):
    """A sink is a logit without a value: it joins the log-sum-exp (large ones neither overflow nor vanish)."""
    rng = np.random.default_rng(71)
    batch = make_batch(backend, make_config("float32", blocks=40), rng, [17, 5, 40, 1])
    q, q64 = random_query(backend, batch, rng, 4, "float32")
    sinks = np.asarray([30.0, -30.0, 2.0, 0.0], np.float32)
    _, lse = _plan(batch, variant).state(q, 0, sinks=sinks)
    np.testing.assert_allclose(lse.numpy(), reference_lse(batch, q64, 0, sinks=sinks), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kv_heads, q_heads, head_dim", [
    (2, 8, 64), (2, 6, 64), (1, 5, 128), (2, 2, 128), (2, 16, 32), (2, 8, 96), (2, 8, 48),
], ids=["g4-d64", "g3-d64", "g5-d128", "g1-d128", "g8-d32", "g4-d96", "g4-d48"])
@pytest.mark.parametrize("variant", AVAILABLE)
def test_bfloat16_pairs_match_the_oracle(backend, variant, kv_heads, q_heads, head_dim):
    """bfloat16 over head dims that take the even/odd widening (or, for some variants, do not), any group."""
    rng = np.random.default_rng(72)
    config = make_config("bfloat16", kv_heads=kv_heads, head_dim=head_dim, block_size=16, blocks=60)
    batch = make_batch(backend, config, rng, [33, 2, 161, 70, 16])
    q, q64 = random_query(backend, batch, rng, q_heads, "bfloat16")
    for kw in ({}, {"sliding_window": 21, "soft_cap": 3.0}):
        plan = _plan(batch, variant, **kw)
        out, lse = plan.state(q, 0)
        assert_oracle(out, oracle(batch, q64, 0, **kw), "float32", f"bfloat16 pairs {variant} {kw}")
        np.testing.assert_allclose(lse.numpy(), reference_lse(batch, q64, 0, **kw), rtol=0, atol=2e-5)
        assert_oracle(plan.run(q, 0), oracle(batch, q64, 0, **kw), "bfloat16", f"bfloat16 run {variant} {kw}")
