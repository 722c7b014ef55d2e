"""A third-party backend runs the whole suite in a few lines: register an object, point the suite at it.

The "mini" backend below is what a vendor would write first: NumPy storage
and a plain per-sequence attention. It is registered directly with the
registry from a conftest (no entry point), and the suite runs against it in
a separate pytest process.
"""

import textwrap

MINI_BACKEND = textwrap.dedent('''
    import numpy as np
    from pagedkv_core import AttentionBase, AttentionParams, Capabilities, Probe, check_batch, check_query
    from pagedkv_core.errors import DTypeMismatch, UnsupportedOperation
    from pagedkv_core.plugins import register_backend
    from pagedkv_numpy.storage import NumpyStorage

    class MiniPlan:
        def __init__(self, storage, index, params, ignore_soft_cap):
            self.storage, self.index, self.params, self.ignore = storage, index, params, ignore_soft_cap

        def run(self, q, layer, sinks=None):
            if sinks is not None:  # not in its capabilities: refused, never ignored
                raise UnsupportedOperation("mini has no attention sinks")
            c = self.storage.config
            storage_layer = self.storage.checks.layer(layer)
            check_query(q.shape, self.index, c)
            if not self.storage.quantized and q.dtype != self.storage.np_dtype:
                raise DTypeMismatch(f"q is {q.dtype}, pool is {self.storage.np_dtype}")
            group = q.shape[1] // c.num_kv_heads
            out = np.zeros(q.shape, np.float64)
            for b in range(self.index.batch):
                n = int(self.index.seq_lens[b])
                start, end = self.index.query_start_loc[b], self.index.query_start_loc[b + 1]
                if end == start:
                    continue
                k, v = self.storage.gather(storage_layer, self.index.block_tables[b], n)
                k = np.repeat(k.astype(np.float64), group, axis=1)
                v = np.repeat(v.astype(np.float64), group, axis=1)
                pos = np.arange(n - (end - start), n)[:, None]
                keys = np.arange(n)[None, :]
                scores = np.einsum("qhd,khd->hqk", q[start:end].astype(np.float64), k) * self.params.scale
                if self.params.soft_cap is not None and not self.ignore:
                    scores = self.params.soft_cap * np.tanh(scores / self.params.soft_cap)
                mask = np.ones_like(pos - keys, bool)
                if self.params.causal:
                    mask &= keys <= pos
                if self.params.sliding_window is not None:
                    mask &= keys > pos - self.params.sliding_window
                scores = np.where(mask[None], scores, -np.inf)
                weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
                weights /= weights.sum(axis=-1, keepdims=True)
                out[start:end] = np.einsum("hqk,khd->qhd", weights, v)
            return out.astype(q.dtype)

    class MiniAttention(AttentionBase):
        def __init__(self, ignore_soft_cap=False):
            self.ignore = ignore_soft_cap

        def plan(self, storage, block_tables, seq_lens, query_start_loc=None, *, causal=True, scale=None,
                 sliding_window=None, soft_cap=None, chunk_size=None):
            if chunk_size is not None:
                raise UnsupportedOperation("mini has no chunked-local attention")
            index = check_batch(storage.config, block_tables, seq_lens, query_start_loc)
            params = AttentionParams.make(storage.config.head_dim, scale=scale, causal=causal,
                                          sliding_window=sliding_window, soft_cap=soft_cap)
            return MiniPlan(storage, index, params, self.ignore)

    class MiniBackend:
        version = "0.1"

        def __init__(self, name, ignore_soft_cap=False, expected_failures=None):
            self.name = name
            self.attention = MiniAttention(ignore_soft_cap)
            self.expected = expected_failures or {}

        def devices(self):
            return ["cpu"]

        def probe(self, device=None):
            return Probe.ok()

        def capabilities(self, device):
            return Capabilities(dtypes=("float32",), expected_failures=self.expected)

        def create_storage(self, config, device):
            return NumpyStorage(config, device)

        def asarray(self, array, device, dtype=None):
            return np.asarray(array, dtype=dtype)

        def to_numpy(self, array):
            return np.asarray(array)
''')


def test_the_suite_runs_against_a_directly_registered_backend(pytester):
    pytester.makeconftest(MINI_BACKEND + "\nregister_backend(MiniBackend('mini'))\n")
    result = pytester.runpytest_subprocess(
        "--pyargs", "pagedkv_conformance.checks", "--pagedkv-backend", "mini", "-m", "not slow",
        "-p", "no:cacheprovider", "-o", "addopts=")
    result.assert_outcomes(passed=result.parseoutcomes()["passed"], skipped=result.parseoutcomes().get("skipped", 0))
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 50 and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*pagedkv conformance summary*", "attention *", "manager *"])


def test_declared_expected_failures_are_strict_and_unmatched_ones_reported(pytester):
    declared = {
        "attention::test_attention_matches_oracle[mini-cpu-float32-decode-softcap]": "soft-cap not implemented",
        "attention::test_attention_matches_oracle[mini-cpu-float32-prefill-window-softcap]": "soft-cap not implemented",
        "attention::no-such-check": "stale entry",
    }
    pytester.makeconftest(MINI_BACKEND + f"\nregister_backend(MiniBackend('mini', True, {declared!r}))\n")
    result = pytester.runpytest_subprocess(
        "--pyargs", "pagedkv_conformance.checks.test_attention", "--pagedkv-backend", "mini", "-m", "not slow",
        "-p", "no:cacheprovider", "-o", "addopts=")
    outcomes = result.parseoutcomes()
    assert outcomes["xfailed"] == 2 and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*declared expected failure of mini-cpu matches no check: 'attention::no-such-check'*"])


PROTOCOL_ONLY = textwrap.dedent('''
    class ProtocolOnlyAttention:
        """The Attention protocol by delegation, without AttentionBase: it has no plan_index."""

        def __init__(self):
            self.inner = MiniAttention()

        def plan(self, *args, **kwargs):
            return self.inner.plan(*args, **kwargs)

        def decode(self, *args, **kwargs):
            return self.inner.decode(*args, **kwargs)

        def prefill(self, *args, **kwargs):
            return self.inner.prefill(*args, **kwargs)

    proto = MiniBackend('proto')
    proto.attention = ProtocolOnlyAttention()
    register_backend(proto)
''')


def test_kernel_bounds_run_through_the_inherited_plan_index_and_skip_without_one(pytester):
    """A backend that overrides only ``plan`` gets a bounds-checking ``plan_index`` from AttentionBase; one that
    implements only the protocol has no lower entry to check, and each check says so."""
    pytester.makeconftest(MINI_BACKEND + "\nregister_backend(MiniBackend('mini'))\n" + PROTOCOL_ONLY)
    args = ("--pyargs", "pagedkv_conformance.checks.test_kernel_bounds", "-m", "not slow", "-rs",
            "-p", "no:cacheprovider", "-o", "addopts=")
    mini = pytester.runpytest_subprocess(*args, "--pagedkv-backend", "mini").parseoutcomes()
    assert mini["passed"] >= 17 and "skipped" not in mini and "failed" not in mini
    proto = pytester.runpytest_subprocess(*args, "--pagedkv-backend", "proto")
    outcomes = proto.parseoutcomes()
    assert outcomes["skipped"] == mini["passed"] and "passed" not in outcomes and "failed" not in outcomes
    proto.stdout.fnmatch_lines(["*proto-cpu: its attention has no plan_index*"])
