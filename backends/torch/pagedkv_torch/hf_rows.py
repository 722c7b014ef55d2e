"""The two managers a :class:`~pagedkv_torch.hf_cache.PagedCache` runs on, behind one small interface.

A model whose layers all attend to the whole sequence runs on a
:class:`~pagedkv_core.PagedKvCacheManager`: one block table per row serves
every layer, and the manager brings swapping, defragmentation, persistence
and its statistics. A model with sliding-window or chunked layers (Gemma 2/3,
Mistral, Cohere 2, gpt-oss, Llama 4) runs on a
:class:`~pagedkv_core.HybridCacheManager`: one table per *cache group*
(:mod:`pagedkv_core.layers`), and a sliding or chunked group releases the
blocks no future query can read before each step reserves new slots. A
full-attention model stays on the uniform manager: on the hybrid one it
would be a single cache group — the same tables, the same memory and the
same speed — without what only the uniform manager offers (swapping to a
host tier, defragmentation, persistence, eviction policies, ``stats()``).
The adapter needs a dozen operations of either; :class:`UniformRows` and
:class:`HybridRows` give them one shape, so :mod:`.hf_cache` never asks which
manager it holds. Both expose the manager's :class:`GroupLayout`: a uniform
manager is one full group whose storage layer ``L`` is model layer ``L``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pagedkv_core.blocks.metadata import BatchMetadata
from pagedkv_core.config import AllocationRequest
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.layers import CacheGroup, GroupLayout
from pagedkv_core.manager.facade import PagedKvCacheManager
from pagedkv_core.manager.hybrid import HybridCacheManager

if TYPE_CHECKING:
    from .hf_layers import LayerSpec

__all__ = ["CropPastWindow", "HybridRows", "Rows", "UniformRows", "bind", "block_owners", "blocks_from",
           "layer_windows_of", "row_blocks"]


class CropPastWindow(UnsupportedOperation, RuntimeError):
    """``crop`` would roll a row back to where a sliding or chunked layer already released what it needs.

    A ``RuntimeError`` too, as transformers' ``DynamicSlidingWindowLayer.crop``
    raises past its window. Raised before any row changes.
    """

    def __init__(self, row: int, tokens: int, needed_from: int, held_from: int, group: CacheGroup) -> None:
        self.row, self.tokens, self.needed_from, self.held_from = row, tokens, needed_from, held_from
        spec = group.group
        what = f"window {spec.window}" if spec.window is not None else f"chunk size {spec.chunk_size}"
        super().__init__(
            f"cannot crop row {row} back to {tokens} tokens: its {spec.kind} layers {list(group.layers)} ({what}) "
            f"would need tokens from {needed_from} on, but released the blocks before token {held_from}. "
            "Sliding and chunked layers keep what their next query can see and what the last step added; crop at "
            "most the last step's positions (speculative decoding does), or build the cache with hybrid=False "
            "to keep every token")


class UniformRows:
    """A :class:`PagedKvCacheManager`: one table per row for every layer; nothing is ever released early."""

    drops_blocks = False
    null_block: int | None = None

    def __init__(self, manager: PagedKvCacheManager) -> None:
        self.manager = manager
        self.layout: GroupLayout = manager.config.layout

    @property
    def prefix_caching(self) -> bool:
        return self.manager.prefix_config is not None

    def admit(self, request: AllocationRequest) -> int:
        """Admit one row; returns its prompt tokens served from the prefix cache."""
        return self.manager.allocate(request).num_cached_tokens

    def admit_all(self, requests: Sequence[AllocationRequest]) -> None:
        self.manager.allocate_batch(list(requests))

    def fork(self, request_id: str, new_request_id: str) -> None:
        self.manager.fork(request_id, new_request_id)

    def metadata(self, request_ids: Sequence[str]) -> tuple[BatchMetadata, ...]:
        """Each cache group's tables for the rows (one group here), no new tokens."""
        return (self.manager.batch_metadata(list(request_ids), [0] * len(request_ids)),)

    def forget(self, blocks: Iterable[int]) -> None:
        """Blocks registered for a prefix whose K/V were never (fully) written: empty the prefix cache."""
        self.manager.gc(all_prefixes=True)

    def check_trim(self, request_ids: Sequence[str], counts: Sequence[int]) -> None:
        """Every token stays stored: any rollback the rows' lengths allow is possible."""

    def would_release(self, request_ids: Sequence[str]) -> bool:
        return False


class HybridRows:
    """A :class:`HybridCacheManager`: a table per cache group; sliding and chunked groups release old blocks.

    Released table entries point at the manager's null block, so a group's
    tables tell which positions are gone without asking the manager more.
    """

    drops_blocks = True

    def __init__(self, manager: HybridCacheManager) -> None:
        self.manager = manager
        self.layout: GroupLayout = manager.layout
        self.null_block: int | None = manager.null_block

    @property
    def prefix_caching(self) -> bool:
        return self.manager.config.prefix_caching

    def admit(self, request: AllocationRequest) -> int:
        return self.manager.allocate(request).cached_tokens

    def admit_all(self, requests: Sequence[AllocationRequest]) -> None:
        """All rows or none (the manager admits one request at a time)."""
        done: list[str] = []
        try:
            for request in requests:
                self.manager.allocate(request)
                done.append(request.request_id)
        except BaseException:
            for request_id in done:
                self.manager.deallocate(request_id)
            raise

    def fork(self, request_id: str, new_request_id: str) -> None:
        self.manager.fork(request_id, new_request_id)

    def metadata(self, request_ids: Sequence[str]) -> tuple[BatchMetadata, ...]:
        return self.manager.batch_metadata(list(request_ids), [0] * len(request_ids)).groups

    def forget(self, blocks: Iterable[int]) -> None:
        """Unregister the prefix hashes of exactly these blocks, whose K/V were never (fully) written.

        The hybrid manager has no ``gc``; the pool's own ``unregister``, under
        the manager's lock, leaves every other cached prefix findable.
        """
        with self.manager.lock:
            for block in set(blocks) - {self.null_block}:
                self.manager.pool.unregister(block)

    def would_release(self, request_ids: Sequence[str]) -> bool:
        """Whether the manager's next reservation for these rows releases blocks (its rule: before what a query
        at the current length reads, never a row's last block)."""
        bs = self.manager.config.block_size
        for group, meta in zip(self.layout.cache_groups, self.metadata(request_ids)):
            if group.drops_blocks:
                held = (meta.block_tables == self.null_block).sum(axis=1)
                for row, tokens in enumerate(meta.seq_lens.tolist()):
                    upto = min(group.group.first_needed_token(tokens) // bs, -(-tokens // bs) - 1)
                    if upto > held[row]:
                        return True
        return False

    def check_trim(self, request_ids: Sequence[str], counts: Sequence[int]) -> None:
        """Raise :class:`CropPastWindow` if removing ``counts[i]`` tokens of row ``i`` needs a released block."""
        bs = self.manager.config.block_size
        for group, meta in zip(self.layout.cache_groups, self.metadata(request_ids)):
            if not group.drops_blocks:
                continue
            held_from = (meta.block_tables == self.null_block).sum(axis=1) * bs  # released entries lead the row
            for row, count in enumerate(counts):
                tokens = int(meta.seq_lens[row]) - int(count)
                needed_from = group.group.first_needed_token(tokens)
                if held_from[row] > needed_from:
                    raise CropPastWindow(row, tokens, needed_from, int(held_from[row]), group)


Rows = UniformRows | HybridRows


def row_blocks(meta: BatchMetadata, row: int) -> list[int]:
    """The table entries under row ``row``'s tokens (a hybrid manager's released ones show its null block)."""
    return [int(b) for b in meta.block_tables[row, :-(-int(meta.seq_lens[row]) // meta.block_size)]]


def blocks_from(rows: Rows, request_ids: Sequence[str], tokens: Sequence[int] | np.ndarray) -> set[int]:
    """Every group's blocks under the rows' tokens from ``tokens[i]`` on (rounded down to a block boundary)."""
    blocks: set[int] = set()
    for meta in rows.metadata(request_ids):
        for row, first in enumerate(tokens):
            blocks.update(row_blocks(meta, row)[int(first) // meta.block_size:])
    return blocks


def block_owners(rows: Rows, request_ids: Sequence[str]) -> dict[int, int]:
    """How many rows hold each block (every group; the null block left out)."""
    owners: dict[int, int] = {}
    for meta in rows.metadata(request_ids) if request_ids else ():
        for row in range(len(request_ids)):
            for block in set(row_blocks(meta, row)):
                owners[block] = owners.get(block, 0) + 1
    if rows.null_block is not None:
        owners.pop(rows.null_block, None)
    return owners


def layer_windows_of(layout: GroupLayout, specs: list[LayerSpec] | None, hybrid: bool) -> list[int | None]:
    """Each layer's window (a chunked layer's chunk size), checked against the manager's layout.

    ``specs`` come from the model config (:func:`~.hf_layers.layer_specs`);
    without them a hybrid layout says what each layer is, a uniform one that
    all are full. A hybrid layout must match the model layer for layer (its
    tables release what the layout says a layer no longer needs); a uniform
    manager stores every token, so any kinds run on it.
    """
    if specs is None:
        specs = [(g.kind, g.group.window or g.group.chunk_size) for g, _ in map(layout.locate, range(layout.num_layers))]
        if not hybrid:
            specs = [("full", None)] * layout.num_layers
    if len(specs) != layout.num_layers:
        raise ShapeMismatch(f"the model has {len(specs)} decoder layers, the manager {layout.num_layers}")
    if hybrid:
        for layer, spec in enumerate(specs):
            group = layout.locate(layer)[0].group
            if spec != (group.kind, group.window or group.chunk_size):
                raise InvalidArgument(f"layer {layer} is {spec[0]} ({spec[1]}) in the model but {group.kind} "
                                      f"({group.window or group.chunk_size}) in the manager's layer groups")
    return [size for _, size in specs]


def bind(manager: object) -> Rows:
    """The interface over ``manager``: hybrid for a :class:`HybridCacheManager`, uniform otherwise."""
    if isinstance(manager, HybridCacheManager):
        return HybridRows(manager)
    if isinstance(manager, PagedKvCacheManager):
        return UniformRows(manager)
    raise UnsupportedOperation(f"PagedCache runs on a PagedKvCacheManager or a HybridCacheManager, "
                               f"got {type(manager).__name__}")

