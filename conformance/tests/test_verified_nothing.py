"""A conformance run that verified nothing fails, loudly: typos, empty capabilities, every check skipped."""

import textwrap

import pytest

BACKENDS = textwrap.dedent('''
    import numpy as np
    from pagedkv_core import Capabilities, Probe
    from pagedkv_core.plugins import register_backend
    from pagedkv_numpy.attention import NumpyAttention
    from pagedkv_numpy.storage import NumpyStorage

    class Backend:
        version = "0.1"
        attention = NumpyAttention()

        def __init__(self, name, dtypes=("float32",), usable=True):
            self.name, self.dtypes, self.usable = name, dtypes, usable

        def devices(self):
            return ["cpu"]

        def probe(self, device=None):
            if device not in (None, "cpu"):
                return Probe.missing(f"no device {device!r}")
            return Probe.ok() if self.usable else Probe.missing("the accelerator's driver is not loaded")

        def capabilities(self, device):
            return Capabilities(dtypes=self.dtypes)

        def create_storage(self, config, device):
            return NumpyStorage(config, device)

        def asarray(self, array, device, dtype=None):
            return np.asarray(array, dtype=dtype)

        def to_numpy(self, array):
            return np.asarray(array)

    register_backend(Backend("nodtypes", dtypes=()))
    register_backend(Backend("nodriver", usable=False))
    register_backend(Backend("good"))
''')


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(BACKENDS)

    def run(*args):
        return pytester.runpytest_subprocess("--pyargs", "pagedkv_conformance.checks", "-m", "not slow",
                                             "-p", "no:cacheprovider", "-o", "addopts=", "--strict-markers", *args)
    return run


def test_every_check_skipped_fails_the_run(suite):
    result = suite("--pagedkv-backend", "nodriver")
    assert result.ret == 1
    assert "failed" not in result.parseoutcomes() and result.parseoutcomes()["skipped"] > 50
    result.stdout.fnmatch_lines(["*the accelerator's driver is not loaded*",
                                 "*pagedkv conformance verified nothing*failing the run*"])


def test_a_backend_declaring_no_dtype_fails(suite):
    result = suite("--pagedkv-backend", "nodtypes", "-k", "capabilities or storage")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*declares no storage dtype*"])
    assert result.parseoutcomes()["failed"] == 1


@pytest.mark.parametrize(("option", "message"), [
    (("--pagedkv-backend", "good", "--pagedkv-device", "tpu"), "*backend 'good' has no device 'tpu' (its devices: cpu)*"),
    (("--pagedkv-backend", "good", "--pagedkv-dtype", "float7"), "*unknown dtype 'float7'*"),
    (("--pagedkv-backend", "godo"), "*unknown backend 'godo'*did you mean 'good'?*"),
], ids=["device", "dtype", "backend"])
def test_a_typo_is_a_usage_error_before_anything_runs(suite, option, message):
    result = suite(*option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_good_backend_passes_under_strict_markers(suite):
    result = suite("--pagedkv-backend", "good", "-k", "capabilities or allocator")
    assert result.ret == 0 and result.parseoutcomes()["passed"] >= 3


def test_the_cli_refuses_typos_in_one_line(capsys):
    from pagedkv_core.app.cli import main

    assert main(["conformance", "--backend", "numpy", "--device", "tpu"]) == 2
    assert main(["conformance", "--backend", "numpy", "--dtype", "float32,float7"]) == 2
    assert main(["conformance", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["pagedkv: error: backend 'numpy' has no device 'tpu' (its devices: cpu)",
                   "pagedkv: error: unknown dtype 'float7'; known: float64, float32, float16, bfloat16, int8, "
                   "float8_e4m3fn",
                   "pagedkv: error: --device needs --backend: device names belong to one backend"]
