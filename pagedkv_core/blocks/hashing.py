"""Chained hashes of full blocks of token ids, the keys of the prefix cache.

The hash of block ``i`` covers its tokens *and* the hash of block ``i - 1``,
so equal hashes mean equal whole prefixes. The chain starts from a root that
mixes the configured seed and the tenant's salt: two tenants with different
salts can never produce the same hash for the same tokens.

``sha256`` (default) gives 32-byte digests that are stable across processes
and machines. ``builtin`` uses Python's tuple hash on integers, which is
stable across processes for ints (it is not randomized like ``str``) and
several times faster, at the cost of 64-bit collision resistance.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Callable, Hashable, Sequence

__all__ = ["BlockHasher"]

BlockHash = Hashable


class BlockHasher:
    """Computes the hash chain of a token sequence, block by block."""

    def __init__(self, block_size: int, algorithm: str = "sha256", seed: int = 0) -> None:
        self.block_size = block_size
        self.algorithm = algorithm
        self.seed = seed
        self._pack_block = struct.Struct(f"={block_size}q").pack  # native order, 8-byte ints: array("q")'s bytes
        self._step: Callable[[BlockHash, Sequence[int]], BlockHash]
        self._step = self._sha256_step if algorithm == "sha256" else self._builtin_step

    def root(self, salt: str | None = None) -> BlockHash:
        """The parent hash of a sequence's first block."""
        digest = hashlib.sha256(f"pagedkv:{self.seed}:{salt or ''}".encode()).digest()
        return digest if self.algorithm == "sha256" else int.from_bytes(digest[:8], "little", signed=True)

    def next(self, parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
        """Hash of one full block given its parent's hash."""
        return self._step(parent, tokens)

    def chain(self, tokens: Sequence[int], root: BlockHash, start_parent: BlockHash | None = None,
              first_block: int = 0) -> list[BlockHash]:
        """Hashes of every full block of ``tokens`` from ``first_block`` on."""
        bs = self.block_size
        parent = root if start_parent is None else start_parent
        out = []
        for i in range(first_block, len(tokens) // bs):
            parent = self._step(parent, tokens[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    def _sha256_step(self, parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
        if not isinstance(parent, bytes):  # a sha256 chain's parents are its own digests (the root included)
            raise TypeError(f"sha256 chain parent must be bytes, got {type(parent).__name__}")
        try:  # a full block packs with one precompiled Struct: the same bytes as array("q"), a third faster
            data = self._pack_block(*tokens) if len(tokens) == self.block_size else array("q", tokens).tobytes()
        except struct.error:  # not int64s: array() raises the error callers have always seen
            data = array("q", tokens).tobytes()
        return hashlib.sha256(parent + data).digest()

    @staticmethod
    def _builtin_step(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
        return hash((parent, tuple(tokens)))
