"""What a remote key says: the layout fingerprint, the tenant tag and the block hash.

Keys are immutable and self-describing, so instances that share a server can
never read each other's blocks by accident:

``pkv1:<fingerprint>:<tenant tag>:<block hash>``

- the *fingerprint* (32 hex digits) is a digest of everything that decides
  what the bytes of a block mean: the model id the user names, dtype, layers,
  KV heads of this rank's head shard and which shard it is, head dim, block
  size, payload version, hash algorithm and seed. Change any of them and every
  key changes; nothing stale is ever misread.
- the *tenant tag* (32 hex digits) is an HMAC, under a deployment secret, of
  the tenant's chain root (itself a digest of the hash seed and the tenant's
  salt). The raw salt never reaches the server, and without the secret a tag
  cannot be linked to a salt.
- the *block hash* is the chained prefix hash the local prefix cache already
  uses, so a remote hit means the whole prefix up to that block matches.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, SupportsInt

from ..blocks.hashing import BlockHasher
from ..errors import IncompatibleCache, InvalidArgument

if TYPE_CHECKING:  # the host protocol imports the connector, which imports this module
    from .host import CacheHost

__all__ = ["KEY_PREFIX", "PAYLOAD_VERSION", "LayoutFingerprint", "TenantTagger", "encode_block_hash", "block_key"]

KEY_PREFIX = b"pkv1"
PAYLOAD_VERSION = 1


@dataclass(frozen=True, slots=True)
class LayoutFingerprint:
    """Everything that decides the meaning of a stored block's bytes.

    ``num_kv_heads`` is the number of heads *stored in one value* (this rank's
    shard); ``head_shard = (rank, world_size)`` says which slice of the model's
    ``num_kv_heads * world_size`` heads it is.
    """

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    hash_algorithm: str
    hash_seed: int
    head_shard: tuple[int, int] = (0, 1)
    payload_version: int = PAYLOAD_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise InvalidArgument("model_id must name the model (a non-empty string): it is part of every key")
        rank, world = self.head_shard
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise InvalidArgument(f"head_shard must be (rank, world_size) with 0 <= rank < world_size, "
                                  f"got {self.head_shard}")

    @classmethod
    def for_manager(cls, manager: CacheHost, model_id: str,
                    head_shard: tuple[int, int] = (0, 1)) -> LayoutFingerprint:
        """The fingerprint of ``manager``'s blocks (prefix caching must be on: keys are its hashes)."""
        prefix = manager.prefix_config
        if prefix is None:
            raise IncompatibleCache("a remote tier needs prefix caching: its keys are the prefix hashes")
        c = manager.config
        rank, world = head_shard  # a list is accepted too: the fingerprint holds a tuple
        return cls(model_id, c.dtype, c.num_layers, c.num_kv_heads, c.head_dim, c.block_size,
                   prefix.hash_algorithm, prefix.hash_seed, (rank, world))

    def check_manager(self, manager: CacheHost) -> None:
        """Raise ``IncompatibleCache`` unless ``manager``'s blocks have exactly this layout."""
        mine = LayoutFingerprint.for_manager(manager, self.model_id, self.head_shard)
        if mine != self:
            diff = {k: (v, getattr(mine, k)) for k, v in asdict(self).items() if getattr(mine, k) != v}
            raise IncompatibleCache(f"remote tier layout differs from the manager's: {diff} (tier, manager)")

    def describe(self) -> str:
        """The canonical JSON the digest covers; also stored on the server beside the blocks."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.describe().encode()).digest()[:16]

    @property
    def hex(self) -> str:
        return self.digest.hex()


class TenantTagger:
    """Tenant tags: ``HMAC-SHA256(secret, chain root)``, truncated to 128 bits.

    The secret is deployment configuration (the same on every instance);
    with an empty secret the tag still hides the salt behind two digests but
    a guessable salt can be confirmed, so production deployments set one.
    """

    def __init__(self, hasher: BlockHasher, secret: bytes = b"") -> None:
        if not isinstance(secret, bytes):
            raise InvalidArgument("the tenant secret must be bytes")
        self.hasher, self.secret = hasher, secret
        self._tags: dict[Hashable, bytes] = {}

    def for_root(self, root: Hashable) -> bytes:
        tag = self._tags.get(root)
        if tag is None:
            mac = hmac.new(self.secret, b"pagedkv-tenant:" + encode_block_hash(root), hashlib.sha256)
            tag = self._tags[root] = mac.hexdigest()[:32].encode()
        return tag

    def for_salt(self, salt: str | None) -> bytes:
        return self.for_root(self.hasher.root(salt))


def encode_block_hash(block_hash: Hashable) -> bytes:
    """A chain hash as key text: hex of a sha256 digest, or ``i`` + 16 hex digits of a builtin 64-bit hash."""
    if isinstance(block_hash, bytes):
        return block_hash.hex().encode()
    if not isinstance(block_hash, (int, SupportsInt)):  # int first: the common case skips the protocol check
        raise InvalidArgument(f"a block hash is bytes (sha256) or an integer (builtin), "
                              f"got {type(block_hash).__name__}")
    return b"i%016x" % (int(block_hash) & 0xFFFF_FFFF_FFFF_FFFF)


def block_key(fingerprint: bytes, tag: bytes, block_hash: Hashable) -> bytes:
    """The key of one block: ``pkv1:<fingerprint hex>:<tenant tag>:<block hash>``."""
    return b":".join((KEY_PREFIX, fingerprint.hex().encode(), tag, encode_block_hash(block_hash)))
