"""The compiled CPU decode kernel (``kernel="native"``) against the float64 oracle.

Every instruction-set variant this CPU can run is checked (the portable
8-lane build everywhere; AVX2 and AVX-512 where the CPU has them), on one
thread and on several (items split by KV-head slices), over shapes that hit
each edge of the kernel: head dims that are not a multiple of the vector
width, query groups that are not a multiple of the 4-head micro-tile, blocks
longer than a 16-token chunk, windows that start mid-block, and stale data
after ``seq_len`` in a sequence's last block; chunked-local attention with
chunks smaller than, equal to and not dividing the block size (alone and
with a window and soft-cap), and attention sinks (large positive and
negative logits, GQA, with chunks) on every pool dtype.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, make_batch, make_config, oracle, random_query  # noqa: E402

from pagedkv_core.contract.attention import AttentionParams, check_batch  # noqa: E402
from pagedkv_core.errors import UnsupportedOperation  # noqa: E402
from pagedkv_torch import native_decode  # noqa: E402
from pagedkv_torch.attention import TorchAttention  # noqa: E402
from pagedkv_torch.native_decode import NativeDecodePlan, native_unavailable_reason, native_variant  # noqa: E402

pytestmark = pytest.mark.skipif(native_unavailable_reason() is not None, reason=str(native_unavailable_reason()))

VARIANTS = {"generic": 0, "avx2": 1, "avx512": 2}
AVAILABLE = [v for v in VARIANTS if native_variant() is not None and VARIANTS[v] <= VARIANTS.get(native_variant(), 0)]
DTYPES = ["float32", "float16", "bfloat16", "int8"]
FEATURES = {  # make_config's block size is 8
    "plain": {},
    "window": {"sliding_window": 7},
    "soft cap": {"soft_cap": 2.0},
    "window and cap": {"sliding_window": 20, "soft_cap": 1.5, "scale": 0.3},
    "chunk 3 (< block)": {"chunk_size": 3},
    "chunk 8 (= block)": {"chunk_size": 8},
    "chunk 12 (does not divide)": {"chunk_size": 12},
    "chunk, window, cap": {"chunk_size": 12, "sliding_window": 9, "soft_cap": 1.5, "scale": 0.3},
}
SINKS = {  # per query head of 4
    "large": [30.0, -30.0, 1e4, -1e4],
    "ordinary": [0.5, -1.0, 2.0, 0.0],
}


@contextmanager
def _torch_threads(n: int):
    """Run the body with ``n`` torch threads (the kernel splits items across that many)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    with _torch_threads(request.param):
        yield request.param


def _decode(batch, q, layer, variant="auto", sinks=None, **kw):
    index = check_batch(batch.storage.config, batch.block_tables, batch.seq_lens, None)
    params = AttentionParams.make(batch.storage.config.head_dim, **kw)
    return NativeDecodePlan(batch.storage, index, params, variant).run(q, layer, sinks=sinks)


def assert_oracle(actual, expected: np.ndarray, dtype: str, what: str) -> None:
    """Against the float64 oracle within the conformance suite's per-dtype tolerance."""
    from pagedkv_conformance.tolerances import DEFAULT_TOLERANCES

    atol, rtol = DEFAULT_TOLERANCES[dtype]
    np.testing.assert_allclose(actual.float().numpy().astype(np.float64), expected, atol=atol, rtol=rtol,
                               err_msg=what)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", AVAILABLE)
def test_decode(backend, variant, dtype, feature, threads):
    rng = np.random.default_rng(60)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    kw = FEATURES[feature]
    out = _decode(batch, q, 1, variant, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 1, **kw), dtype,
                 f"native {variant} {dtype} {feature}")


@pytest.mark.parametrize("sinks", list(SINKS))
@pytest.mark.parametrize("feature", ["plain", "chunk 3 (< block)", "chunk, window, cap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", AVAILABLE)
def test_decode_sinks(backend, variant, dtype, feature, sinks, threads):
    """Each head's sink starts its online softmax: large logits neither overflow nor vanish, on every dtype."""
    rng = np.random.default_rng(160)
    batch = make_batch(backend, make_config(dtype, blocks=40), rng, [17, 5, 40, 1, 8], pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, 4, "float32" if dtype == "int8" else dtype)
    s = np.asarray(SINKS[sinks], np.float32)
    kw = FEATURES[feature]
    out = _decode(batch, q, 1, variant, torch.from_numpy(s), **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_oracle(out, oracle(batch, q_np, 1, sinks=s, **kw), dtype, f"native {variant} {dtype} {feature} {sinks}")


@pytest.mark.parametrize("kv_heads, q_heads, block_size, head_dim", [
    (2, 2, 8, 32), (1, 8, 16, 64), (4, 8, 4, 40), (3, 9, 32, 72),
], ids=["mha", "mqa-bs16-d64", "gqa2-bs4-d40", "gqa3-bs32-d72"])
@pytest.mark.parametrize("variant", AVAILABLE)
def test_sinks_with_gqa_and_chunks(backend, variant, kv_heads, q_heads, block_size, head_dim, threads):
    """A sink per query head, also within one KV head's group, with chunks that cut blocks anywhere."""
    rng = np.random.default_rng(161)
    config = make_config(kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, blocks=300)
    batch = make_batch(backend, config, rng, [33, 2, 161, 70])
    q, q_np = random_query(backend, batch, rng, q_heads, "float32")
    s = rng.uniform(-6, 6, q_heads)
    for kw in ({}, {"chunk_size": 20}, {"chunk_size": 64, "sliding_window": 45}):
        out = _decode(batch, q, 0, variant, s, **kw)
        assert_oracle(out, oracle(batch, q_np, 0, sinks=s, **kw), "float32", f"native {variant} gqa sinks {kw}")


def test_the_kernel_refuses_a_negative_chunk(backend):
    batch = make_batch(backend, make_config(), np.random.default_rng(162), [12])
    c = batch.storage.config
    k, v = batch.storage.pools(0)
    tables, lens = torch.zeros(1, 2, dtype=torch.int64), torch.tensor([12])
    q = torch.zeros(1, 2, 32)
    with pytest.raises(ValueError, match="invalid decode arguments"):
        native_decode._cpu_decode.decode(q.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, 0,
                                         tables.data_ptr(), lens.data_ptr(), 1, 2, c.num_blocks, c.num_kv_heads, 1,
                                         c.head_dim, c.block_size, 0, 4, c.num_kv_heads, 0, 0.1, 0.0, 0, 1, chunk=-1)


@pytest.mark.parametrize("kv_heads, q_heads, block_size, head_dim", [
    (2, 2, 8, 32), (1, 8, 16, 64), (4, 8, 4, 40), (3, 9, 32, 72), (2, 14, 64, 24), (1, 5, 1, 16),
], ids=["mha", "mqa-bs16-d64", "gqa2-bs4-d40", "gqa3-bs32-d72", "gqa7-bs64-d24", "gqa5-bs1-d16"])
@pytest.mark.parametrize("variant", AVAILABLE)
def test_shapes(backend, variant, kv_heads, q_heads, block_size, head_dim, threads):
    rng = np.random.default_rng(61)
    config = make_config(kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, blocks=300)
    batch = make_batch(backend, config, rng, [33, 2, 161, 70])
    q, q_np = random_query(backend, batch, rng, q_heads, "float32")
    for kw in ({}, {"sliding_window": 45}, {"chunk_size": 50}, {"chunk_size": 7, "sliding_window": 5}):
        out = _decode(batch, q, 0, variant, **kw)
        assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0, **kw), "float32",
                     f"native {variant} shape {kw}")


@pytest.mark.parametrize("variant", AVAILABLE)
def test_scores_far_apart_stay_finite(backend, variant):
    """The online softmax rescales by the running maximum: scores in the thousands neither overflow nor vanish."""
    rng = np.random.default_rng(62)
    batch = make_batch(backend, make_config(blocks=40), rng, [100, 37])
    q, q_np = random_query(backend, batch, rng, 4, "float32")
    for factor in (300.0, 1e-4):
        out = _decode(batch, q * factor, 0, variant)
        assert torch.isfinite(out).all()
        assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np * factor, 0), "float32",
                     f"scale {factor}")


@pytest.mark.parametrize("variant", AVAILABLE)
def test_float16_pool_spanning_its_range(backend, variant):
    """Subnormal, tiny and large float16 values widen exactly (the kernel converts half floats bit by bit)."""
    rng = np.random.default_rng(63)
    batch = make_batch(backend, make_config("float16", blocks=12), rng, [40, 9])
    c = batch.storage.config
    slots = np.arange(c.num_blocks * c.block_size)
    magnitudes = np.array([6e-8, 3e-6, 1e-4, 0.5, 1.0, 300.0, 6e4], np.float32)
    for layer in range(c.num_layers):
        k = rng.choice(magnitudes, (slots.size, c.num_kv_heads, c.head_dim)) * rng.choice([-1, 1], (slots.size, 1, 1))
        v = rng.choice(magnitudes, (slots.size, c.num_kv_heads, c.head_dim)) * rng.choice([-1, 1], (slots.size, 1, 1))
        batch.storage.write(layer, slots, backend.asarray(k.astype(np.float32) * 1e-3, "cpu", "float16"),
                            backend.asarray(v.astype(np.float32), "cpu", "float16"))
    q, q_np = random_query(backend, batch, rng, 2, "float16")
    out = _decode(batch, q, 0, variant)
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), "float16", "float16 range")


@pytest.mark.parametrize("variant", AVAILABLE)
def test_float16_infinity_stays_infinite(backend, variant):
    rng = np.random.default_rng(68)
    batch = make_batch(backend, make_config("float16", blocks=12), rng, [40, 9])
    v = np.zeros((1, 2, 32), np.float32)
    v[0, 0, 3] = np.inf
    slot = int(batch.block_tables[0, 2]) * batch.storage.config.block_size + 5  # token 21 of sequence 0
    batch.storage.write(0, [slot], backend.asarray(np.zeros_like(v), "cpu", "float16"),
                        backend.asarray(v, "cpu", "float16"))
    q, q_np = random_query(backend, batch, rng, 4, "float16")
    out = backend.to_numpy(_decode(batch, q, 0, variant)).astype(np.float64)
    assert np.isposinf(out[0, :2, 3]).all()  # the two query heads of KV head 0
    want = oracle(batch, q_np, 0)
    finite = np.isfinite(want)
    assert_close(out[finite], want[finite], "float16", "finite outputs beside an infinity")


@pytest.mark.parametrize("variant", AVAILABLE)
def test_variants_agree(backend, variant):
    """Each variant sums in its own order, so results may differ in the last bits, never more."""
    rng = np.random.default_rng(64)
    batch = make_batch(backend, make_config("bfloat16", blocks=40), rng, [60, 3, 17])
    q, _ = random_query(backend, batch, rng, 4, "bfloat16")
    reference = _decode(batch, q, 0, "generic").float()
    assert torch.allclose(_decode(batch, q, 0, variant).float(), reference, atol=1e-2, rtol=1e-2)


def test_int8_pool_takes_half_precision_queries(backend):
    rng = np.random.default_rng(65)
    batch = make_batch(backend, make_config("int8"), rng, [20, 9])
    for q_dtype in ("float16", "bfloat16"):
        q, q_np = random_query(backend, batch, rng, 4, q_dtype)
        out = TorchAttention("native").decode(q, batch.storage, 0, batch.block_tables, batch.seq_lens)
        assert out.dtype == q.dtype
        assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0), q_dtype, "int8 pool")


def test_auto_picks_native_for_cpu_decode_and_torch_ops_for_prefill(backend):
    rng = np.random.default_rng(66)
    batch = make_batch(backend, make_config(), rng, [12, 30], [12, 3])
    assert backend.attention.kernel_for(batch.storage) == "native"
    decode = backend.attention.plan(batch.storage, batch.block_tables, batch.seq_lens)
    prefill = backend.attention.plan(batch.storage, batch.block_tables, batch.seq_lens, batch.query_start_loc)
    assert isinstance(decode, NativeDecodePlan)
    assert not isinstance(prefill, NativeDecodePlan)
    q, q_np = random_query(backend, batch, rng, 2, "float32")
    assert_close(backend.to_numpy(prefill.run(q, 0)).astype(np.float64), oracle(batch, q_np, 0), "float32",
                 "native kernel's prefill")


def test_missing_extension_falls_back_with_the_reason(backend, monkeypatch):
    storage = backend.create_storage(make_config(), "cpu")
    monkeypatch.setattr(native_decode, "_MISSING", "the native CPU kernel was not built (no compiler)")
    assert backend.attention.kernel_for(storage) == "torch"
    with pytest.raises(UnsupportedOperation, match="no compiler"):
        TorchAttention("native").plan(storage, np.array([[0]]), np.array([3]))


@pytest.mark.parametrize("threads_", [1, 3])
def test_unknown_variant_is_refused(backend, threads_):
    """Refused on every thread, and only after all of the step's tasks have returned."""
    rng = np.random.default_rng(67)
    batch = make_batch(backend, make_config(), rng, [12, 5, 30])
    q, _ = random_query(backend, batch, rng, 2, "float32")
    with _torch_threads(threads_), pytest.raises(ValueError, match="not available"):
        _decode(batch, q, 0, "sve2")


@st.composite
def _cases(draw):
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    head_dim, block_size = draw(st.integers(1, 70)), draw(st.integers(1, 24))
    lens = draw(st.lists(st.integers(1, 90), min_size=1, max_size=4))
    params = {}
    if draw(st.booleans()):
        params["sliding_window"] = draw(st.integers(1, 100))
    if draw(st.booleans()):
        params["soft_cap"] = draw(st.floats(0.5, 30.0))
    if draw(st.booleans()):
        params["chunk_size"] = draw(st.integers(1, 100))
    if draw(st.booleans()):  # a sink per query head, from negligible to dominant
        params["sinks"] = draw(st.lists(st.floats(-50.0, 50.0), min_size=kv_heads * group,
                                        max_size=kv_heads * group))
    dtype = draw(st.sampled_from(DTYPES))
    return kv_heads, group, head_dim, block_size, lens, params, dtype, draw(st.sampled_from(AVAILABLE)), draw(
        st.integers(1, 3)), draw(st.integers(0, 2**32 - 1))


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=60, **_SETTINGS)
@given(_cases())
def test_random_batches_match_the_oracle(backend, case):
    """Any head count, head dim, block size, ragged lengths, window, cap, chunk and sinks, on 1-3 threads."""
    _check_random_batch(backend, case)


@pytest.mark.slow
@settings(max_examples=2000, **_SETTINGS)
@given(_cases())
def test_random_batches_match_the_oracle_long_sweep(backend, case):
    """The same property over 2,000 examples (``make test-all``)."""
    _check_random_batch(backend, case)


def _check_random_batch(backend, case):
    kv_heads, group, head_dim, block_size, lens, params, dtype, variant, threads, seed = case
    rng = np.random.default_rng(seed)
    blocks = sum(-(-n // block_size) for n in lens)
    config = make_config(dtype, layers=1, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                         blocks=blocks + 3)
    batch = make_batch(backend, config, rng, lens, pad_value=10**6)
    q, q_np = random_query(backend, batch, rng, kv_heads * group, "float32" if dtype == "int8" else dtype)
    params = dict(params)
    sinks = params.pop("sinks", None)
    sinks = None if sinks is None else np.asarray(sinks, np.float32)
    with _torch_threads(threads):
        out = _decode(batch, q, 0, variant, sinks, **params)
    assert_close(backend.to_numpy(out).astype(np.float64), oracle(batch, q_np, 0, sinks=sinks, **params), dtype,
                 f"native {variant} {case}")


def test_reasons_name_the_device_or_dtype_the_kernel_cannot_read():
    from types import SimpleNamespace

    cuda = SimpleNamespace(torch_device=torch.device("cuda", 0), dtype=torch.float16,
                           config=SimpleNamespace(dtype="float16"))
    assert "cuda:0" in native_unavailable_reason(cuda)
    fp8 = SimpleNamespace(torch_device=torch.device("cpu"), dtype=torch.float8_e4m3fn,
                          config=SimpleNamespace(dtype="float8_e4m3fn"))
    assert "float8_e4m3fn" in native_unavailable_reason(fp8)


def test_pagedkv_backends_says_which_cpu_decode_runs(backend):
    assert backend.version.endswith(f"compiled CPU decode ({native_variant()})")
