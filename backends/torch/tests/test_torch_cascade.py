"""Cascade (shared-prefix) decode of the torch backend: what the conformance check does not reach.

The conformance check (``checks/test_cascade.py``) covers two adjacent
groups, a row of its own and an empty suffix. Here: many groups of
different prefixes with their rows interleaved across the batch, a group
whose rows are far apart, the merge's accuracy in bfloat16 and float16 over a long
prefix, garbage (NaN) in the slots a member must not see, the fallbacks
(quantized pools, a layout without groups), and the sink checks on both
paths (with rows in no group, whose ordinary plan checks the sinks first,
and without).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, fill, make_config  # noqa: E402

from pagedkv_conformance.oracle import reference_attention  # noqa: E402
from pagedkv_core.blocks.cascade import build_cascade  # noqa: E402
from pagedkv_core.contract.attention import AttentionParams, check_batch  # noqa: E402
from pagedkv_core.errors import DTypeMismatch, InvalidArgument, ShapeMismatch  # noqa: E402
from pagedkv_torch import cascade_shared  # noqa: E402
from pagedkv_torch.attention import TorchAttention  # noqa: E402
from pagedkv_torch.cascade import TorchCascadePlan  # noqa: E402
from pagedkv_torch.native_decode import native_unavailable_reason  # noqa: E402

BS = 8


def shared_tables(rng, num_blocks: int, rows: list[tuple[int | None, int]], prefix_blocks: dict[int, int]):
    """Tables whose rows share prefixes: ``rows[i] = (group or None, own tokens)``; group g shares ``prefix_blocks[g]``.

    Blocks are drawn shuffled from the pool; entries past a row's blocks are
    -1 (padding that must never be read).
    """
    ids = iter(rng.permutation(num_blocks).tolist())
    prefixes = {g: [next(ids) for _ in range(n)] for g, n in prefix_blocks.items()}
    lens, own_ids = [], []
    for group, own in rows:
        prefix = prefixes[group] if group is not None else []
        n = len(prefix) * BS + own
        lens.append(n)
        own_ids.append(prefix + [next(ids) for _ in range(-(-n // BS) - len(prefix))])
    width = max(len(r) for r in own_ids)
    tables = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(own_ids):
        tables[i, :len(r)] = r
    return tables, np.asarray(lens, np.int32)


def make_case(backend, rows, prefix_blocks, *, dtype="float32", kv_heads=2, head_dim=32, seed=0, layers=2):
    rng = np.random.default_rng(seed)
    need = sum(prefix_blocks.values()) + sum(-(-own // BS) + 1 for _, own in rows)
    config = make_config(dtype, layers=layers, kv_heads=kv_heads, head_dim=head_dim, blocks=need + 4, block_size=BS)
    storage = backend.create_storage(config, "cpu")
    fill(backend, storage, rng)
    tables, lens = shared_tables(rng, config.num_blocks, rows, prefix_blocks)
    return storage, tables, lens, rng


def query(backend, storage, rng, batch: int, q_heads: int, dtype: str):
    q = backend.asarray(rng.standard_normal((batch, q_heads, storage.config.head_dim)).astype(np.float32),
                        "cpu", dtype)
    return q, backend.to_numpy(q).astype(np.float64)


def want(storage, q64, tables, lens, layer=1, **params):
    k_pool, v_pool = storage.to_numpy(layer)
    return reference_attention(q64, k_pool, v_pool, tables, lens, **params)


# 7 groups of 2-4 rows with prefixes of 1-6 blocks, their rows interleaved with each other and with 4 rows
# of their own; own levels of 0 (the prefix is all a row has), part of a block, and several blocks
MANY_ROWS = [(0, 5), (1, 0), (None, 30), (2, 17), (0, 8), (3, 1), (4, 40), (1, 9), (5, 3), (6, 16), (2, 0),
             (None, 1), (3, 24), (4, 7), (5, 0), (6, 2), (0, 33), (None, 8), (1, 12), (6, 5), (None, 64), (3, 3)]
MANY_PREFIXES = {0: 3, 1: 1, 2: 6, 3: 2, 4: 4, 5: 5, 6: 1}


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("features", [{}, {"soft_cap": 2.5, "scale": 0.4}], ids=["plain", "soft_cap"])
def test_many_interleaved_groups_match_the_oracle(backend, kernel, features):
    storage, tables, lens, rng = make_case(backend, MANY_ROWS, MANY_PREFIXES)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    assert layout.num_groups == 7 and (layout.shared_tokens == 0).sum() == 4
    q, q64 = query(backend, storage, rng, len(lens), 8, "float32")
    plan = TorchAttention(kernel).plan(storage, tables, lens, cascade=layout, **features)
    assert isinstance(plan, TorchCascadePlan)
    out = plan.run(q, 1)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(backend.to_numpy(out).astype(np.float64), want(storage, q64, tables, lens, **features), "float32",
                 f"cascade, 7 groups, {kernel} {features}")


def test_a_group_whose_rows_are_far_apart(backend):
    """Rows 0, 5 and 9 share 4 blocks; the rows between them have prefixes of their own, or none."""
    rows = [(0, 3), (None, 20), (1, 4), (None, 9), (1, 11), (0, 16), (None, 2), (2, 1), (2, 6), (0, 0)]
    storage, tables, lens, rng = make_case(backend, rows, {0: 4, 1: 2, 2: 3}, kv_heads=1)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    members = [sorted(layout.group(g)[0].tolist()) for g in range(layout.num_groups)]
    assert [0, 5, 9] in members
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    plan = TorchAttention().plan(storage, tables, lens, cascade=layout)
    assert_close(backend.to_numpy(plan.run(q, 1)).astype(np.float64), want(storage, q64, tables, lens), "float32",
                 "cascade, a group spread over the batch (MQA)")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "tiled"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merge_over_a_long_prefix(backend, dtype, fused, monkeypatch):
    """A 640-token prefix (several online-softmax tiles) merged with own levels: as close to the oracle as the plain plan.

    Where the shared level computes in float32 (float16 pools, and the tiled
    path of every dtype) the cascade rounds once, to q's dtype, so its error
    against the float64 oracle stays within the output's own rounding (half
    an ulp of the result, plus float32 arithmetic). The fused bfloat16 path
    also rounds the probabilities and the shared level's output to bfloat16
    (``cascade_shared``): its error may exceed one rounding, but not the plain
    plan's error by more than a rounding, in the worst value or on average.
    """
    if not fused:
        monkeypatch.setattr(cascade_shared, "fused_op", lambda: None)
    rows = [(0, 3), (0, 70), (0, 0), (0, 17), (1, 9), (1, 40)]
    storage, tables, lens, rng = make_case(backend, rows, {0: 80, 1: 3}, dtype=dtype, kv_heads=2, head_dim=64)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    q, q64 = query(backend, storage, rng, len(lens), 8, dtype)
    expected = want(storage, q64, tables, lens)
    plan = TorchAttention().plan(storage, tables, lens, cascade=layout)
    rounds_once = not plan.shared.fused
    assert plan.shared.fused == (fused and dtype == "bfloat16" and cascade_shared.fused_op() is not None)
    got = backend.to_numpy(plan.run(q, 1)).astype(np.float64)
    plain = backend.to_numpy(TorchAttention().plan(storage, tables, lens).run(q, 1)).astype(np.float64)
    rounding = np.abs(backend.to_numpy(backend.asarray(expected.astype(np.float32), "cpu", dtype)) - expected)
    err, plain_err = np.abs(got - expected), np.abs(plain - expected)
    if rounds_once:
        assert (err <= rounding + 1e-5 * (1 + np.abs(expected))).mean() > 0.99, err.max()
        assert err.max() <= 2 * plain_err.max() + 1e-6
    else:
        ulp = 2.0 ** -8 * np.abs(expected)  # one bfloat16 rounding, relative
        assert err.max() <= plain_err.max() + ulp.max(), (err.max(), plain_err.max())
        assert err.mean() <= plain_err.mean() + ulp.mean(), (err.mean(), plain_err.mean())
    assert_close(got, expected, dtype, f"cascade {dtype}")


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_sinks_on_both_paths(backend, kernel):
    """Sinks given as NumPy or as a tensor, with rows in no group (the ordinary plan checks them first) and without."""
    for rows in ([(0, 5), (None, 12), (0, 9), (1, 0), (1, 30)], [(0, 5), (0, 9), (1, 0), (1, 30)]):
        storage, tables, lens, rng = make_case(backend, rows, {0: 3, 1: 2})
        layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
        q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
        sinks = rng.uniform(-3, 3, 4).astype(np.float32)
        plan = TorchAttention(kernel).plan(storage, tables, lens, cascade=layout)
        expected = want(storage, q64, tables, lens, sinks=sinks.astype(np.float64))
        for given in (sinks, torch.from_numpy(sinks).to(torch.bfloat16).float(), torch.from_numpy(sinks)):
            out = backend.to_numpy(plan.run(q, 1, sinks=given)).astype(np.float64)
            exact = given.double().numpy() if isinstance(given, torch.Tensor) else sinks.astype(np.float64)
            assert_close(out, want(storage, q64, tables, lens, sinks=exact), "float32", f"sinks {type(given)}")
        assert np.abs(backend.to_numpy(plan.run(q, 1)) - expected).max() > 1e-3  # the sinks did something


BAD = {
    "too few heads": (np.zeros(3, np.float32), ShapeMismatch),
    "NaN": (np.array([0.0, np.nan, 0.0, 0.0], np.float32), InvalidArgument),
    "beyond float32": (np.array([0.0, 1e39, 0.0, 0.0]), InvalidArgument),
    "integers": (np.arange(4), DTypeMismatch),
    "tensor infinity": (torch.tensor([0.0, float("inf"), 0.0, 0.0]), InvalidArgument),
    "tensor of the wrong shape": (torch.zeros(8), ShapeMismatch),
}


@pytest.mark.parametrize("rest", [True, False], ids=["with rows in no group", "every row in a group"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_sinks_raise_the_ordinary_plans_errors(backend, case, rest):
    rows = [(0, 5), (None, 12), (0, 9)] if rest else [(0, 5), (0, 9)]
    storage, tables, lens, rng = make_case(backend, rows, {0: 2})
    plan = TorchAttention().plan(storage, tables, lens, cascade=build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1))
    q, _ = query(backend, storage, rng, len(lens), 4, "float32")
    sinks, error = BAD[case]
    with pytest.raises(error):
        plan.run(q, 1, sinks=sinks)


def test_query_checks_are_the_ordinary_plans(backend):
    storage, tables, lens, rng = make_case(backend, [(0, 5), (0, 9)], {0: 2})
    plan = TorchAttention().plan(storage, tables, lens, cascade=build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1))
    q, _ = query(backend, storage, rng, len(lens), 4, "float32")
    with pytest.raises(DTypeMismatch):
        plan.run(q.double(), 1)
    with pytest.raises(ShapeMismatch):
        plan.run(q[:, :3], 1)
    with pytest.raises(ShapeMismatch):
        plan.run(q[:1], 1)


def test_garbage_in_hidden_slots_never_reaches_the_output(backend):
    """NaN fills every slot first; only the batch's tokens are written over it (the tails of own blocks stay NaN)."""
    rows = [(0, 5), (0, 19), (0, 0), (None, 7), (1, 1), (1, 12)]
    storage, tables, lens, rng = make_case(backend, rows, {0: 3, 1: 2}, kv_heads=2)
    c = storage.config
    nan = np.full((c.num_blocks * BS, c.num_kv_heads, c.head_dim), np.nan, np.float32)
    storage.write(1, np.arange(c.num_blocks * BS), nan, nan)
    slots = np.unique(np.concatenate([tables[i, np.arange(n) // BS].astype(np.int64) * BS + np.arange(n) % BS
                                      for i, n in enumerate(lens)]))
    values = rng.standard_normal((2, slots.size, c.num_kv_heads, c.head_dim)).astype(np.float32)
    storage.write(1, slots, values[0], values[1])
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    expected = want(storage, q64, tables, lens)
    rows = layout.members  # row 3 is in no group: the ordinary plan's, checked by the conformance suite's poisoned pool
    for kernel in ("auto", "torch"):
        out = backend.to_numpy(TorchAttention(kernel).plan(storage, tables, lens, cascade=layout).run(q, 1))
        assert np.isfinite(out[rows]).all(), kernel
        assert_close(out[rows].astype(np.float64), expected[rows], "float32", f"poisoned, {kernel}")


def test_the_plan_serves_every_layer(backend):
    """Buffers are kept across ``run`` calls; layers of other values give their own results."""
    storage, tables, lens, rng = make_case(backend, [(0, 5), (None, 3), (0, 30), (0, 0)], {0: 140}, layers=3)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    plan = TorchAttention().plan(storage, tables, lens, cascade=layout)
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    for layer in (2, 0, 1, 0):
        assert_close(backend.to_numpy(plan.run(q, layer)).astype(np.float64),
                     want(storage, q64, tables, lens, layer=layer), "float32", f"layer {layer}")


def test_quantized_pools_and_layouts_without_groups_take_the_ordinary_plan(backend):
    storage, tables, lens, rng = make_case(backend, [(0, 5), (0, 9), (None, 4)], {0: 2}, dtype="int8")
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    assert layout.num_groups == 1
    attention = TorchAttention()
    plan = attention.plan(storage, tables, lens, cascade=layout)
    assert not isinstance(plan, TorchCascadePlan)
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    assert torch.equal(plan.run(q, 1), attention.plan(storage, tables, lens).run(q, 1))
    storage, tables, lens, rng = make_case(backend, [(None, 5), (None, 9)], {})
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    assert layout.num_groups == 0
    plan = attention.plan(storage, tables, lens, cascade=layout)
    assert type(plan) is type(attention.plan(storage, tables, lens))


def test_plan_cascade_checks_a_layout_handed_to_it_directly(backend):
    """``plan_cascade`` is public: a layout that lies is refused there too, before any block is read."""
    import dataclasses

    storage, tables, lens, _ = make_case(backend, [(0, 5), (0, 9), (None, 4)], {0: 2})
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    index = check_batch(storage.config, tables, lens)
    params = AttentionParams.make(storage.config.head_dim)
    wrong = layout.shared_blocks.copy()
    wrong[0] = 10**6
    with pytest.raises(InvalidArgument):
        TorchAttention().plan_cascade(storage, index, params, dataclasses.replace(layout, shared_blocks=wrong))


@pytest.mark.skipif(native_unavailable_reason() is not None, reason="the compiled CPU decode is not built")
def test_rows_in_no_group_run_the_compiled_decode(backend):
    storage, tables, lens, rng = make_case(backend, [(0, 5), (None, 9), (0, 2)], {0: 2})
    plan = TorchAttention().plan(storage, tables, lens, cascade=build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1))
    assert type(plan.rest_plan).__name__ == "NativeDecodePlan"
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    assert_close(backend.to_numpy(plan.run(q, 1)).astype(np.float64), want(storage, q64, tables, lens), "float32",
                 "rest rows on the compiled decode")


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_own_levels_run_the_kernel_the_ordinary_plan_would(backend, kernel):
    """The members' own blocks go through the compiled decode (its log-sum-exp output) where the ordinary plan
    would use it, through the torch-op decode's tiles where torch ops are forced: both merge to the oracle."""
    if kernel == "auto" and native_unavailable_reason() is not None:
        pytest.skip(str(native_unavailable_reason()))
    rows = [(0, 5), (0, 0), (0, 19), (1, 3), (1, 8)]
    storage, tables, lens, rng = make_case(backend, rows, {0: 4, 1: 2})
    plan = TorchAttention(kernel).plan(storage, tables, lens, cascade=build_cascade(tables, lens, BS, min_group_size=2,
                                                                                    min_shared_blocks=1))
    assert type(plan.own).__name__ == ("_NativeOwnLevel" if kernel == "auto" else "_OwnLevel")
    q, q64 = query(backend, storage, rng, len(lens), 4, "float32")
    assert_close(backend.to_numpy(plan.run(q, 0)).astype(np.float64), want(storage, q64, tables, lens, layer=0),
                 "float32", f"own levels on {kernel}")


def test_cascade_is_declared_on_every_device(backend):
    for device in [d for d in backend.devices() if backend.probe(d).available]:
        assert "cascade" in backend.capabilities(device).kernels, device
