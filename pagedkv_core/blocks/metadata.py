"""Batch export: the index arrays a step's kernels need, built with NumPy in O(batch) Python work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layers import CacheGroup, GroupLayout
from .cascade import MIN_GROUP_SIZE, MIN_SHARED_BLOCKS, CascadeLayout, build_cascade

__all__ = ["BatchMetadata", "HybridMetadata", "LayerStep", "build_batch_metadata"]


class BatchMetadata:
    """Everything a paged kernel needs for one step of a batch (host int32 NumPy arrays).

    * ``block_tables [batch, max_blocks]``: padded with -1.
    * ``seq_lens [batch]``: tokens in the cache per sequence, the new ones included.
    * ``query_start_loc [batch + 1]``: offsets of each sequence's new tokens in the flattened query.
    * ``slot_mapping [num_new_tokens]``: where each new token's K/V goes (``block * block_size + offset``).
    * ``indptr [batch + 1]``, ``indices [sum(num_blocks)]``, ``last_page_len [batch]``: the same
      tables in FlashInfer's CSR form, built on first access (most kernels take the padded form).
    """

    __slots__ = ("request_ids", "block_tables", "seq_lens", "query_start_loc", "slot_mapping", "block_size",
                 "_csr")

    def __init__(self, request_ids: tuple[str, ...], block_tables: np.ndarray, seq_lens: np.ndarray,
                 query_start_loc: np.ndarray, slot_mapping: np.ndarray, block_size: int) -> None:
        self.request_ids = request_ids
        self.block_tables = block_tables
        self.seq_lens = seq_lens
        self.query_start_loc = query_start_loc
        self.slot_mapping = slot_mapping
        self.block_size = block_size
        self._csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def batch(self) -> int:
        return len(self.request_ids)

    @property
    def num_new_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == self.batch

    def _csr_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._csr is None:
            bs = self.block_size
            num_blocks = -(-self.seq_lens // bs)
            indptr = np.zeros(self.batch + 1, np.int32)
            np.cumsum(num_blocks, out=indptr[1:])
            used = np.arange(self.block_tables.shape[1])[None, :] < num_blocks[:, None]
            last = np.where(self.seq_lens > 0, self.seq_lens - (num_blocks - 1) * bs, 0).astype(np.int32)
            self._csr = (indptr, self.block_tables[used], last)
        return self._csr

    @property
    def indptr(self) -> np.ndarray:
        return self._csr_form()[0]

    @property
    def indices(self) -> np.ndarray:
        return self._csr_form()[1]

    @property
    def last_page_len(self) -> np.ndarray:
        return self._csr_form()[2]

    def cascade(self, *, min_shared_blocks: int = MIN_SHARED_BLOCKS, min_group_size: int = MIN_GROUP_SIZE) -> CascadeLayout:
        """Which rows share leading blocks, for ``attention.plan(..., cascade=...)`` or an engine's own kernels."""
        return build_cascade(self.block_tables, self.seq_lens, self.block_size,
                             min_shared_blocks=min_shared_blocks, min_group_size=min_group_size)

    def __repr__(self) -> str:
        return (f"BatchMetadata(batch={self.batch}, new_tokens={self.num_new_tokens}, "
                f"seq_lens={self.seq_lens.tolist()}, slot_mapping={self.slot_mapping.tolist()})")


def build_batch_metadata(request_ids: tuple[str, ...], tables: np.ndarray, lens: np.ndarray, rows: np.ndarray,
                         query_lens: np.ndarray | None, block_size: int,
                         slot_mapping: np.ndarray | None = None) -> BatchMetadata:
    """Slice a batch out of the table arrays; ``query_lens[i]`` new tokens end sequence ``i`` (None: one each).

    A decode step passes the ``slot_mapping`` it already knows from reserving the slots.
    """
    seq_lens = lens[rows]
    max_blocks = -(-int(seq_lens.max()) // block_size) if rows.size else 0
    block_tables = tables[rows, :max_blocks]
    if query_lens is None:
        query_start_loc = np.arange(rows.size + 1, dtype=np.int32)
        if slot_mapping is None:
            positions = seq_lens.astype(np.int64) - 1
            slot_mapping = (block_tables[np.arange(rows.size), positions // block_size].astype(np.int64)
                            * block_size + positions % block_size).astype(np.int32)
        return BatchMetadata(request_ids, block_tables, seq_lens, query_start_loc, slot_mapping, block_size)
    query_start_loc = np.zeros(rows.size + 1, np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    total = int(query_start_loc[-1])
    seq_of_token = np.repeat(np.arange(rows.size), query_lens)
    offsets = np.arange(total) - query_start_loc[seq_of_token]
    positions = (seq_lens - query_lens)[seq_of_token] + offsets
    slots = (block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
             + positions % block_size).astype(np.int32)
    return BatchMetadata(request_ids, block_tables, seq_lens, query_start_loc, slots, block_size)


@dataclass(frozen=True, slots=True)
class LayerStep:
    """What one model layer's attention needs in a hybrid step.

    ``metadata`` of its cache group, the ``storage_layer`` its K/V live in,
    and the mask of its kind: pass ``sliding_window`` and ``chunk_size`` to
    the attention plan (a plan per cache group serves all its layers).
    """

    metadata: BatchMetadata
    storage_layer: int
    group: CacheGroup

    @property
    def sliding_window(self) -> int | None:
        return self.group.group.window

    @property
    def chunk_size(self) -> int | None:
        return self.group.group.chunk_size


@dataclass(frozen=True, slots=True)
class HybridMetadata:
    """One step's metadata for every cache group of a hybrid model (``groups[i]`` for cache group ``i``)."""

    layout: GroupLayout
    groups: tuple[BatchMetadata, ...]

    def for_layer(self, layer: int) -> LayerStep:
        group, storage_layer = self.layout.locate(layer)
        return LayerStep(self.groups[group.index], storage_layer, group)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return self.groups[0].request_ids
