"""Attention over a poisoned pool: key slots a sequence does not own never reach its output.

Kernels read more than a sequence owns: they gather whole blocks (the
unused tail slots of a sequence's last block hold whatever a previous owner
left there), and they pad the short rows of a ragged batch with some valid
id (often block 0, which may belong to another sequence or to no one). That
is fine as long as those slots count for nothing; a kernel that reads them
and then only gives them weight 0 computes ``0 * NaN = NaN`` and one
sequence's garbage leaks into another's output.

Here every slot of every block of every layer, K and V, is first filled with
NaN (or +inf) through the storage's public ``write``; then only the real K/V
of a few sequences of different lengths is written over it. Decode and
prefill (and each listed feature: sliding window, soft-cap, chunked-local
attention, sinks) must then give finite outputs that match the float64
oracle, which reads owned positions only. Block 0 is either owned by no
sequence (pure poison, what padding reads) or the partly filled last block
of one (poison in its tail). Quantized pools refuse non-finite writes
(``NonFiniteValue``, see ``test_non_finite``), so they cannot be poisoned
this way and skip.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pagedkv_conformance.helpers import assert_close, input_dtype, make_config, make_query, make_storage, slots_for
from pagedkv_conformance.oracle import reference_attention
from pagedkv_core.dtypes import FLOAT_DTYPES

pytestmark = pytest.mark.pagedkv_area("attention")

BLOCK_SIZE = 16
HEADS, GROUP, HEAD_DIM, LAYERS, LAYER = 2, 2, 64, 2, 1
SEQ_LENS = (50, 5, 16, 1, 23, 33)
"""Rows of 4, 1, 1, 1, 2 and 3 blocks (short rows are padded); all but the 16-token one end mid-block."""
QUERY_LENS = (7, 5, 16, 1, 9, 2)
"""Prefill: whole sequences and chunks over a cached prefix."""
SPARE_BLOCKS = 4
"""Blocks no sequence of the batch owns (poison only)."""
TAIL_OWNER = 1
"""With block 0 as a tail: the sequence (5 tokens) whose only, partly filled, block it is."""

POISONS = {"nan": np.nan, "inf": np.inf}
FEATURES = {  # name -> (Capabilities.kernels entry it needs or None, attention options, sinks)
    "plain": (None, {}, False),
    "window": ("sliding_window", {"sliding_window": 20}, False),
    "softcap": ("soft_cap", {"soft_cap": 5.0, "scale": 1.0}, False),
    "chunked": ("chunked_local", {"chunk_size": 12}, False),
    "sinks": ("sinks", {}, True),
}


def _tables(rng: np.random.Generator, block0: str) -> tuple[np.ndarray, int]:
    """Shuffled tables over a pool with spare blocks, padded with -1; returns them and the pool's size.

    ``block0``: ``"unowned"`` keeps block 0 out of every table (a padding
    read of it is poison only); ``"tail"`` makes it the partly filled last
    block of sequence ``TAIL_OWNER`` (poison past that sequence's length).
    """
    need = [-(-n // BLOCK_SIZE) for n in SEQ_LENS]
    num_blocks = sum(need) + SPARE_BLOCKS
    ids = list(rng.permutation(np.arange(1, num_blocks)))
    table = np.full((len(need), max(need)), -1, np.int32)
    for row, count in enumerate(need):
        table[row, :count] = [ids.pop() for _ in range(count)]
    if block0 == "tail":
        table[TAIL_OWNER, need[TAIL_OWNER] - 1] = 0
    return table, num_blocks


def _poison(target, storage, value: float) -> None:
    """Write ``value`` into every slot of every layer, K and V, through the public ``write``."""
    c = storage.config
    slots = np.arange(c.num_blocks * c.block_size, dtype=np.int64)
    bad = np.full((slots.size, c.num_kv_heads, c.head_dim), value, np.float32)
    kind = input_dtype(c.dtype)
    for layer in range(c.num_layers):
        storage.write(layer, slots, target.backend.asarray(bad, target.device, kind),
                      target.backend.asarray(bad, target.device, kind))


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("block0", ["unowned", "tail"])
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_poisoned_pool_never_leaks(target, dtype, kernel, poison, block0, feature):
    if dtype not in FLOAT_DTYPES:
        pytest.skip(f"{dtype} pools refuse non-finite writes (NonFiniteValue): they cannot be poisoned")
    if kernel not in target.capabilities.kernels:
        pytest.skip(f"{target.id} has no {kernel} kernel")
    needs, options, with_sinks = FEATURES[feature]
    if needs is not None and needs not in target.capabilities.kernels:
        pytest.skip(f"{target.id} does not support {needs}")
    rng = np.random.default_rng(zlib.crc32(f"{kernel}-{poison}-{block0}-{feature}".encode()))
    tables, num_blocks = _tables(rng, block0)
    config = make_config(dtype, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, num_blocks=num_blocks,
                         block_size=BLOCK_SIZE, prefix=False)
    storage = make_storage(target, config)
    _poison(target, storage, POISONS[poison])
    slots = slots_for(tables, SEQ_LENS, BLOCK_SIZE)
    kind = input_dtype(dtype)
    for layer in range(LAYERS):
        k = rng.standard_normal((slots.size, HEADS, HEAD_DIM)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        storage.write(layer, slots, target.backend.asarray(k, target.device, kind),
                      target.backend.asarray(v, target.device, kind))
    k_pool, v_pool = storage.to_numpy(LAYER)
    owned = np.zeros(num_blocks * BLOCK_SIZE, bool)
    owned[slots] = True
    assert not np.isfinite(k_pool.reshape(-1, HEADS, HEAD_DIM)[~owned]).any() \
        and not np.isfinite(v_pool.reshape(-1, HEADS, HEAD_DIM)[~owned]).any(), \
        "the poison did not stick: every slot no sequence owns must hold it"

    seq_lens = np.asarray(SEQ_LENS, np.int32)
    num_queries = len(SEQ_LENS) if kernel == "decode" else sum(QUERY_LENS)
    q, q64 = make_query(target, rng, num_queries, HEADS * GROUP, HEAD_DIM, dtype)
    extra, sinks64 = {}, None
    if with_sinks:
        sinks = rng.uniform(-3.0, 3.0, HEADS * GROUP).astype(np.float32)
        extra, sinks64 = {"sinks": sinks}, sinks.astype(np.float64)
    attention = target.backend.attention
    if kernel == "decode":
        qsl = None
        out = attention.decode(q, storage, LAYER, tables, seq_lens, **options, **extra)
    else:
        qsl = np.concatenate([[0], np.cumsum(QUERY_LENS)]).astype(np.int32)
        out = attention.prefill(q, storage, LAYER, tables, seq_lens, qsl, **options, **extra)
    want = reference_attention(q64, k_pool, v_pool, tables, seq_lens, qsl, sinks=sinks64, **options)
    context = (f"poisoned pool ({poison} in every slot no sequence owns, block 0 {block0}): {kernel} {feature} "
               f"seq_lens={list(SEQ_LENS)} query_lens={None if kernel == 'decode' else list(QUERY_LENS)} "
               f"bs={BLOCK_SIZE} kv_heads={HEADS} q_heads={HEADS * GROUP} head_dim={HEAD_DIM} {options}")
    got = np.asarray(target.backend.to_numpy(out), np.float64)
    bad_rows = sorted({int(r) for r in np.argwhere(~np.isfinite(got))[:, 0]})
    assert not bad_rows, f"{target.id} ({dtype}): non-finite output in query rows {bad_rows}\n  case: {context}"
    assert_close(target, out, want, kernel, dtype, context)
