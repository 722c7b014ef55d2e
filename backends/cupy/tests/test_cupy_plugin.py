"""The plugin: cheap to import, discovered by the registry, and honest about why it is unavailable here."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import pagedkv_cupy.plugin as plugin
from pagedkv_core.errors import BackendUnavailable
from pagedkv_core.plugins import BackendRegistry
from pagedkv_cupy.runtime import cuda_status

MODULES = ["pagedkv_cupy", "pagedkv_cupy.plugin", "pagedkv_cupy.backend", "pagedkv_cupy.storage",
           "pagedkv_cupy.attention", "pagedkv_cupy.kernels", "pagedkv_cupy.runtime", "pagedkv_cupy.launch",
           "pagedkv_cupy.convert", "pagedkv_cupy.host"]


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_every_module_imports_no_cupy():
    out = run_python("import importlib, sys\n"
                     f"for name in {MODULES!r}: importlib.import_module(name)\n"
                     "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cupy'))")
    assert out.strip() == "[]"


FAKE_CUPY = """
import sys, types
constructed = []
cupy = types.ModuleType("cupy")
cupy.__version__ = "14.0.0"
class RawModule:
    def __init__(self, *args, **kwargs):
        constructed.append(kwargs.get("name_expressions"))
cupy.RawModule = RawModule
cupy.RawKernel = RawModule
cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
sys.modules["cupy"] = cupy
"""


def test_import_load_and_probe_construct_no_raw_module():
    out = run_python(FAKE_CUPY + (
        "import importlib\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "from pagedkv_core.plugins import BackendRegistry\n"
        "import pagedkv_cupy.plugin as plugin\n"
        "registry = BackendRegistry(load_entry_points=False)\n"
        "registry.register(plugin)\n"
        "status = registry.status('cupy')\n"
        "registry.get('cupy').capabilities('cuda:0')\n"
        "print(status.available, len(constructed))\n"))
    assert out.split() == ["False", "0"]


def test_registry_lists_the_backend_with_cupys_reason():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(plugin)
    status = registry.available_backends()["cupy"]
    cuda = cuda_status()
    if cuda.count:
        assert status.available and status.devices[0][0] == "cuda:0"
        return
    assert not status.available
    assert status.reason == cuda.reason and status.devices == ()
    import cupy

    with pytest.raises(Exception) as raised:  # CuPy's own error, whatever its type
        cupy.cuda.runtime.getDeviceCount()
    assert str(raised.value) in status.reason


def test_without_a_gpu_storage_is_refused_with_the_reason():
    cuda = cuda_status()
    if cuda.count:
        pytest.skip("a GPU is visible here; the refusal is for machines without one")
    registry = BackendRegistry(load_entry_points=False)
    registry.register(plugin)
    backend = registry.get("cupy")
    assert backend.devices() == []
    assert backend.probe("cuda:0").reason == cuda.reason
    from pagedkv_core.config import CacheConfig

    with pytest.raises(BackendUnavailable) as raised:
        backend.create_storage(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4), "cuda:0")
    assert raised.value.reason == cuda.reason


def test_device_names_are_checked():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(plugin)
    backend = registry.get("cupy")
    for name in ("cpu", "cuda", "cuda:x", "cuda:4096"):
        assert not backend.probe(name).available


def test_missing_cupy_reports_the_install_hint():
    out = run_python("import sys\nsys.modules['cupy'] = None\n"
                     "from pagedkv_core.plugins import BackendRegistry\n"
                     "import pagedkv_cupy.plugin as plugin\n"
                     "registry = BackendRegistry(load_entry_points=False)\n"
                     "registry.register(plugin)\n"
                     "status = registry.status('cupy')\n"
                     "print(status.available, '|', status.reason)\n")
    available, reason = out.split("|", 1)
    assert available.strip() == "False"
    assert "pagedkv-cupy[cuda12x]" in reason


def test_the_entry_point_is_declared():
    names = {ep.name: ep.value for ep in metadata.entry_points(group="pagedkv.backends")}
    if "cupy" not in names:
        pytest.skip("pagedkv-cupy is not installed (pip install --no-build-isolation --no-deps -e backends/cupy)")
    assert names["cupy"] == "pagedkv_cupy.plugin"
    assert "cupy" in BackendRegistry().names()
