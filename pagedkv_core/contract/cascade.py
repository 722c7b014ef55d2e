"""Checking a cascade (shared-prefix) layout against the batch it claims to describe.

A wrong layout would not read outside the pool (its blocks must equal the
checked table entries), but it would silently attend over the wrong keys,
so :meth:`AttentionBase.plan` checks every claim once per step before a
backend's ``plan_cascade`` sees it: the same typed errors on every backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..blocks.cascade import CascadeLayout
from ..config import CacheConfig
from ..errors import InvalidArgument, ShapeMismatch
from .storage import as_index_array

__all__ = ["check_cascade"]


def _ints(values: Any, name: str) -> np.ndarray:
    array = np.array(as_index_array(values, f"CascadeLayout.{name}"), dtype=np.int64).reshape(-1)
    array.flags.writeable = False
    return array


def _indptr(values: Any, name: str, end: int) -> np.ndarray:
    ptr = _ints(values, name)
    if ptr.size < 1 or ptr[0] != 0 or ptr[-1] != end or (np.diff(ptr) < 0).any():
        raise InvalidArgument(f"CascadeLayout.{name} must start at 0, never decrease and end at {end}")
    return ptr


def check_cascade(layout: Any, tables: np.ndarray, lens: np.ndarray, is_decode: bool, config: CacheConfig, *,
                  sliding_window: int | None, chunk_size: int | None) -> CascadeLayout:
    """A read-only copy of ``layout`` after checking it describes these (checked) tables exactly."""
    if not isinstance(layout, CascadeLayout):
        raise InvalidArgument(f"cascade must be a CascadeLayout (BatchMetadata.cascade()), got {type(layout).__name__}")
    if not is_decode:
        raise InvalidArgument("cascade attention serves decode steps (one query per sequence), not prefill")
    if sliding_window is not None or chunk_size is not None:
        raise InvalidArgument("cascade attention reads a shared prefix for every member: it does not combine with "
                              "sliding_window or chunk_size (plan those layers without cascade)")
    if layout.block_size != config.block_size:
        raise InvalidArgument(f"the layout was built for block_size {layout.block_size}, the pool has "
                              f"{config.block_size}")
    copy = _structure(layout, lens.shape[0])
    _check_claims(copy, tables, lens)
    return copy


def _structure(layout: CascadeLayout, batch: int) -> CascadeLayout:
    """Read-only int64 copies of the layout's arrays, after checking their shapes and pointers."""
    tokens = _ints(layout.shared_tokens, "shared_tokens")
    if tokens.shape != (batch,):
        raise ShapeMismatch(f"CascadeLayout.shared_tokens must be [{batch}], got {tokens.shape}")
    members = _ints(layout.members, "members")
    blocks = _ints(layout.shared_blocks, "shared_blocks")
    group_ptr = _indptr(layout.group_indptr, "group_indptr", members.size)
    shared_ptr = _indptr(layout.shared_indptr, "shared_indptr", blocks.size)
    if group_ptr.size != shared_ptr.size:
        raise ShapeMismatch("CascadeLayout.group_indptr and shared_indptr must describe the same groups")
    if members.size and (members.min() < 0 or members.max() >= batch or np.unique(members).size != members.size):
        raise InvalidArgument(f"CascadeLayout.members must be distinct batch rows in [0, {batch})")
    return CascadeLayout(group_ptr, members, shared_ptr, blocks, tokens, layout.block_size)


def _check_claims(layout: CascadeLayout, tables: np.ndarray, lens: np.ndarray) -> None:
    """Every group's rows begin with its shared blocks, have filled them, and start their own level after them."""
    expected = np.zeros(lens.shape[0], np.int64)
    bs = layout.block_size
    for g in range(layout.num_groups):
        rows, shared = layout.group(g)
        k = shared.size
        if rows.size == 0 or k == 0:
            raise InvalidArgument(f"cascade group {g} is empty")
        if (lens[rows] < k * bs).any():
            raise InvalidArgument(f"cascade group {g} shares {k} blocks, more than a member has filled")
        if (tables[rows, :k] != shared).any():
            raise InvalidArgument(f"cascade group {g}: a member's table does not begin with the shared blocks")
        expected[rows] = k * bs
    tokens = layout.shared_tokens
    if (tokens != expected).any():
        row = int(np.argmax(tokens != expected))
        raise InvalidArgument(f"CascadeLayout.shared_tokens[{row}] is {int(tokens[row])}, the groups say "
                              f"{int(expected[row])}")
