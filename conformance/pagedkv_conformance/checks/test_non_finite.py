"""Non-finite values: a quantized pool refuses them whole; a float pool keeps them to their own token.

An int8 block shares one scale per KV head: an infinite value would make it
infinite and every earlier token of the block NaN. The contract is that the
write raises ``NonFiniteValue`` and changes nothing, in every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_conformance.helpers import input_dtype, make_config, make_storage, storage_state
from pagedkv_core.dtypes import is_quantized
from pagedkv_core.errors import NonFiniteValue

pytestmark = pytest.mark.pagedkv_area("storage")


def _write(target, storage, layer: int, slots, k: np.ndarray, v: np.ndarray) -> None:
    kind = input_dtype(storage.config.dtype)
    storage.write(layer, np.asarray(slots), target.backend.asarray(k, target.device, kind),
                  target.backend.asarray(v, target.device, kind))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "minus-inf", "nan"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_a_non_finite_value_never_spreads_to_other_tokens(target, dtype, bad, where):
    config = make_config(dtype, block_size=8, num_blocks=4, head_dim=64)
    storage = make_storage(target, config)
    rng = np.random.default_rng(7)
    earlier = rng.standard_normal((4, config.num_kv_heads, 64)).astype(np.float32)
    _write(target, storage, 0, [8, 9, 10, 11], earlier, -earlier)  # block 1, tokens 0-3
    before = storage_state(target, storage)
    k = rng.standard_normal((2, config.num_kv_heads, 64)).astype(np.float32)
    v = -k
    (k if where == "k" else v)[1, 0, 5] = bad
    if is_quantized(dtype):
        with pytest.raises(NonFiniteValue):
            _write(target, storage, 0, [12, 13], k, v)
        for got, want in zip(storage_state(target, storage), before):
            np.testing.assert_array_equal(got, want, err_msg="a refused write changed the pools")
        return
    _write(target, storage, 0, [12, 13], k, v)  # float pools store what they are given, token by token
    gk, gv = (np.asarray(target.backend.to_numpy(a), np.float64) for a in storage.gather(0, np.array([1]), 6))
    assert np.isfinite(gk[:4]).all() and np.isfinite(gv[:4]).all(), "earlier tokens of the block were damaged"
    stored = gk if where == "k" else gv
    assert np.isnan(stored[5, 0, 5]) if np.isnan(bad) else stored[5, 0, 5] == bad
    other = np.ones(stored.shape, bool)
    other[5, 0, 5] = False
    assert np.isfinite(stored[other]).all(), "the value spread beyond its own element"
