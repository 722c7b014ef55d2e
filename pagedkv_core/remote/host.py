"""What the remote tier needs of the cache it serves, so it depends on no manager class.

:class:`~pagedkv_core.manager.facade.PagedKvCacheManager` is one such host;
anything else with these few members (a test double, another manager) can
attach a :class:`~.connector.RemoteConnector` and build a
:class:`~.layout.LayoutFingerprint` without the remote package importing it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from ..blocks.pool import BlockPool
from ..config import CacheConfig, PrefixCacheConfig
from ..contract.storage import BlockStorage

if TYPE_CHECKING:  # the connector names this protocol in its own signature
    from .connector import RemoteConnector

__all__ = ["CacheHost"]


class CacheHost(Protocol):
    """The members a remote connector and a layout fingerprint use; all are read, none replaced.

    Members are read-only properties so that a host may keep them as plain
    attributes or compute them.
    """

    @property
    def config(self) -> CacheConfig:
        """The layout of the blocks (dtype, layers, heads, head dim, block size): part of every key."""

    @property
    def storage(self) -> BlockStorage:
        """Where fetched blocks are copied in (``swap_in``) and committed ones copied out (``swap_out``)."""

    @property
    def lock(self) -> AbstractContextManager[object]:
        """The host's lock: held while a commit reads the prefix index and copies blocks out."""

    @property
    def prefix_config(self) -> PrefixCacheConfig | None:
        """The hash scheme and the shortest prefix worth loading; ``None`` while prefix caching is off."""

    @property
    def pool(self) -> BlockPool:
        """Read only: its ``cached`` index (hash -> block) says which blocks the local cache already holds."""

    def detach_remote(self, connector: RemoteConnector) -> None:
        """Forget ``connector`` if it is the attached one (the connector's ``close`` calls this)."""
