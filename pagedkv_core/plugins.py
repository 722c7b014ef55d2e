"""The backend registry: pluggy hooks plus the ``pagedkv.backends`` entry-point group.

Built-in backends travel the same path as third-party ones. A plugin that
fails to import is recorded with its error and the others keep working;
``PAGEDKV_BLOCKED_PLUGINS`` (comma-separated entry-point names) switches
plugins off. Tests and third parties may ``register`` a plugin module, a
:class:`BackendSpec`, or a ready :class:`Backend` object directly.
"""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .backend import Backend, BackendSpec, Probe
from .errors import BackendUnavailable, UnknownBackend

__all__ = [
    "ENTRY_POINT_GROUP",
    "BLOCK_ENV",
    "BackendStatus",
    "BackendRegistry",
    "default_registry",
    "available_backends",
    "get_backend",
    "register_backend",
]

ENTRY_POINT_GROUP = "pagedkv.backends"
BLOCK_ENV = "PAGEDKV_BLOCKED_PLUGINS"


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One row of ``pagedkv backends``."""

    name: str
    available: bool
    reason: str
    devices: tuple[tuple[str, Probe], ...]
    version: str = ""
    install_hint: str = ""


class _DirectSpecs:
    """Wraps specs given to ``register`` so they answer the hook like any plugin."""

    def __init__(self, specs: list[BackendSpec]) -> None:
        self.specs = specs

    @hookspecs.hookimpl
    def pagedkv_backends(self) -> list[BackendSpec]:
        return list(self.specs)


class BackendRegistry:
    """Discovers backend plugins and builds backends on first use."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.plugin_manager = pluggy.PluginManager("pagedkv")
        self.plugin_manager.add_hookspecs(hookspecs)
        self.plugin_errors: dict[str, str] = {}
        self._loaded: dict[str, Backend] = {}
        self._load_errors: dict[str, str] = {}
        self._lock = threading.RLock()
        blocked = {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}
        for name in blocked:
            self.plugin_manager.set_blocked(name)
        if load_entry_points:
            self._load_entry_points()
        self.plugin_manager.check_pending()

    def _load_entry_points(self) -> None:
        # pluggy's load_setuptools_entrypoints stops at the first plugin that
        # fails to import; we load one by one so a broken plugin is reported,
        # not fatal.
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.plugin_manager.is_blocked(ep.name) or self.plugin_manager.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import error of a third-party plugin
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.plugin_manager.register(plugin, name=ep.name)

    def register(self, obj: Any, *, name: str | None = None, replace: bool = False) -> None:
        """Register a plugin module/object, a :class:`BackendSpec` or a :class:`Backend`.

        Registering a backend name that is already known is an error unless
        ``replace=True``.
        """
        with self._lock:
            if isinstance(obj, BackendSpec):
                specs = [obj]
            elif isinstance(obj, Backend) and not isinstance(obj, types.ModuleType):
                backend = obj
                specs = [BackendSpec(name=backend.name, load=lambda: backend, summary="registered directly")]
            else:
                specs = None
            new_names = [s.name for s in specs] if specs else [s.name for s in _specs_of(obj)]
            clash = [n for n in new_names if n in self.specs()]
            if clash and not replace:
                raise ValueError(f"backend {clash[0]!r} is already registered (pass replace=True)")
            for n in clash:
                self._unregister_backend(n)
            plugin = _DirectSpecs(specs) if specs is not None else obj
            self.plugin_manager.register(plugin, name=name)
            self.plugin_manager.check_pending()

    def _unregister_backend(self, name: str) -> None:
        for plugin in list(self.plugin_manager.get_plugins()):
            if isinstance(plugin, _DirectSpecs):
                plugin.specs = [s for s in plugin.specs if s.name != name]
            elif any(s.name == name for s in _specs_of(plugin)):
                self.plugin_manager.unregister(plugin)
        self._loaded.pop(name, None)
        self._load_errors.pop(name, None)

    def unregister(self, name: str) -> None:
        """Forget a backend by name (tests use it to clean up)."""
        with self._lock:
            self._unregister_backend(name)

    def specs(self) -> Mapping[str, BackendSpec]:
        """Every known backend description, by name (read-only view)."""
        result: dict[str, BackendSpec] = {}
        for group in self.plugin_manager.hook.pagedkv_backends():
            for spec in group:
                result.setdefault(spec.name, spec)
        return types.MappingProxyType(result)

    def names(self) -> list[str]:
        return sorted(self.specs())

    def get(self, name: str) -> Backend:
        """Build (once) and return the backend called ``name``.

        Raises :class:`UnknownBackend` for an unknown name and
        :class:`BackendUnavailable` when its library cannot be imported.
        """
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            specs = self.specs()
            if name not in specs:
                raise UnknownBackend(name, list(specs))
            if name in self._load_errors:
                raise BackendUnavailable(name, self._load_errors[name])
            spec = specs[name]
            try:
                backend = spec.load()
            except Exception as exc:
                hint = f" ({spec.install_hint})" if spec.install_hint else ""
                self._load_errors[name] = f"{type(exc).__name__}: {exc}{hint}"
                raise BackendUnavailable(name, self._load_errors[name]) from exc
            self._loaded[name] = backend
            return backend

    def status(self, name: str) -> BackendStatus:
        spec = self.specs().get(name)
        if spec is None:
            raise UnknownBackend(name, self.names())
        try:
            backend = self.get(name)
        except BackendUnavailable as exc:
            return BackendStatus(name, False, exc.reason, (), install_hint=spec.install_hint)
        overall = backend.probe()
        devices = tuple((d, backend.probe(d)) for d in backend.devices())
        return BackendStatus(name, overall.available, overall.reason, devices,
                             version=getattr(backend, "version", ""), install_hint=spec.install_hint)

    def available_backends(self) -> dict[str, BackendStatus]:
        """name -> availability, reason and devices, for every known backend."""
        return {name: self.status(name) for name in self.names()}


_default: BackendRegistry | None = None
_default_lock = threading.Lock()


def _specs_of(plugin: Any) -> list[BackendSpec]:
    impl = getattr(plugin, "pagedkv_backends", None)
    return list(impl()) if callable(impl) else []


def default_registry() -> BackendRegistry:
    """The process-wide registry, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BackendRegistry()
        return _default


def available_backends() -> dict[str, BackendStatus]:
    return default_registry().available_backends()


def get_backend(name: str) -> Backend:
    return default_registry().get(name)


def register_backend(obj: Any, *, replace: bool = False) -> None:
    default_registry().register(obj, replace=replace)
