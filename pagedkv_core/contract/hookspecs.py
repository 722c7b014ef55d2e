"""Hook specifications of pagedkv plugins (pluggy project name ``pagedkv``)."""

from __future__ import annotations

from typing import Any

import pluggy

from ..events import CacheEvent
from .backend import BackendSpec

hookspec = pluggy.HookspecMarker("pagedkv")
hookimpl = pluggy.HookimplMarker("pagedkv")

__all__ = ["hookspec", "hookimpl", "pagedkv_backends", "pagedkv_cache_event"]


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
