"""Block tables: one per sequence, kept as rows of a preallocated int32 array.

The host metadata of a decode step must cost O(batch) Python work, so the
tables live in one ``[rows, width]`` int32 array (and lengths in an int32
vector) that a batch export slices with NumPy, instead of being rebuilt from
Python lists every step. Rows are recycled; the array doubles in rows when
more sequences are live than rows exist, and in width when a sequence
outgrows it (up to ``max_blocks_per_seq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OutOfBounds

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
    """The preallocated int32 storage behind every live block table.

    Both dimensions grow by doubling: rows when more sequences are live than
    rows exist, columns when a sequence needs more blocks than the array is
    wide, up to ``max_width`` (``CacheConfig.max_blocks_per_seq``). So a pool
    of a million blocks with no ``max_seq_len`` costs tables as wide as its
    longest sequence, not as wide as the pool, and every row operation touches
    only the entries its sequence uses (``used[row]`` of them), whatever the
    pool size. Entries past ``used[row]`` are always ``-1``.
    """

    def __init__(self, max_width: int, initial_rows: int = 64, initial_width: int = 32) -> None:
        self.max_width = max_width
        width = min(max_width, initial_width)
        self.tables = np.full((initial_rows, width), -1, np.int32)
        self.lens = np.zeros(initial_rows, np.int32)
        self.used = np.zeros(initial_rows, np.int32)
        self._free_rows = list(range(initial_rows - 1, -1, -1))

    @property
    def width(self) -> int:
        """Columns allocated now (at most ``max_width``); grow with :meth:`ensure_width`."""
        return int(self.tables.shape[1])

    def ensure_width(self, blocks: int) -> None:
        """Make room for a row of ``blocks`` entries (callers check ``blocks <= max_width`` first)."""
        width = self.tables.shape[1]
        if blocks <= width:
            return
        new_width = min(self.max_width, max(blocks, 2 * width))
        wider = np.full((self.tables.shape[0], new_width), -1, np.int32)
        wider[:, :width] = self.tables
        self.tables = wider

    def acquire(self) -> int:
        if not self._free_rows:
            old = self.tables.shape[0]
            self.tables = np.concatenate([self.tables, np.full_like(self.tables, -1)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self.used = np.concatenate([self.used, np.zeros_like(self.used)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def release(self, row: int) -> None:
        self.tables[row, :self.used[row]] = -1
        self.lens[row] = 0
        self.used[row] = 0
        self._free_rows.append(row)

    def set_row(self, row: int, blocks: list[int], num_tokens: int) -> None:
        n = len(blocks)
        self.ensure_width(n)
        self.tables[row, :n] = blocks
        old = int(self.used[row])
        if old > n:
            self.tables[row, n:old] = -1
        self.used[row] = n
        self.lens[row] = num_tokens

    def append(self, row: int, column: int, block: int) -> None:
        """Put ``block`` at ``column`` of ``row``: one past its last entry, or over it (copy-on-write)."""
        if column >= self.tables.shape[1]:
            self.ensure_width(column + 1)
        self.tables[row, column] = block
        if column >= self.used[row]:
            self.used[row] = column + 1

    @property
    def rows_in_use(self) -> int:
        return self.tables.shape[0] - len(self._free_rows)
