"""The host kernel's bfloat16 paths: split head-dim halves in decode, zero-copy views, host-side output.

Every decode case of ``test_mlx_attention`` already runs the split path
(bfloat16, even head dims); these pin what they do not reach: the fallback
for an odd head dim, the conversion helpers' edge cases, and that the split
halves agree bit for bit with the plain float32 conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import TOLERANCE, fill, import_mlx, make_config, oracle, random_tables

from pagedkv_core import errors

mx = import_mlx()

from pagedkv_mlx.arrays import bf16_bits_to_f32, host_view  # noqa: E402
from pagedkv_mlx.attention import MlxAttention  # noqa: E402
from pagedkv_mlx.kernel_host import _Gather  # noqa: E402


@pytest.mark.parametrize("head_dim", [7, 8], ids=["odd-head-dim", "even-head-dim"])
def test_bf16_decode_matches_oracle_with_either_head_dim(backend, rng, head_dim):
    """An odd head dim cannot be split into word halves: the plain conversion runs instead."""
    config = make_config("bfloat16", head_dim=head_dim, num_blocks=40)
    storage = backend.create_storage(config, "cpu")
    fill(storage, rng)
    seq_lens = np.array([13, 1, 29, 8], np.int32)
    tables = random_tables(rng, seq_lens, config)
    q = backend.asarray(rng.standard_normal((4, 8, head_dim)), "cpu", "bfloat16")
    plan = MlxAttention("host").plan(storage, tables, seq_lens)
    assert plan.kernel._split == (head_dim % 2 == 0)
    got = backend.to_numpy(plan.run(q, 1))
    atol, rtol = TOLERANCE["bfloat16"]
    np.testing.assert_allclose(got, oracle(backend, q, storage, 1, tables, seq_lens), atol=atol, rtol=rtol)


def test_split_halves_are_the_exact_float32_values(rng):
    """``_Gather.split`` gives the even and odd dims, bit for bit what the full conversion gives."""
    config = make_config("bfloat16", head_dim=8, heads=2, block_size=4)
    values = rng.standard_normal((10, 4, 2, 8)).astype(np.float32)
    pool = host_view(mx.array(values).astype(mx.bfloat16)).reshape(10, -1)
    ids = np.array([[3, 0, 7], [9, 9, 1]])
    full = _Gather(config, bf16=True)(pool, None, ids).reshape(2, 12, 2, 8)
    halves = _Gather(config, bf16=True).split(pool.view(np.uint32), ids)
    assert halves.shape == (2, 2, 12, 2, 4)
    np.testing.assert_array_equal(halves[0], full[..., 0::2])
    np.testing.assert_array_equal(halves[1], full[..., 1::2])


def test_host_view_of_bfloat16_is_zero_copy_or_strided(rng):
    """Contiguous bfloat16 arrays are read in place; strided ones (a transpose) still give the right bits."""
    x = mx.array(rng.standard_normal((6, 5)).astype(np.float32)).astype(mx.bfloat16)
    bits = np.array(x.view(mx.uint16))
    view = host_view(x)
    assert view.dtype == np.uint16 and view.shape == (6, 5)
    np.testing.assert_array_equal(view, bits)
    np.testing.assert_array_equal(host_view(x.T), bits.T)
    np.testing.assert_array_equal(host_view(x * 2), np.array((x * 2).view(mx.uint16)))  # lazy: evaluated
    assert host_view(mx.zeros((0, 3), mx.bfloat16)).shape == (0, 3)


def test_bf16_bits_to_f32_checks_its_output_buffer():
    bits = np.array([[0x3F80, 0xC000]], np.uint16)  # 1.0, -2.0
    np.testing.assert_array_equal(bf16_bits_to_f32(bits), [[1.0, -2.0]])
    out = np.empty((1, 2), np.float32)
    assert bf16_bits_to_f32(bits, out=out) is out and out.tolist() == [[1.0, -2.0]]
    for bad in (np.empty((2, 1), np.float32), np.empty((1, 2), np.float64), np.empty((2, 2), np.float32)[:, :1].T):
        with pytest.raises(errors.InvalidArgument):
            bf16_bits_to_f32(bits, out=bad)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_host_output_is_built_in_the_queries_dtype(backend, rng, dtype):
    """The float32 result becomes ``q``'s dtype in MLX's constructor (no astype node): dtype, shape, values."""
    config = make_config(dtype, num_blocks=40)
    storage = backend.create_storage(config, "cpu")
    fill(storage, rng)
    seq_lens = np.array([9, 30], np.int32)
    tables = random_tables(rng, seq_lens, config)
    q = backend.asarray(rng.standard_normal((2, 4, 8)), "cpu", dtype)
    out = MlxAttention("host").plan(storage, tables, seq_lens).run(q, 0)
    assert out.dtype == q.dtype and out.shape == q.shape
    atol, rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(backend.to_numpy(out), oracle(backend, q, storage, 0, tables, seq_lens), atol=atol,
                               rtol=rtol)
