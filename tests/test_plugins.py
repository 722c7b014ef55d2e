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
from pagedkv_core.contract.hookspecs import hookimpl
from pagedkv_core.plugins import BLOCK_ENV, BUILTIN_BACKENDS


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


def test_unknown_backend_lists_known_ones_and_never_invents_a_package():
    registry = BackendRegistry(load_entry_points=False)
    registry.register(TinyBackend())
    with pytest.raises(UnknownBackend) as err:
        registry.get("tpu")
    assert "tiny" in str(err.value) and "pip install" not in str(err.value)
    assert err.value.suggestion is None


def test_a_typo_suggests_the_closest_known_name():
    registry = BackendRegistry()
    with pytest.raises(UnknownBackend) as err:
        registry.get("nmupy")
    assert err.value.suggestion == "numpy" and "did you mean 'numpy'?" in str(err.value)
    assert "pagedkv-nmupy" not in str(err.value) and "pip install" not in str(err.value)


def test_a_builtin_that_is_not_installed_gets_its_install_line():
    registry = BackendRegistry(load_entry_points=False)
    assert set(registry.not_installed()) == set(BUILTIN_BACKENDS)
    with pytest.raises(UnknownBackend) as err:
        registry.get("trch")
    assert err.value.suggestion == "torch" and "pip install pagedkv-torch" in str(err.value)
    registry.register(TinyBackend())
    with pytest.raises(UnknownBackend) as err:
        registry.status("cupy")
    assert "pip install 'pagedkv-cupy[cuda12x]'" in err.value.install_hint


class FakeDistribution:
    def __init__(self, name):
        self.name = name


class FakeEntryPoint:
    """An installed plugin: what ``importlib.metadata.entry_points`` hands the registry."""

    def __init__(self, name, plugin, dist):
        self.name, self._plugin, self.dist = name, plugin, FakeDistribution(dist)

    def load(self):
        return self._plugin


def test_an_installed_plugin_cannot_take_over_a_builtin_name(monkeypatch):
    real = metadata.entry_points

    class Impostor:
        @hookimpl
        def pagedkv_backends(self):
            return [BackendSpec("numpy", TinyBackend)]

    def entry_points(group):  # listed first: installation order must not decide
        return [FakeEntryPoint("impostor", Impostor(), "pagedkv-impostor"), *real(group=group)]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry = BackendRegistry()
    assert type(registry.get("numpy")).__module__.startswith("pagedkv_numpy")
    why = registry.plugin_refusals["impostor"]
    assert "'numpy'" in why and "pagedkv-numpy" in why and f"{BLOCK_ENV}=impostor" in why
    assert not registry.plugin_manager.has_plugin("impostor")


def test_backends_command_shows_a_refused_plugin(monkeypatch, capsys):
    from pagedkv_core import plugins
    from pagedkv_core.app.cli import main

    real = metadata.entry_points

    class Impostor:
        @hookimpl
        def pagedkv_backends(self):
            return [BackendSpec("numpy", TinyBackend)]

    monkeypatch.setattr(metadata, "entry_points",
                        lambda group: [FakeEntryPoint("impostor", Impostor(), "x"), *real(group=group)])
    monkeypatch.setattr(plugins, "_default", None)  # a fresh registry sees the fake entry point; restored after
    assert main(["backends"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("impostor"))
    assert "plugin refused: it offers backend 'numpy'" in line


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
