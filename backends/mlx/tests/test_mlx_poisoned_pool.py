"""Both kernels over a poisoned pool: slots a sequence does not own never reach an output.

The conformance check ``test_poisoned_pool`` runs the backend's default
kernel (``host`` on the cpu device); this runs both, with the small tile
budgets too (many decode tiles and row groups, so padding lands inside
tiles), and every feature. Every slot of the pool is NaN or Inf before the
sequences' own K/V are written; block 0 is the partly filled last block of
one sequence, so padding reads poison as well as a tail does.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import KERNELS, TOLERANCE, import_mlx, make_config, oracle, random_kv

mx = import_mlx()

from pagedkv_mlx import kernel_host, kernel_mlx  # noqa: E402
from pagedkv_mlx.attention import MlxAttention  # noqa: E402

BLOCK = 4
SEQ_LENS = (13, 1, 29, 6, 8)  # 4, 1, 8, 2, 2 blocks: short rows are padded; all but 8 end mid-block
Q_LENS = (6, 1, 12, 6, 3)
FEATURES = {
    "plain": {},
    "window": {"sliding_window": 5},
    "softcap": {"soft_cap": 2.0, "scale": 1.0},
    "chunk": {"chunk_size": 6},
    "noncausal": {"causal": False},
}


def _poisoned(backend, dtype: str, value: float, rng: np.random.Generator):
    """A pool full of ``value`` with the sequences' K/V written over it; block 0 ends the 6-token sequence."""
    need = [-(-n // BLOCK) for n in SEQ_LENS]
    config = make_config(dtype, num_blocks=sum(need) + 3, block_size=BLOCK)
    storage = backend.create_storage(config, "cpu")
    slots = np.arange(config.num_blocks * BLOCK)
    bad = np.full((slots.size, config.num_kv_heads, config.head_dim), value, np.float32)
    ids = list(rng.permutation(np.arange(1, config.num_blocks)))
    tables = np.full((len(need), max(need) + 1), -1, np.int32)
    for row, count in enumerate(need):
        tables[row, :count] = [ids.pop() for _ in range(count)]
    tables[3, need[3] - 1] = 0
    own = np.array([tables[b, p // BLOCK] * BLOCK + p % BLOCK for b, n in enumerate(SEQ_LENS) for p in range(n)])
    for layer in range(config.num_layers):
        storage.write(layer, slots, bad, bad)
        storage.write(layer, own, *random_kv(rng, own.size, config))
    return storage, tables


@pytest.mark.parametrize("small", [False, True], ids=["tiles", "small-tiles"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_poison_never_reaches_the_output(backend, kernel, dtype, poison, kind, feature, small, monkeypatch):
    if small:
        monkeypatch.setattr(kernel_host, "TILE_BYTES", 200)
        monkeypatch.setattr(kernel_host, "SCORE_ELEMS", 300)
        monkeypatch.setattr(kernel_mlx, "TILE_SLOTS", 40)
    options = FEATURES[feature]
    if kind == "decode" and not options.get("causal", True):
        pytest.skip("decode is causal by definition")
    rng = np.random.default_rng(11)
    storage, tables = _poisoned(backend, dtype, poison, rng)
    seq_lens = np.array(SEQ_LENS, np.int32)
    qsl = None if kind == "decode" else np.concatenate([[0], np.cumsum(Q_LENS)]).astype(np.int32)
    n = len(SEQ_LENS) if qsl is None else int(qsl[-1])
    q = backend.asarray(rng.standard_normal((n, 8, storage.config.head_dim)), "cpu", dtype)
    sinks = rng.uniform(-3, 3, 8).astype(np.float32)
    out = backend.to_numpy(MlxAttention(kernel).plan(storage, tables, seq_lens, qsl, **options).run(q, 1,
                                                                                                      sinks=sinks))
    assert np.isfinite(out).all(), f"non-finite output rows {sorted(set(np.argwhere(~np.isfinite(out))[:, 0]))}"
    want = oracle(backend, q, storage, 1, tables, seq_lens, qsl, sinks=sinks.astype(np.float64), **options)
    atol, rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, want, atol=atol, rtol=rtol)
