"""Block tables: one per sequence, kept as rows of a preallocated int32 array.

The host metadata of a decode step must cost O(batch) Python work, so the
tables live in one ``[rows, max_blocks_per_seq]`` int32 array (and lengths in
an int32 vector) that a batch export slices with NumPy, instead of being
rebuilt from Python lists every step. Rows are recycled; the array doubles
when more sequences are live than rows exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OutOfBounds

__all__ = ["BlockTable", "TableArrays"]


@dataclass(frozen=True, slots=True)
class BlockTable:
    """A snapshot of one sequence's logical -> physical block map."""

    block_ids: tuple[int, ...]
    num_tokens: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def free_slots(self) -> int:
        """Token slots left in the last block."""
        return self.num_blocks * self.block_size - self.num_tokens

    def slot(self, position: int) -> int:
        """Physical slot (``block_id * block_size + offset``) of a token position."""
        if not 0 <= position < self.num_tokens:
            raise OutOfBounds(position, self.num_tokens)
        return self.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    @staticmethod
    def blocks_needed(num_tokens: int, block_size: int) -> int:
        return -(-num_tokens // block_size)


class TableArrays:
    """The preallocated int32 storage behind every live block table."""

    def __init__(self, max_blocks_per_seq: int, initial_rows: int = 64) -> None:
        self.width = max_blocks_per_seq
        self.tables = np.full((initial_rows, max_blocks_per_seq), -1, np.int32)
        self.lens = np.zeros(initial_rows, np.int32)
        self._free_rows = list(range(initial_rows - 1, -1, -1))

    def acquire(self) -> int:
        if not self._free_rows:
            old = self.tables.shape[0]
            self.tables = np.concatenate([self.tables, np.full_like(self.tables, -1)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def release(self, row: int) -> None:
        self.tables[row] = -1
        self.lens[row] = 0
        self._free_rows.append(row)

    def set_row(self, row: int, blocks: list[int], num_tokens: int) -> None:
        self.tables[row, :len(blocks)] = blocks
        self.tables[row, len(blocks):] = -1
        self.lens[row] = num_tokens

    @property
    def rows_in_use(self) -> int:
        return self.tables.shape[0] - len(self._free_rows)
