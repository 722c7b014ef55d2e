"""The backend object and its registration: entry point, probes, capabilities, array conversion."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_helpers import import_mlx

mx = import_mlx()

from pagedkv_core.contract.attention import Attention  # noqa: E402
from pagedkv_core.contract.backend import Backend  # noqa: E402
from pagedkv_core.errors import BackendUnavailable, DTypeMismatch, InvalidArgument  # noqa: E402
from pagedkv_core.plugins import BackendRegistry  # noqa: E402


def test_found_through_the_entry_point():
    registry = BackendRegistry()
    assert "mlx" not in registry.plugin_errors
    spec = registry.specs()["mlx"]
    assert spec.distribution == "pagedkv-mlx" and "mlx" in spec.install_hint
    status = registry.status("mlx")
    assert status.available and status.version == mx.__version__
    assert [name for name, _ in status.devices] == ["cpu", "gpu"]
    assert dict(status.devices)["cpu"].available


def test_plugin_module_does_not_import_mlx():
    """The entry point stays cheap: only ``spec.load()`` imports MLX."""
    import ast
    import inspect

    from pagedkv_mlx import plugin

    tree = ast.parse(inspect.getsource(plugin))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level for a in n.names] + [n.module or "" for n in top_level
                                                             if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith(("mlx", ".backend")) for name in names)


def test_a_failing_load_reports_the_reason_and_hint(monkeypatch):
    """Where MLX cannot be imported, the registry says so with the install hint."""
    from pagedkv_mlx import plugin

    def missing():
        raise ImportError("No module named 'mlx'")

    monkeypatch.setattr(plugin, "_load", missing)
    registry = BackendRegistry(load_entry_points=False)
    registry.register(plugin)
    with pytest.raises(BackendUnavailable, match="No module named 'mlx'.*pip install pagedkv-mlx"):
        registry.get("mlx")
    assert not registry.status("mlx").available


def test_protocols_probes_and_capabilities(backend):
    assert isinstance(backend, Backend) and isinstance(backend.attention, Attention)
    assert backend.name == "mlx" and backend.devices() == ["cpu", "gpu"]
    assert backend.probe().available and backend.probe("cpu").available
    assert not backend.probe("npu").available and "npu" in backend.probe("npu").reason
    caps = backend.capabilities("cpu")
    assert caps.dtypes == ("float32", "float16", "bfloat16") and caps.quantized == ("int8",)
    assert set(caps.kernels) == {"decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks",
                                 "cascade"}  # the host kernel's; Metal's graph kernel plans a cascade as usual
    gpu = backend.probe("gpu")
    if gpu.available:
        assert backend.capabilities("gpu").supports_dtype("int8")
    else:
        assert "GPU" in gpu.reason
        with pytest.raises(BackendUnavailable):
            backend.capabilities("gpu")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_asarray_and_to_numpy(backend, dtype):
    values = np.array([[1.5, -2.0], [0.25, 3.0]])
    native = backend.asarray(values, "cpu", dtype)
    assert isinstance(native, mx.array) and str(native.dtype).endswith(dtype)
    back = backend.to_numpy(native)
    assert back.dtype == {"float16": np.float16, "int8": np.int8}.get(dtype, np.float32)
    np.testing.assert_array_equal(back, values.astype(back.dtype))


def test_asarray_keeps_dtypes_and_refuses_unknown_ones(backend):
    assert backend.asarray(np.arange(3, dtype=np.int32), "cpu").dtype == mx.int32
    assert backend.asarray(np.zeros(2), "cpu").dtype == mx.float32  # MLX's default for float64 input
    assert backend.asarray(np.zeros(2), "cpu", "float64").dtype == mx.float64
    with pytest.raises(DTypeMismatch):
        backend.asarray(np.zeros(2), "cpu", "float8_e4m3fn")
    with pytest.raises(InvalidArgument):
        backend.asarray(np.zeros(2), "xpu")
    np.testing.assert_array_equal(backend.to_numpy(np.arange(3)), np.arange(3))
