"""The plugin registries: pluggy hooks plus the ``pagedkv.backends`` and ``pagedkv.cli`` entry-point groups.

Built-in backends travel the same path as third-party ones. A plugin that
fails to import is recorded with its error and the others keep working;
``PAGEDKV_BLOCKED_PLUGINS`` (comma-separated entry-point names) switches
plugins off. Tests and third parties may ``register`` a plugin module, a
:class:`BackendSpec`, or a ready :class:`Backend` object directly.

A backend name belongs to one plugin: an installed plugin that offers a name
another already provides is refused (built-in distributions load first), so
which code runs never depends on installation order.

:class:`CommandRegistry` does the same for the subcommands distributions add
to the ``pagedkv`` command (``pagedkv conformance`` among them), so the core's
command line imports none of them.
"""

from __future__ import annotations

import difflib
import os
import threading
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from .contract import hookspecs
from .contract.backend import Backend, BackendSpec, Probe
from .contract.cli import CliCommand
from .errors import BackendUnavailable, InvalidArgument, UnknownBackend

__all__ = [
    "ENTRY_POINT_GROUP",
    "CLI_ENTRY_POINT_GROUP",
    "BLOCK_ENV",
    "BUILTIN_BACKENDS",
    "BackendStatus",
    "BackendRegistry",
    "CommandRegistry",
    "default_registry",
    "available_backends",
    "get_backend",
    "register_backend",
]

ENTRY_POINT_GROUP = "pagedkv.backends"
CLI_ENTRY_POINT_GROUP = "pagedkv.cli"
BLOCK_ENV = "PAGEDKV_BLOCKED_PLUGINS"

BUILTIN_BACKENDS: Mapping[str, str] = types.MappingProxyType({
    "numpy": "pip install pagedkv-numpy (from a pagedkv checkout: pip install ./backends/numpy)",
    "torch": "pip install pagedkv-torch (from a pagedkv checkout: pip install ./backends/torch)",
    "mlx": 'pip install pagedkv-mlx (from a pagedkv checkout: pip install ./backends/mlx; '
           'on Linux first pip install "mlx[cpu]")',
    "cupy": "pip install 'pagedkv-cupy[cuda12x]' (from a pagedkv checkout: pip install './backends/cupy[cuda12x]'; "
            "[cuda13x] for CUDA 13)",
})
"""The backends this project ships, each with its install line (``pagedkv backends`` lists missing ones)."""
_BUILTIN_DISTRIBUTIONS = frozenset(f"pagedkv-{name}" for name in BUILTIN_BACKENDS)
_BUILTIN_CLI_DISTRIBUTIONS = frozenset({"pagedkv-conformance"})


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
        self.plugin_refusals: dict[str, str] = {}  # entry point -> why it was not registered
        self._providers: dict[str, str] = {}  # backend name -> the entry point that provides it
        self._loaded: dict[str, Backend] = {}
        self._load_errors: dict[str, str] = {}
        self._lock = threading.RLock()
        _block_from_env(self.plugin_manager)
        if load_entry_points:
            self._load_entry_points()
        self.plugin_manager.check_pending()

    def _load_entry_points(self) -> None:
        for ep in _entry_points(ENTRY_POINT_GROUP, _BUILTIN_DISTRIBUTIONS):
            if self.plugin_manager.is_blocked(ep.name) or self.plugin_manager.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                names = [spec.name for spec in _specs_of(plugin)]
            except Exception as exc:  # any import error of a third-party plugin
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            taken = [n for n in names if n in self._providers]
            if taken:
                owner = self._providers[taken[0]]
                self.plugin_refusals[ep.name] = (
                    f"refused: it offers backend {taken[0]!r}, which {owner} already provides; uninstall one "
                    f"of them, or switch this one off with {BLOCK_ENV}={ep.name}")
                continue
            self.plugin_manager.register(plugin, name=ep.name)
            dist = _distribution(ep)
            for n in names:
                self._providers[n] = f"plugin {ep.name!r}" + (f" (distribution {dist})" if dist else "")

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
                raise InvalidArgument(f"backend {clash[0]!r} is already registered (pass replace=True)")
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

    def not_installed(self) -> dict[str, str]:
        """Built-in backends that no installed plugin provides here: name -> the line that installs it."""
        blocked = self.plugin_manager.is_blocked
        known = self.specs()
        return {name: line for name, line in BUILTIN_BACKENDS.items() if name not in known and not blocked(name)}

    def unknown(self, name: str) -> UnknownBackend:
        """The error for a name nobody provides, with the closest known or built-in name, never a made-up one."""
        known = self.names()
        missing = self.not_installed()
        close = difflib.get_close_matches(name, [*known, *missing], n=1, cutoff=0.6)
        suggestion = close[0] if close else None
        hint = missing.get(suggestion or name, "")
        return UnknownBackend(name, known, suggestion=suggestion, install_hint=hint)

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
                raise self.unknown(name)
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
            raise self.unknown(name)
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


class CommandRegistry:
    """The subcommands plugins add to ``pagedkv``, found through the ``pagedkv.cli`` entry points.

    Loaded one entry point at a time, as backends are: a plugin that fails to
    import, whose hook raises, or whose hook returns anything but
    :class:`CliCommand` objects is recorded in ``plugin_errors`` with the
    reason and the other commands keep working. A command name belongs to one
    plugin: a ``reserved`` name (the core's own commands) or one another plugin
    already provides refuses the whole plugin, with the reason in
    ``plugin_refusals`` (this project's distributions load first), so which
    code ``pagedkv NAME`` runs never depends on installation order.
    ``PAGEDKV_BLOCKED_PLUGINS`` switches these plugins off too.
    """

    def __init__(self, *, load_entry_points: bool = True, reserved: Iterable[str] = ()) -> None:
        self.plugin_manager = pluggy.PluginManager("pagedkv")
        self.plugin_manager.add_hookspecs(hookspecs)
        self.reserved = frozenset(reserved)
        self.plugin_errors: dict[str, str] = {}
        self.plugin_refusals: dict[str, str] = {}  # entry point -> why it was not registered
        self._providers: dict[str, str] = {}  # command name -> the plugin that provides it
        _block_from_env(self.plugin_manager)
        if load_entry_points:
            self._load_entry_points()
        self.plugin_manager.check_pending()

    def _load_entry_points(self) -> None:
        for ep in _entry_points(CLI_ENTRY_POINT_GROUP, _BUILTIN_CLI_DISTRIBUTIONS):
            if self.plugin_manager.is_blocked(ep.name) or self.plugin_manager.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                names = [command.name for command in self._commands_of(plugin)]
            except Exception as exc:  # any import error of a third-party plugin, or a malformed hook
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            clash = self._clash(names)
            if clash:
                self.plugin_refusals[ep.name] = (
                    f"refused: {clash}; uninstall one of them, or switch this one off with {BLOCK_ENV}={ep.name}")
                continue
            self.plugin_manager.register(plugin, name=ep.name)
            dist = _distribution(ep)
            for n in names:
                self._providers[n] = f"plugin {ep.name!r}" + (f" (distribution {dist})" if dist else "")

    def register(self, plugin: Any, *, name: str | None = None) -> None:
        """Register a plugin module or object implementing ``pagedkv_cli_commands`` (tests, embedders).

        Raises :class:`InvalidArgument` for a malformed hook or a command name
        that is reserved or already provided.
        """
        try:
            names = [command.name for command in self._commands_of(plugin)]
        except TypeError as exc:
            raise InvalidArgument(str(exc)) from exc
        clash = self._clash(names)
        if clash:
            raise InvalidArgument(f"cannot register {name or plugin!r}: {clash}")
        self.plugin_manager.register(plugin, name=name)
        self.plugin_manager.check_pending()
        for n in names:
            self._providers[n] = f"plugin {name or plugin!r}"

    def commands(self) -> Mapping[str, CliCommand]:
        """Every registered plugin command, by name (read-only view)."""
        result: dict[str, CliCommand] = {}
        for group in self.plugin_manager.hook.pagedkv_cli_commands():
            for command in group:
                result.setdefault(command.name, command)
        return types.MappingProxyType(result)

    def _clash(self, names: list[str]) -> str:
        """Why these command names cannot be added, or ``""`` when they can."""
        for n in names:
            if n in self.reserved:
                return f"it offers command {n!r}, which is one of pagedkv's own commands"
            if n in self._providers:
                return f"it offers command {n!r}, which {self._providers[n]} already provides"
        return ""

    def _commands_of(self, plugin: Any) -> list[CliCommand]:
        """The commands ``plugin`` offers, checked; ``TypeError`` says what is wrong with them."""
        # pluggy before 1.5 looks the name up without a default: check it is there first
        impl = getattr(plugin, "pagedkv_cli_commands", None)
        if impl is None or self.plugin_manager.parse_hookimpl_opts(plugin, "pagedkv_cli_commands") is None:
            raise TypeError("it has no pagedkv_cli_commands function marked @hookimpl")
        commands = list(impl())
        names: set[str] = set()
        for command in commands:
            if not isinstance(command, CliCommand):
                raise TypeError(f"pagedkv_cli_commands returned {command!r}, not a CliCommand")
            if not command.name or command.name.startswith("-") or command.name.split() != [command.name]:
                raise TypeError(f"bad command name {command.name!r}: one word, not starting with '-'")
            if command.name in names:
                raise TypeError(f"pagedkv_cli_commands returned command {command.name!r} twice")
            if not (callable(command.configure) and callable(command.run)):
                raise TypeError(f"command {command.name!r}: configure and run must be callable")
            names.add(command.name)
        return commands


_default: BackendRegistry | None = None
_default_lock = threading.Lock()


def _specs_of(plugin: Any) -> list[BackendSpec]:
    impl = getattr(plugin, "pagedkv_backends", None)
    return list(impl()) if callable(impl) else []


def _block_from_env(plugin_manager: pluggy.PluginManager) -> None:
    for name in {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}:
        plugin_manager.set_blocked(name)


def _entry_points(group: str, builtin_distributions: frozenset[str]) -> list[Any]:
    """The group's entry points, this project's distributions first.

    pluggy's load_setuptools_entrypoints stops at the first plugin that fails
    to import; the registries load these one by one so a broken plugin is
    reported, not fatal. Built-in distributions come first so a third-party
    plugin cannot take over their names.
    """
    return sorted(metadata.entry_points(group=group), key=lambda ep: _distribution(ep) not in builtin_distributions)


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return (getattr(dist, "name", "") or "").replace("_", "-").lower()


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
