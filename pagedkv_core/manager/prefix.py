"""The prefix cache's side of the manager: the hash scheme, admission plans, and hashing full blocks.

The pool keeps the hash index itself (which block holds which hash); this
component decides what to look up and what to register, and remembers the
chain it hashed for the last request so that ``can_allocate`` followed by
``allocate`` (or a remote prefetch followed by ``allocate``) hashes a prompt
once.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..blocks.hashing import BlockHasher
from ..blocks.pool import BlockPool
from ..config import AllocationRequest, PrefixCacheConfig
from ..errors import OutOfBounds
from .records import Sequence

if TYPE_CHECKING:
    from ..remote.connector import Prefetched, RemoteConnector

__all__ = ["AdmissionPlan", "PrefixIndex"]


@dataclass(slots=True)
class AdmissionPlan:
    """What admitting a request takes: cache hits, the chain hashed so far, new blocks, the chain's root."""

    hits: list[int]
    hashes: list[Hashable]
    new_blocks: int
    root: Hashable | None

    def free_blocks_needed(self, pool: BlockPool) -> int:
        """Free blocks the admission consumes: the new ones plus hits still sitting in the free queue."""
        return self.new_blocks + sum(1 for b in self.hits if pool.ref[b] == 0)


class PrefixIndex:
    """Prefix-cache policy over a :class:`BlockPool`: lookups at admission, registration as blocks fill."""

    def __init__(self, pool: BlockPool, block_size: int, config: PrefixCacheConfig | None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.config: PrefixCacheConfig | None = None
        self.hasher: BlockHasher | None = None
        self.remote: RemoteConnector | None = None  # a shared tier behind the local cache
        self._last: tuple[object, Hashable | None, list[Hashable]] = (None, None, [])  # (request, root, chain)
        self.configure(config)

    def configure(self, config: PrefixCacheConfig | None) -> None:
        """Use ``config`` from now on (``None`` or disabled: no prefix caching); hashes planned before are void."""
        self._last = (None, None, [])
        self.config = config if config is not None and config.enabled else None
        if self.config is None:
            self.hasher = None
            self.pool.max_cached = None
            return
        self.hasher = BlockHasher(self.block_size, self.config.hash_algorithm, self.config.hash_seed)
        self.pool.max_cached = self.config.max_prefixes

    def remember(self, request: AllocationRequest, root: Hashable, chain: list[Hashable]) -> None:
        """Keep a chain hashed for ``request`` (by a prefetch) so its admission does not hash it again."""
        self._last = (request, root, chain)

    def plan(self, request: AllocationRequest, max_blocks: int) -> AdmissionPlan:
        """The request's hits, the hashes computed up to the first miss, and the new blocks it needs.

        ``allocate`` completes the chain later (:meth:`complete_chain`), so a
        refused ``can_allocate`` costs little.
        """
        bs = self.block_size
        n = request.initial_tokens or 0
        total_blocks = -(-n // bs)
        if total_blocks > max_blocks:
            raise OutOfBounds(n - 1, max_blocks * bs)
        hits: list[int] = []
        hashes: list[Hashable] = []
        root: Hashable | None = None
        config, hasher = self.config, self.hasher
        if config is not None and hasher is not None and request.token_ids is not None:
            if config.ttl_seconds is not None:
                self.pool.expire_cached(config.ttl_seconds)
            cached_request, cached_root, known = self._last
            root = hasher.root(request.cache_salt)  # also tells whether the hash scheme changed since
            if cached_request is not request or cached_root != root:  # can_allocate, allocate: hash once
                known = []
                self._last = (request, root, known)
            tokens, parent, lookup, step = request.token_ids, root, self.pool.cached.get, hasher.next
            for i in range((n - 1) // bs):  # at least one token is always computed
                if i < len(known):
                    parent = known[i]
                else:
                    parent = step(parent, tokens[i * bs:(i + 1) * bs])
                    known.append(parent)
                hashes.append(parent)
                block = lookup(parent)
                if block is None:
                    break
                hits.append(block)
            if len(hits) * bs < config.min_prefix_length:
                hits = []
        return AdmissionPlan(hits, hashes, total_blocks - len(hits), root)

    def prefetch(self, request: AllocationRequest) -> Prefetched | None:
        """The remote tier's blocks for ``request``, read before the manager's lock (None without a tier)."""
        remote, hasher = self.remote, self.hasher
        if remote is None or hasher is None or request.token_ids is None:
            return None
        bs = self.block_size
        root = hasher.root(request.cache_salt)
        chain = hasher.chain(request.token_ids[:((request.initial_tokens or 0) - 1) // bs * bs], root)
        self.remember(request, root, chain)
        return remote.prefetch(root, chain)

    def complete_chain(self, request: AllocationRequest, plan: AdmissionPlan) -> None:
        """Extend ``plan.hashes`` to every full block of the prompt (the lookup stopped at the first miss)."""
        hasher = self.hasher
        if plan.root is None or hasher is None or request.token_ids is None:
            return
        hashes = plan.hashes
        hashes += hasher.chain(request.token_ids, plan.root, hashes[-1] if hashes else None, len(hashes))

    def hash_full_blocks(self, seq: Sequence) -> None:
        """Hash and register the sequence's blocks that filled up since the last call."""
        hasher, tokens = self.hasher, seq.token_ids
        if hasher is None or tokens is None:
            return
        bs, hashes = self.block_size, seq.hashes
        while len(hashes) < len(tokens) // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.root
            block_hash = hasher.next(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(block_hash)
            self.pool.register(seq.blocks[i], block_hash, parent if i else None)
            if self.remote is not None and seq.root is not None:
                self.remote.note(seq.root, (block_hash,))
