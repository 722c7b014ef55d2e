"""The sha256 block hash: its bytes are a stable format (persisted indexes, remote tiers, other processes)."""

from __future__ import annotations

import hashlib
from array import array

import numpy as np
import pytest

from pagedkv_core.blocks.hashing import BlockHasher


def _reference(parent: bytes, tokens) -> bytes:
    """The documented formula: sha256 over the parent digest and the tokens as native int64."""
    return hashlib.sha256(parent + array("q", [int(t) for t in tokens]).tobytes()).digest()


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_a_full_block_hashes_as_the_documented_formula(block_size):
    hasher = BlockHasher(block_size)
    tokens = [0, 1, -1, 2**63 - 1, -(2**63), 31999, 7, 5, 3, 2, 1, 0, 9, 8, 6, 4][:block_size]
    parent = hasher.root("salt")
    assert hasher.next(parent, tokens) == _reference(parent, tokens)
    assert hasher.next(parent, np.asarray(tokens, np.int64)) == _reference(parent, tokens)  # NumPy ints too
    chain = hasher.chain(tokens * 3, parent)
    assert chain[0] == _reference(parent, tokens) and chain[2] == _reference(chain[1], tokens)


def test_a_partial_block_and_bad_tokens_behave_as_array_does():
    hasher = BlockHasher(4)
    parent = hasher.root()
    assert hasher.next(parent, [1, 2]) == _reference(parent, [1, 2])
    with pytest.raises(TypeError):
        hasher.next(parent, [1, 2, 3, 4.5])
    with pytest.raises(OverflowError):
        hasher.next(parent, [1, 2, 3, 2**63])
    with pytest.raises(TypeError):
        hasher.next(None, [1, 2, 3, 4])
