"""Cascade (shared-prefix) decode: ``plan(..., cascade=layout)`` equals the oracle on every backend.

A backend listing ``"cascade"`` reads each group's shared blocks once; one
that does not plans the batch as usual. Either way the result must be the
oracle's, for groups of different sizes and prefixes, rows in no group, a
suffix that is empty (the shared blocks are all a row has), soft-cap and,
where supported, sinks. The layout is checked before any work: a layout
that misdescribes the batch raises the same typed error everywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib

import numpy as np
import pytest

from pagedkv_conformance.cases import sink_logits
from pagedkv_conformance.helpers import assert_close, make_config, make_query, make_storage, slots_for, write_random
from pagedkv_conformance.oracle import reference_attention
from pagedkv_core import errors
from pagedkv_core.blocks.cascade import build_cascade

pytestmark = pytest.mark.pagedkv_area("attention")

BS = 16


def require_cascade_entry(target) -> None:
    """``plan(..., cascade=)`` comes with AttentionBase; an attention whose own ``plan`` predates it skips."""
    plan = getattr(target.backend.attention, "plan", None)
    try:
        takes_it = "cascade" in inspect.signature(plan).parameters
    except (TypeError, ValueError):
        takes_it = False
    if not takes_it:
        pytest.skip(f"{target.id}: its attention's plan() has no cascade= (written before it, or to the bare "
                    "Attention protocol; AttentionBase.plan provides it)")


def _shared_batch(rng: np.random.Generator, num_blocks: int):
    """Tables of 7 rows: a group of 3 sharing 4 blocks, a group of 2 sharing 2, two rows of their own."""
    ids = iter(rng.permutation(num_blocks).tolist())
    prefix_a = [next(ids) for _ in range(4)]
    prefix_b = [next(ids) for _ in range(2)]
    lens = [64 + 9, 64 + 1, 64, 32 + 17, 32 + 5, 40, 7]  # row 2's suffix is empty: it owns exactly the 4 blocks
    tables = np.full((7, 6), -1, np.int32)
    prefixes = [prefix_a, prefix_a, prefix_a, prefix_b, prefix_b, [], []]
    for row, (n, prefix) in enumerate(zip(lens, prefixes)):
        own = [next(ids) for _ in range(-(-n // BS) - len(prefix))]
        tables[row, :len(prefix) + len(own)] = prefix + own
    return tables, np.asarray(lens, np.int32)


def _write_prefixes(target, storage, tables, lens, rng):
    """Write every position once (a shared block's slots are written by its first owner only)."""
    seen: set[int] = set()
    slots = [s for s in slots_for(tables, lens, BS).tolist() if not (s in seen or seen.add(s))]
    write_random(target, storage, np.asarray(slots, np.int64), rng)


@pytest.mark.parametrize("soft_cap, sinks", [(None, None), (30.0, None), (None, "moderate")],
                         ids=["plain", "soft_cap", "sinks"])
def test_cascade_decode_matches_oracle(target, dtype, soft_cap, sinks):
    if "decode" not in target.capabilities.kernels:
        pytest.skip(f"{target.id} has no decode kernel")
    require_cascade_entry(target)
    if sinks is not None and "sinks" not in target.capabilities.kernels:
        pytest.skip(f"{target.id} does not support sinks")
    rng = np.random.default_rng(zlib.crc32(f"cascade-{soft_cap}-{sinks}".encode()))
    config = make_config(dtype, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=BS)
    storage = make_storage(target, config)
    tables, lens = _shared_batch(rng, config.num_blocks)
    _write_prefixes(target, storage, tables, lens, rng)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    assert layout.num_groups == 2 and layout.shared_tokens.tolist() == [64, 64, 64, 32, 32, 0, 0]
    q, q64 = make_query(target, rng, len(lens), 8, 64, dtype)
    extra = {}
    sinks64 = None
    if sinks is not None:
        extra["sinks"] = sink_logits(sinks, 8, rng)
        sinks64 = np.asarray(target.backend.to_numpy(extra["sinks"]), np.float64)
    plan = target.backend.attention.plan(storage, tables, lens, soft_cap=soft_cap, cascade=layout)
    out = plan.run(q, 1, **extra)
    k_pool, v_pool = storage.to_numpy(1)
    want = reference_attention(q64, k_pool, v_pool, tables, lens, soft_cap=soft_cap, sinks=sinks64)
    assert_close(target, out, want, "decode", dtype, f"cascade soft_cap={soft_cap} sinks={sinks}")
    plain = target.backend.attention.plan(storage, tables, lens, soft_cap=soft_cap).run(q, 1, **extra)
    assert_close(target, out, np.asarray(target.backend.to_numpy(plain), np.float64), "decode", dtype,
                 "cascade against the same backend without it")


def test_a_layout_that_misdescribes_the_batch_is_refused(target):
    require_cascade_entry(target)
    config = make_config("float32", num_kv_heads=2, head_dim=64, num_blocks=64, block_size=BS)
    storage = make_storage(target, config)
    rng = np.random.default_rng(7)
    tables, lens = _shared_batch(rng, config.num_blocks)
    layout = build_cascade(tables, lens, BS, min_group_size=2, min_shared_blocks=1)
    attention = target.backend.attention
    wrong_block = layout.shared_blocks.copy()
    wrong_block[0] = tables[5, 0]
    stolen_row = layout.members.copy()
    stolen_row[0] = 5
    tokens = layout.shared_tokens.copy()
    tokens[6] = 16
    bad = [
        dataclasses.replace(layout, shared_blocks=wrong_block),
        dataclasses.replace(layout, members=stolen_row),
        dataclasses.replace(layout, shared_tokens=tokens),
        dataclasses.replace(layout, shared_tokens=layout.shared_tokens[:-1]),
        dataclasses.replace(layout, group_indptr=layout.group_indptr[::-1].copy()),
        dataclasses.replace(layout, block_size=8),
        "not a layout",
    ]
    for layout_ in bad:
        with pytest.raises(errors.InvalidArgument):
            attention.plan(storage, tables, lens, cascade=layout_)
    with pytest.raises(errors.InvalidArgument, match="sliding_window"):
        attention.plan(storage, tables, lens, sliding_window=8, cascade=layout)
    qsl = np.arange(len(lens) + 1, dtype=np.int32)
    qsl[1:] += 1  # two queries for the first row: a prefill step
    with pytest.raises(errors.InvalidArgument, match="decode"):
        attention.plan(storage, tables, lens, qsl, cascade=layout)
