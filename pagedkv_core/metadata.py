"""Batch export: the index arrays a step's kernels need, built with NumPy in O(batch) Python work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BatchMetadata", "build_batch_metadata"]


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    """Everything a paged kernel needs for one step of a batch (host int32 NumPy arrays).

    * ``block_tables [batch, max_blocks]``: padded with -1.
    * ``seq_lens [batch]``: tokens in the cache per sequence, the new ones included.
    * ``query_start_loc [batch + 1]``: offsets of each sequence's new tokens in the flattened query.
    * ``slot_mapping [num_new_tokens]``: where each new token's K/V goes (``block * block_size + offset``).
    * ``indptr [batch + 1]``, ``indices [sum(num_blocks)]``, ``last_page_len [batch]``: the same
      tables in FlashInfer's CSR form.
    """

    request_ids: tuple[str, ...]
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    slot_mapping: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    block_size: int

    @property
    def batch(self) -> int:
        return len(self.request_ids)

    @property
    def num_new_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == self.batch


def build_batch_metadata(request_ids: tuple[str, ...], tables: np.ndarray, lens: np.ndarray,
                         rows: np.ndarray, query_lens: np.ndarray, block_size: int) -> BatchMetadata:
    """Slice a batch out of the table arrays; ``query_lens[i]`` new tokens end sequence ``i``."""
    seq_lens = lens[rows]
    num_blocks = -(-seq_lens // block_size)
    max_blocks = int(num_blocks.max()) if rows.size else 0
    block_tables = tables[rows, :max_blocks]
    query_start_loc = np.zeros(rows.size + 1, np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    total = int(query_start_loc[-1])
    if total == rows.size:  # decode: one new token per sequence
        seq_of_token = np.arange(rows.size)
        positions = seq_lens.astype(np.int64) - 1
    else:
        seq_of_token = np.repeat(np.arange(rows.size), query_lens)
        offsets = np.arange(total) - query_start_loc[seq_of_token]
        positions = (seq_lens - query_lens)[seq_of_token] + offsets
    slot_mapping = (block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size).astype(np.int32)
    indptr = np.zeros(rows.size + 1, np.int32)
    np.cumsum(num_blocks, out=indptr[1:])
    used = np.arange(max_blocks)[None, :] < num_blocks[:, None]
    indices = block_tables[used]
    last_page_len = np.where(seq_lens > 0, seq_lens - (num_blocks - 1) * block_size, 0).astype(np.int32)
    return BatchMetadata(request_ids, block_tables, seq_lens, query_start_loc, slot_mapping, indptr, indices,
                         last_page_len, block_size)
