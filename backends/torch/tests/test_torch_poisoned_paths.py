"""Every torch kernel path over a poisoned pool: slots a sequence does not own never reach its output.

The conformance check (``test_poisoned_pool``) runs the backend's default
kernels; this runs the torch-ops decode too (``kernel="torch"``, the path
without the compiled CPU decode, and the CUDA/MPS path without Triton),
whose tiles pad short rows with block 0 and read whole blocks.
"""

import numpy as np
import pytest
import torch

from pagedkv_conformance.oracle import reference_attention
from pagedkv_core import CacheConfig
from pagedkv_torch.attention import TorchAttention
from pagedkv_torch.storage import TorchStorage

SEQ_LENS = (50, 5, 16, 1, 23, 33)
BS, HEADS, DIM = 16, 2, 32


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 20}, {"soft_cap": 5.0}, {"chunk_size": 12}],
                         ids=["plain", "window", "softcap", "chunked"])
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_decode_over_a_poisoned_pool(kernel, options, poison):
    rng = np.random.default_rng(0)
    need = [-(-n // BS) for n in SEQ_LENS]
    num_blocks = sum(need) + 3
    ids = list(rng.permutation(np.arange(1, num_blocks)))
    tables = np.full((len(need), max(need)), -1, np.int32)
    for row, count in enumerate(need):
        tables[row, :count] = [ids.pop() for _ in range(count)]
    storage = TorchStorage(CacheConfig(num_layers=1, num_kv_heads=HEADS, head_dim=DIM, num_blocks=num_blocks,
                                       block_size=BS), "cpu")
    every = np.arange(num_blocks * BS)
    bad = torch.full((every.size, HEADS, DIM), poison)
    storage.write(0, every, bad, bad)
    slots = np.array([tables[i, p // BS] * BS + p % BS for i, n in enumerate(SEQ_LENS) for p in range(n)])
    k, v = (torch.from_numpy(rng.standard_normal((slots.size, HEADS, DIM)).astype(np.float32)) for _ in range(2))
    storage.write(0, slots, k, v)
    q = torch.from_numpy(rng.standard_normal((len(SEQ_LENS), 2 * HEADS, DIM)).astype(np.float32))
    lens = np.asarray(SEQ_LENS, np.int32)
    try:
        out = TorchAttention(kernel).decode(q, storage, 0, tables, lens, **options)
    except Exception as exc:  # the compiled decode is optional: a build without it says so
        if kernel == "native" and "native" in str(exc).lower():
            pytest.skip(str(exc))
        raise
    k_pool, v_pool = storage.to_numpy(0)
    want = reference_attention(q.numpy().astype(np.float64), k_pool, v_pool, tables, lens, **options)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), want, rtol=2e-4, atol=2e-4)
