"""The Triton kernels run by Triton's interpreter on CPU tensors, against the float64 oracle.

Not collected by default (the name does not start with ``test_``):
``test_torch_triton_interpret.py`` runs this module in a subprocess with
``TRITON_INTERPRET=1`` set before triton is imported, so the rest of the
session keeps compiled kernels. To run it by hand::

    TRITON_INTERPRET=1 pytest backends/torch/tests/triton_interpret_cases.py

Shapes are tiny (the interpreter executes each program in NumPy) but cover
every branch: one split and several (the reduction pass), GQA group sizes 1,
2 and 4, windows, soft-caps, int8 scales, ragged prefill over cached
prefixes, and block ids that only the kernel's own bounds check stops; and
chunked-local attention (chunks smaller than, equal to and not dividing the
block size, query tiles that straddle a chunk boundary) and attention sinks
(joined once whether the context is split or not).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from torch_helpers import assert_close, make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_torch.attention import TorchAttention, triton_interpreting  # noqa: E402

if not triton_interpreting():
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

DTYPES = ["float32", "float16", "bfloat16", "int8"]
DECODE = {"plain": {}, "window and cap": {"sliding_window": 11, "soft_cap": 1.5}}


def _q_dtype(dtype):
    return "float32" if dtype == "int8" else dtype


def _check(backend, batch, out, q, q_np, dtype, what, **kw):
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 1, **kw), dtype, what)


@pytest.mark.parametrize("feature", list(DECODE))
@pytest.mark.parametrize("split_tokens", [None, 16], ids=["one split", "16-token splits"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(backend, dtype, split_tokens, feature):
    rng = np.random.default_rng(50)
    batch = make_batch(backend, make_config(dtype, blocks=16), rng, [37, 5, 20], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    attention = TorchAttention("triton", split_tokens=split_tokens)
    kw = DECODE[feature]
    out = attention.decode(q, batch.storage, 1, batch.block_tables, batch.seq_lens, **kw)
    _check(backend, batch, out, q, q_np, dtype, f"triton decode {dtype} {split_tokens} {feature}", **kw)


@pytest.mark.parametrize("kv_heads, q_heads", [(2, 2), (1, 4)], ids=["group 1", "group 4"])
def test_decode_group_sizes(backend, kv_heads, q_heads):
    rng = np.random.default_rng(51)
    batch = make_batch(backend, make_config(kv_heads=kv_heads, head_dim=24, blocks=16), rng, [30, 9])
    q, q_np = random_query(backend, batch, rng, q_heads, "float32")
    out = TorchAttention("triton", split_tokens=16).decode(q, batch.storage, 1, batch.block_tables, batch.seq_lens)
    _check(backend, batch, out, q, q_np, "float32", f"triton decode group {q_heads // kv_heads}")


PREFILL = {
    "ragged over prefixes": ([17, 0, 30, 9], [5, 0, 30, 1], {}),
    "window and cap, not causal": ([17, 30], [3, 20], {"sliding_window": 9, "soft_cap": 2.0, "causal": False}),
}


@pytest.mark.parametrize("case", list(PREFILL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(backend, dtype, case):
    rng = np.random.default_rng(52)
    lens, qlens, kw = PREFILL[case]
    batch = make_batch(backend, make_config(dtype, blocks=16), rng, lens, qlens)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    out = TorchAttention("triton").prefill(q, batch.storage, 1, batch.block_tables, batch.seq_lens,
                                           batch.query_start_loc, **kw)
    _check(backend, batch, out, q, q_np, dtype, f"triton prefill {dtype} {case}", **kw)


@pytest.mark.parametrize("bad_id", [-7, 16, 2**31 - 1])
def test_kernel_masks_block_ids_outside_the_pool(backend, bad_id):
    """Host validation normally stops these; tamper with the plan to reach the kernel's own check."""
    rng = np.random.default_rng(53)
    batch = make_batch(backend, make_config(blocks=16), rng, [16, 9])
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    for split_tokens in (None, 8):
        plan = TorchAttention("triton", split_tokens=split_tokens).plan(batch.storage, batch.block_tables,
                                                                        batch.seq_lens)
        plan.tables[0, 1] = bad_id  # sequence 0's second block (tokens 8..15)
        out = plan.run(q, 1)
        batch.seq_lens[0] = 8  # what is left: the first block only
        expected = oracle(batch, q_np, 1)
        batch.seq_lens[0] = 16
        assert_close(backend.to_numpy(out).astype(np.float64), expected, "float32", f"bad id {bad_id}")


def _assert_oracle(out, expected, dtype, what):
    """Against the float64 oracle within the conformance suite's per-dtype tolerance."""
    from pagedkv_conformance.tolerances import DEFAULT_TOLERANCES

    atol, rtol = DEFAULT_TOLERANCES[dtype]
    np.testing.assert_allclose(out.float().numpy().astype(np.float64), expected, atol=atol, rtol=rtol, err_msg=what)


CHUNKED = {  # make_config's block size is 8
    "chunk 3": {"chunk_size": 3},
    "chunk 8": {"chunk_size": 8},
    "chunk 12, window 9, cap": {"chunk_size": 12, "sliding_window": 9, "soft_cap": 1.5},
}
SINKS = {"no sinks": None, "sinks": np.array([30.0, -1e4, 1.5, -0.5], np.float32)}


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("feature", list(CHUNKED))
@pytest.mark.parametrize("split_tokens", [None, 16], ids=["one split", "16-token splits"])
def test_decode_chunked_and_sinks(backend, split_tokens, feature, sinks):
    rng = np.random.default_rng(54)
    batch = make_batch(backend, make_config(blocks=16), rng, [37, 5, 20, 24], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    kw, s = CHUNKED[feature], SINKS[sinks]
    out = TorchAttention("triton", split_tokens=split_tokens).decode(
        q, batch.storage, 1, batch.block_tables, batch.seq_lens, sinks=s, **kw)
    _assert_oracle(out, oracle(batch, q_np, 1, sinks=s, **kw), "float32", f"triton decode {feature} {sinks}")


@pytest.mark.parametrize("split_tokens", [None, 16], ids=["one split", "16-token splits"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_decode_chunked_sinks_narrow_pools(backend, dtype, split_tokens):
    rng = np.random.default_rng(55)
    batch = make_batch(backend, make_config(dtype, blocks=16), rng, [37, 5, 20], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    s = torch.tensor([2.0, -3.0, 0.5, 8.0], dtype=torch.bfloat16)
    out = TorchAttention("triton", split_tokens=split_tokens).decode(
        q, batch.storage, 1, batch.block_tables, batch.seq_lens, chunk_size=12, sinks=s)
    assert out.dtype == q.dtype
    _assert_oracle(out, oracle(batch, q_np, 1, chunk_size=12, sinks=s.float().numpy()), dtype,
                   f"triton decode {dtype} chunk and sinks")


PREFILL_CHUNKED = {  # query tiles of 16 rows straddle chunk boundaries
    "ragged over prefixes, chunk 5": ([17, 0, 30, 9], [5, 0, 30, 1], {"chunk_size": 5}),
    "chunk 12, window, cap": ([30, 20], [25, 20], {"chunk_size": 12, "sliding_window": 9, "soft_cap": 2.0}),
    "not causal, chunk 8": ([17, 30], [3, 20], {"chunk_size": 8, "causal": False}),
}


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("case", list(PREFILL_CHUNKED))
def test_prefill_chunked_and_sinks(backend, case, sinks):
    rng = np.random.default_rng(56)
    lens, qlens, kw = PREFILL_CHUNKED[case]
    batch = make_batch(backend, make_config(blocks=16), rng, lens, qlens)
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    s = SINKS[sinks]
    out = TorchAttention("triton").prefill(q, batch.storage, 1, batch.block_tables, batch.seq_lens,
                                           batch.query_start_loc, sinks=s, **kw)
    _assert_oracle(out, oracle(batch, q_np, 1, sinks=s, **kw), "float32", f"triton prefill {case} {sinks}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_prefill_chunked_sinks_narrow_pools(backend, dtype):
    rng = np.random.default_rng(57)
    batch = make_batch(backend, make_config(dtype, kv_heads=1, blocks=16), rng, [30, 9], [25, 9])
    q, q_np = random_query(backend, batch, rng, 4, _q_dtype(dtype))
    s = np.array([-20.0, 20.0, 0.0, 1.0])
    out = TorchAttention("triton").prefill(q, batch.storage, 1, batch.block_tables, batch.seq_lens,
                                           batch.query_start_loc, chunk_size=7, sinks=s)
    _assert_oracle(out, oracle(batch, q_np, 1, chunk_size=7, sinks=s), dtype, f"triton prefill {dtype} gqa 4")
