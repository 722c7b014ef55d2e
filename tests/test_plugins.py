"""The backend registry: entry points, direct registration, failing and blocked plugins, lazy loading."""

from importlib import metadata

import pluggy
import pytest

from pagedkv_core import (
    BackendRegistry,
    BackendSpec,
    BackendUnavailable,
    Capabilities,
    Probe,
    UnknownBackend,
)
from pagedkv_core.hookspecs import hookimpl
from pagedkv_core.plugins import BLOCK_ENV


class TinyBackend:
    """The smallest object that satisfies the Backend protocol (storage comes from NumPy)."""

    name = "tiny"
    version = "0.0"
    attention = None

    def devices(self):
        return ["cpu", "npu:0"]

    def probe(self, device=None):
        return Probe.ok() if device in (None, "cpu") else Probe.missing("no NPU driver")

    def capabilities(self, device):
        return Capabilities(dtypes=("float32",))

    def create_storage(self, config, device):
        from pagedkv_numpy.storage import NumpyStorage
        return NumpyStorage(config, device)

    def asarray(self, array, device, dtype=None):
        return array

    def to_numpy(self, array):
        return array


def test_builtin_numpy_backend_comes_through_its_entry_point():
    registry = BackendRegistry()
    assert "numpy" in registry.names()
    status = registry.status("numpy")
    assert status.available and status.devices[0][0] == "cpu"


def test_a_backend_object_registers_directly_and_reports_devices():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(TinyBackend())
    status = registry.available_backends()["tiny"]
    assert status.available
    assert [(d, p.available, p.reason) for d, p in status.devices] == [
        ("cpu", True, ""), ("npu:0", False, "no NPU driver")]
    assert registry.get("tiny").name == "tiny"


def test_registering_a_name_twice_needs_replace():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(TinyBackend())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TinyBackend())
    replacement = TinyBackend()
    registry.register(replacement, replace=True)
    assert registry.get("tiny") is replacement
    registry.unregister("tiny")
    assert registry.names() == []


def test_a_backend_whose_library_is_missing_is_unavailable_with_the_reason():
    def load():
        raise ImportError("No module named 'accelerator_sdk'")

    registry = BackendRegistry(load_entry_points=False)
    registry.register(BackendSpec("accel", load, install_hint="pip install pagedkv-accel"))
    status = registry.status("accel")
    assert not status.available
    assert "accelerator_sdk" in status.reason and "pip install pagedkv-accel" in status.reason
    with pytest.raises(BackendUnavailable) as err:
        registry.get("accel")
    assert err.value.backend == "accel"


def test_specs_are_lazy():
    loads = []
    registry = BackendRegistry(load_entry_points=False)
    registry.register(BackendSpec("lazy", lambda: loads.append(1) or TinyBackend()))
    assert registry.names() == ["lazy"] and loads == []
    registry.get("lazy")
    registry.get("lazy")
    assert loads == [1]


def test_unknown_backend_lists_known_ones_and_an_install_hint():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(TinyBackend())
    with pytest.raises(UnknownBackend) as err:
        registry.get("tpu")
    assert "tiny" in str(err.value) and "pip install pagedkv-tpu" in str(err.value)


def test_a_plugin_that_fails_to_import_is_reported_not_fatal(monkeypatch):
    real = metadata.entry_points

    class BrokenEntryPoint:
        name = "broken"

        def load(self):
            raise RuntimeError("plugin exploded")

    def entry_points(group):
        return [BrokenEntryPoint(), *real(group=group)]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry = BackendRegistry()
    assert registry.plugin_errors == {"broken": "RuntimeError: plugin exploded"}
    assert "numpy" in registry.names()


def test_blocked_plugins_are_skipped(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "numpy, other")
    assert "numpy" not in BackendRegistry().names()


def test_plugin_modules_register_through_the_hook():
    class Plugin:
        @hookimpl
        def pagedkv_backends(self):
            return [BackendSpec("from-hook", TinyBackend)]

    registry = BackendRegistry(load_entry_points=False)
    registry.register(Plugin())
    assert registry.names() == ["from-hook"]


def test_unknown_hooks_are_rejected():
    class Bogus:
        @hookimpl
        def pagedkv_bogus(self):
            return []

    registry = BackendRegistry(load_entry_points=False)
    with pytest.raises(pluggy.PluginValidationError):
        registry.register(Bogus())
