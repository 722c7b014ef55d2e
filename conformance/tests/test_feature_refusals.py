"""Chunked-local attention and sinks: the suite holds a backend to what its capabilities say.

The NumPy and MLX backends list both features, so on them the check that an
unlisted feature is refused always skips. These backends, registered
directly from a conftest, exercise it: one refuses what it does not list
(passes), one silently ignores it (fails), and one lists the features but
ignores them (its chunk and sink cases fail against the oracle, so the
cases do tell a kernel that drops the feature from one that has it).
"""

import textwrap

import pytest

BACKENDS = textwrap.dedent('''
    import dataclasses

    import numpy as np
    from pagedkv_core import Capabilities, Probe
    from pagedkv_core.errors import UnsupportedOperation
    from pagedkv_core.plugins import register_backend
    from pagedkv_numpy.attention import NumpyAttention, NumpyPlan
    from pagedkv_numpy.storage import NumpyStorage

    FULL = ("decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks")
    BASIC = FULL[:5]

    class RefusingPlan(NumpyPlan):
        def run(self, q, layer, *, sinks=None):
            if sinks is not None:
                raise UnsupportedOperation("this backend has no attention sinks")
            return super().run(q, layer)

    class Refusing(NumpyAttention):
        """What the contract asks of a backend without the features."""

        def plan_index(self, storage, index, params):
            if params.chunk_size is not None:
                raise UnsupportedOperation("this backend has no chunked-local attention")
            self.check_storage(storage)
            return RefusingPlan(storage, index, params)

    class IgnoringPlan(NumpyPlan):
        def run(self, q, layer, *, sinks=None):
            return super().run(q, layer)  # drops the sinks without a word

    class Ignoring(NumpyAttention):
        """A kernel that drops both features: chunk_size and sinks change nothing."""

        def plan_index(self, storage, index, params):
            self.check_storage(storage)
            return IgnoringPlan(storage, index, dataclasses.replace(params, chunk_size=None))

    class Backend:
        version = "0.1"

        def __init__(self, name, attention, kernels):
            self.name, self.attention, self.kernels = name, attention, kernels

        def devices(self):
            return ["cpu"]

        def probe(self, device=None):
            return Probe.ok()

        def capabilities(self, device):
            return Capabilities(dtypes=("float32",), kernels=self.kernels)

        def create_storage(self, config, device):
            return NumpyStorage(config, device)

        def asarray(self, array, device, dtype=None):
            return np.asarray(array, dtype=dtype)

        def to_numpy(self, array):
            return np.asarray(array)

    register_backend(Backend("refusing", Refusing(), BASIC))
    register_backend(Backend("ignoring", Ignoring(), BASIC))
    register_backend(Backend("pretending", Ignoring(), FULL))
''')


@pytest.fixture
def attention_checks(pytester):
    pytester.makeconftest(BACKENDS)

    def run(backend, *args):
        return pytester.runpytest_subprocess(
            "--pyargs", "pagedkv_conformance.checks.test_attention", "--pagedkv-backend", backend, "-m", "not slow",
            "-p", "no:cacheprovider", "-o", "addopts=", "-rfs", *args)
    return run


def test_a_backend_refusing_what_it_does_not_list_passes(attention_checks):
    result = attention_checks("refusing")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and outcomes["passed"] >= 15
    result.stdout.fnmatch_lines(["*refusing-cpu does not support chunked_local*",
                                 "*refusing-cpu does not support sinks*"])
    refusals = attention_checks("refusing", "-k", "unlisted_feature").parseoutcomes()
    assert refusals["passed"] == 2 and "failed" not in refusals and "skipped" not in refusals


def test_a_backend_silently_ignoring_an_unlisted_feature_fails(attention_checks):
    result = attention_checks("ignoring", "-k", "unlisted_feature")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2 and "passed" not in outcomes
    result.stdout.fnmatch_lines(["*DID NOT RAISE*UnsupportedOperation*"])


def test_a_backend_listing_features_its_kernel_drops_fails_their_cases(attention_checks):
    result = attention_checks("pretending", "-k", "matches_oracle")
    outcomes = result.parseoutcomes()
    failed = {line.split("[", 1)[1].split(" ")[0].rstrip("]")
              for line in result.stdout.lines if line.startswith("FAILED")}
    cases = {"decode-chunk-lt-block", "decode-chunk-eq-block-window", "prefill-chunk-prefix-crossing",
             "prefill-chunk-window-softcap", "decode-sinks-gqa4", "decode-sinks-large-softcap",
             "prefill-sinks-chunk", "prefill-sinks-large-noncausal"}
    assert {f.removeprefix("pretending-cpu-float32-") for f in failed} == cases
    assert outcomes["failed"] == len(cases) and outcomes["passed"] >= 14
