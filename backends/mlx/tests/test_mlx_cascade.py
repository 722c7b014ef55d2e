"""Cascade decode on MLX: which plan each case gets, a poisoned pool, and typed errors that change nothing.

The conformance check ``test_cascade`` compares the default kernel against
the float64 oracle for every dtype and feature; this pins down the MLX
specifics: the host kernel reads shared blocks once (a cascade plan), the
graph kernel and int8 pools plan as usual, NaN in slots no row owns never
reaches an output, and a bad query or layer raises before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import TOLERANCE, assert_unchanged, import_mlx, make_config, oracle, random_kv, snapshot

mx = import_mlx()

from pagedkv_core import errors  # noqa: E402
from pagedkv_core.blocks.cascade import build_cascade  # noqa: E402
from pagedkv_mlx.attention import MlxAttention, MlxPlan  # noqa: E402
from pagedkv_mlx.cascade import MlxCascadePlan  # noqa: E402

BLOCK = 4
SEQ_LENS = [4 * BLOCK + 3, 4 * BLOCK + 1, 4 * BLOCK, 2 * BLOCK + 2, 5]  # three share 4 blocks; two share none


def _batch(backend, dtype: str, rng: np.random.Generator, *, poison: float | None = None):
    """A storage whose first three rows share 4 blocks, their tables and layout; unowned slots hold ``poison``."""
    config = make_config(dtype, num_blocks=32, block_size=BLOCK, heads=2, head_dim=8)
    storage = backend.create_storage(config, "cpu")
    ids = iter(rng.permutation(config.num_blocks).tolist())
    prefix = [next(ids) for _ in range(4)]
    tables = np.full((len(SEQ_LENS), 6), -1, np.int32)
    for row, n in enumerate(SEQ_LENS):
        shared = prefix if row < 3 else []
        own = [next(ids) for _ in range(-(-n // BLOCK) - len(shared))]
        tables[row, :len(shared) + len(own)] = shared + own
    slots = sorted({int(tables[r, p // BLOCK]) * BLOCK + p % BLOCK for r, n in enumerate(SEQ_LENS) for p in range(n)})
    for layer in range(config.num_layers):
        if poison is not None:
            every = np.arange(config.num_blocks * BLOCK)
            bad = np.full((every.size, 2, 8), poison, np.float32)
            storage.write(layer, every, bad, bad)
        storage.write(layer, np.asarray(slots), *random_kv(rng, len(slots), config))
    lens = np.asarray(SEQ_LENS, np.int32)
    return storage, tables, lens, build_cascade(tables, lens, BLOCK, min_group_size=2, min_shared_blocks=1)


def _query(backend, dtype: str, rng: np.random.Generator):
    return backend.asarray(rng.standard_normal((len(SEQ_LENS), 4, 8)), "cpu", "float32" if dtype == "int8" else dtype)


def test_the_host_kernel_plans_a_cascade_and_the_others_plan_as_usual(backend, rng):
    storage, tables, lens, layout = _batch(backend, "float32", rng)
    assert "cascade" in backend.capabilities("cpu").kernels
    assert isinstance(backend.attention.plan(storage, tables, lens, cascade=layout), MlxCascadePlan)
    graph = MlxAttention(kernel="mlx").plan(storage, tables, lens, cascade=layout)
    assert isinstance(graph, MlxPlan)
    int8, tables8, lens8, layout8 = _batch(backend, "int8", rng)
    assert isinstance(backend.attention.plan(int8, tables8, lens8, cascade=layout8), MlxPlan)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_unowned_poison_never_reaches_an_output(backend, rng, dtype, poison):
    storage, tables, lens, layout = _batch(backend, dtype, rng, poison=poison)
    q = _query(backend, dtype, rng)
    out = backend.attention.plan(storage, tables, lens, soft_cap=20.0, cascade=layout).run(q, 1)
    want = oracle(backend, q, storage, 1, tables, lens, soft_cap=20.0)
    got = backend.to_numpy(out)
    assert np.isfinite(got).all()
    atol, rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def test_bad_queries_and_layers_raise_typed_errors_and_change_nothing(backend, rng):
    storage, tables, lens, layout = _batch(backend, "float16", rng)
    plan = backend.attention.plan(storage, tables, lens, cascade=layout)
    q = _query(backend, "float16", rng)
    before = snapshot(storage)
    bad = [
        (lambda: plan.run(np.zeros((5, 4, 8), np.float16), 0), errors.DeviceMismatch),
        (lambda: plan.run(q.astype(mx.float32), 0), errors.DTypeMismatch),
        (lambda: plan.run(q[:4], 0), errors.ShapeMismatch),
        (lambda: plan.run(q, 2), errors.InvalidArgument),
        (lambda: plan.run(q, 0, sinks=mx.array([np.inf, 0, 0, 0])), errors.InvalidArgument),
    ]
    for call, error in bad:
        with pytest.raises(error):
            call()
    assert_unchanged(storage, before)
