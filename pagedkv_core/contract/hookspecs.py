"""Hook specifications of pagedkv plugins (pluggy project name ``pagedkv``)."""

from __future__ import annotations

from typing import Any

import pluggy

from ..events import CacheEvent
from .backend import BackendSpec
from .cli import CliCommand

hookspec = pluggy.HookspecMarker("pagedkv")
hookimpl = pluggy.HookimplMarker("pagedkv")

__all__ = ["hookspec", "hookimpl", "pagedkv_backends", "pagedkv_cache_event", "pagedkv_cli_commands"]


@hookspec
def pagedkv_backends() -> list[BackendSpec]:
    """Return the backends this plugin provides, as cheap descriptions.

    Must not import heavy array libraries: a :class:`BackendSpec`'s ``load``
    does that when the backend is first used. Each plugin's result is one
    list; the registry flattens them.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations


@hookspec
def pagedkv_cache_event(event: CacheEvent, manager: Any) -> None:
    """A prefix-cache change of ``manager``: ``BlockStored``, ``BlockRemoved`` or ``AllCleared``.

    Called in order, synchronously, for managers created with
    ``event_hook=registry.plugin_manager.hook``; see :mod:`pagedkv_core.events`.
    """


@hookspec
def pagedkv_cli_commands() -> list[CliCommand]:
    """Return the ``pagedkv`` subcommands this plugin adds, as :class:`CliCommand` descriptions.

    Implemented by modules of the ``pagedkv.cli`` entry-point group (the
    conformance suite's ``pagedkv conformance`` is one), so the core's command
    line never imports the distributions that extend it. Called every time the
    ``pagedkv`` parser is built: keep the module's imports light. A name the
    core already uses (``backends``, ``demo``, ``bench``) or another plugin
    already provides is refused, not overridden.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations
