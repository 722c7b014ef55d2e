"""A remote KV tier shared by serving instances: prefix-hash keys, validated values, background writes.

Attach one with :meth:`PagedKvCacheManager.attach_remote`::

    from pagedkv_core.remote import BlockTier, LayoutFingerprint
    from pagedkv_core.remote.redis_store import RedisStore

    tier = BlockTier(RedisStore("redis://127.0.0.1:6379/0"),
                     LayoutFingerprint.for_manager(manager, model_id="my-org/my-model"))
    remote = manager.attach_remote(tier)
    ...  # each step: allocate / append_slots, write K/V, run attention
    remote.commit()  # the step's K/V are written: share the full blocks

Any object with the few members of :class:`CacheHost` can host a connector;
no module of this package imports the manager.

``docs/scale-out.md`` describes the key and value formats and the failure behaviour.
"""

from .codec import decode_block, decode_run, encode_blocks
from .connector import RemoteConnector, RemoteStats
from .host import CacheHost
from .layout import LayoutFingerprint, TenantTagger, block_key
from .tier import BlockTier, FetchResult, KeyValueStore, MemoryStore, RemoteTier

__all__ = [
    "BlockTier",
    "CacheHost",
    "FetchResult",
    "KeyValueStore",
    "LayoutFingerprint",
    "MemoryStore",
    "RemoteConnector",
    "RemoteStats",
    "RemoteTier",
    "TenantTagger",
    "block_key",
    "decode_block",
    "decode_run",
    "encode_blocks",
]
