"""The torch backend as the registry sees it: entry point, lazy import, devices, probes, conversions."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import make_config  # noqa: E402

from pagedkv_core.errors import BackendUnavailable  # noqa: E402
from pagedkv_core.plugins import BackendRegistry  # noqa: E402


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="pagedkv.backends")}
    assert eps.get("torch") == "pagedkv_torch.plugin"


def test_registry_builds_the_backend_and_lists_devices():
    registry = BackendRegistry()
    backend = registry.get("torch")
    assert backend.name == "torch" and backend.version.startswith(torch.__version__)
    status = registry.status("torch")
    devices = dict(status.devices)
    assert status.available and devices["cpu"].available
    for name, probe in devices.items():
        assert probe.available or probe.reason, f"{name} is unavailable without a reason"


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_plugin_module_does_not_import_torch():
    out = _run("import sys, pagedkv_torch.plugin as p; p.pagedkv_backends(); print('torch' in sys.modules)")
    assert out.strip() == "False"


def test_missing_torch_is_reported_with_the_install_hint():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pagedkv_core.plugins import BackendRegistry\n"
        "from pagedkv_core.errors import BackendUnavailable\n"
        "r = BackendRegistry()\n"
        "try:\n    r.get('torch')\nexcept BackendUnavailable as e:\n    print(e.reason)\n"
        "print('other backends:', 'numpy' in r.names())\n"
    )
    out = _run(code)
    assert "pip install pagedkv-torch" in out
    assert "ModuleNotFoundError" in out or "ImportError" in out
    assert "other backends: True" in out


@pytest.mark.parametrize("device, words", [
    ("tpu", "not a torch device"),
    ("cuda:97", "cuda"),
    ("mps", "mps"),
])
def test_probe_names_the_reason(backend, device, words):
    probe = backend.probe(device)
    if probe.available:
        pytest.skip(f"{device} is present on this machine")
    assert words.lower() in probe.reason.lower()


def test_cpu_is_always_usable(backend):
    assert backend.probe().available and backend.probe("cpu").available
    assert backend.devices()[0] == "cpu"


def test_capabilities_on_cpu(backend):
    caps = backend.capabilities("cpu")
    assert set(caps.dtypes) == {"float32", "float16", "bfloat16"}
    assert caps.quantized == ("int8",)  # float8 pools need CUDA with compute capability >= 8.9
    assert {"decode", "prefill", "sliding_window", "soft_cap", "gqa"} <= set(caps.kernels)


def test_create_storage_on_a_missing_device_says_why(backend):
    if backend.probe("cuda:97").available:
        pytest.skip("97 GPUs present")
    with pytest.raises(BackendUnavailable, match="cuda:97"):
        backend.create_storage(make_config(), "cuda:97")


@pytest.mark.parametrize("dtype, torch_dtype", [
    ("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), (None, "float64"),
])
def test_asarray_and_to_numpy(backend, dtype, torch_dtype):
    x = np.linspace(-3, 3, 24).reshape(2, 3, 4)
    t = backend.asarray(x, "cpu", dtype)
    assert t.dtype == getattr(torch, torch_dtype) and t.device.type == "cpu"
    back = backend.to_numpy(t)
    assert back.dtype == (np.float64 if dtype is None else np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_array_equal(back, t.float().numpy() if dtype == "bfloat16" else t.numpy())
    x[0, 0, 0] = 99.0
    assert float(t[0, 0, 0]) != 99.0  # asarray copies


def test_asarray_keeps_integer_indices(backend):
    t = backend.asarray(np.arange(5, dtype=np.int32), "cpu")
    assert t.dtype == torch.int32
