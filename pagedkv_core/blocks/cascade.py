"""Shared-prefix (cascade) structure of a decode batch: which sequences read the same leading blocks.

When many sequences of a batch share a prompt (a system prompt, beams,
parallel samples), their tables begin with the same block ids. Reading each
shared block once for the whole group — one matrix-matrix product for all
the group's queries instead of one matrix-vector product per sequence — is
FlashInfer's cascade attention; the partial results over the shared prefix
and over each sequence's own suffix are merged with their log-sum-exps.

The structure comes from the block ids alone (equal ids are the same bytes),
so it needs no help from the prefix cache and is right for forks and
``share_prefix`` too. Two levels, as engines use them: a group's shared
prefix, then each sequence's own blocks. Only whole blocks every member has
filled are shared, so each member reads exactly the tokens it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CascadeLayout", "build_cascade", "MIN_GROUP_SIZE", "MIN_SHARED_BLOCKS"]


@dataclass(frozen=True, slots=True)
class CascadeLayout:
    """The groups of a decode batch that share leading blocks (host int64 arrays, CSR form).

    * ``group_indptr [G + 1]`` into ``members``: the batch rows of group ``g``
      are ``members[group_indptr[g]:group_indptr[g + 1]]``.
    * ``shared_indptr [G + 1]`` into ``shared_blocks``: group ``g``'s shared
      prefix, the same first blocks of every member's table.
    * ``shared_tokens [batch]``: tokens each row reads at the shared level
      (0 for a row in no group); its own level starts there.
    """

    group_indptr: np.ndarray
    members: np.ndarray
    shared_indptr: np.ndarray
    shared_blocks: np.ndarray
    shared_tokens: np.ndarray
    block_size: int

    def ungrouped_rows(self) -> np.ndarray:
        """The batch rows in no group (they read no shared level)."""
        return np.flatnonzero(self.shared_tokens == 0)

    @property
    def num_groups(self) -> int:
        return int(self.group_indptr.shape[0] - 1)

    @property
    def batch(self) -> int:
        return int(self.shared_tokens.shape[0])

    def group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch rows, shared block ids) of group ``g``."""
        return (self.members[self.group_indptr[g]:self.group_indptr[g + 1]],
                self.shared_blocks[self.shared_indptr[g]:self.shared_indptr[g + 1]])

    @property
    def shared_reads_saved(self) -> int:
        """Block reads the shared level saves over reading every member's prefix on its own."""
        sizes = np.diff(self.group_indptr)
        return int(((sizes - 1) * np.diff(self.shared_indptr)).sum())


MIN_GROUP_SIZE = 8
MIN_SHARED_BLOCKS = 64
"""Defaults below which the shared level costs more than it saves on the CPU kernels (measured: NumPy groups of
8 sharing 1,024 tokens 1.08x, of 4 0.87x, pairs 0.46-0.61x; torch pairs 0.55-0.81x). GPU kernels, or an
engine's own, may want smaller groups: pass the thresholds."""


def build_cascade(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int, *,
                  min_shared_blocks: int = MIN_SHARED_BLOCKS, min_group_size: int = MIN_GROUP_SIZE) -> CascadeLayout:
    """Group the rows whose tables begin with the same blocks; O(batch x shared blocks) per level of splitting.

    A group needs at least ``min_group_size`` rows sharing at least
    ``min_shared_blocks`` whole blocks that every member has filled (below
    that, the shared level saves less than it costs; see
    :data:`MIN_GROUP_SIZE`). Rows whose common prefix is too short are split
    at the first block where they differ, so a subset sharing more (the
    forks of one request under a prompt every row shares) still forms a group.
    """
    tables = np.asarray(block_tables)
    lens = np.asarray(seq_lens, dtype=np.int64)
    full = lens // block_size  # whole blocks each row has filled
    found: list[tuple[np.ndarray, int]] = []
    _find_groups(tables, full, np.flatnonzero(full >= min_shared_blocks), min_shared_blocks, min_group_size, found)
    found.sort(key=lambda group: int(group[0][0]))
    members = [rows.astype(np.int64) for rows, _ in found]
    shared = [tables[rows[0], :k].astype(np.int64) for rows, k in found]
    shared_tokens = np.zeros(lens.shape[0], np.int64)
    for rows, k in found:
        shared_tokens[rows] = k * block_size
    group_indptr = np.zeros(len(members) + 1, np.int64)
    np.cumsum([m.size for m in members], out=group_indptr[1:])
    shared_indptr = np.zeros(len(shared) + 1, np.int64)
    np.cumsum([s.size for s in shared], out=shared_indptr[1:])
    empty = np.zeros(0, np.int64)
    return CascadeLayout(group_indptr, np.concatenate(members) if members else empty, shared_indptr,
                         np.concatenate(shared) if shared else empty, shared_tokens, block_size)


def _find_groups(tables: np.ndarray, full: np.ndarray, rows: np.ndarray, min_blocks: int, min_size: int,
                 found: list[tuple[np.ndarray, int]]) -> None:
    """Append (rows, shared blocks) for ``rows`` if they share enough, else for the parts they split into."""
    if rows.size < min_size:
        return
    limit = int(full[rows].min())
    same = (tables[rows, :limit] == tables[rows[0], :limit]).all(axis=0)
    k = limit if same.all() else int(np.argmin(same))
    if k >= min_blocks:
        found.append((np.sort(rows), k))
        return
    longer = rows[full[rows] > k]  # rows that can share beyond column k, split by their block there
    keys, inverse = np.unique(tables[longer, k], return_inverse=True)
    for part in range(keys.size):
        _find_groups(tables, full, longer[inverse == part], min_blocks, min_size, found)
