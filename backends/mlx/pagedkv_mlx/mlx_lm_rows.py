"""The state every layer of one paged prompt cache shares: :class:`PagedSequences`.

One manager sequence per batch row, each layer's offset, and where each layer
lives: a uniform model runs on a :class:`~pagedkv_core.PagedKvCacheManager`
(one block table, a storage layer per model layer), a hybrid model on a
:class:`~pagedkv_core.HybridCacheManager` (one table per cache group, model
layer ``L`` in storage layer ``slot_of(L)`` of its group's blocks). The two
managers differ in a handful of calls (lengths, admission, batch export);
they are bridged here, so the layer views above never ask which one they hold.

Sliding and chunked groups release blocks no future query reads when a step
reserves new slots; their table entries then point at the manager's null
block. A layer only ever gathers from ``visible_from(layer, offset)`` on, which
is never before the first live block: released blocks are never read.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.blocks.metadata import BatchMetadata
from pagedkv_core.config import AllocationRequest, CacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch
from pagedkv_core.layers import CacheGroup
from pagedkv_core.manager.facade import PagedKvCacheManager
from pagedkv_core.manager.hybrid import HybridCacheManager

from .mlx_lm_groups import shortest_length
from .storage import MlxStorage

__all__ = ["PagedSequences", "Manager"]

Array = Any  # mx.array
Manager = PagedKvCacheManager | HybridCacheManager

_CACHES = itertools.count()


def _release(manager: Manager, request_ids: list[str]) -> None:
    """Free the rows' sequences (also the finalizer of a :class:`PagedSequences`, so it must not hold one)."""
    for rid in request_ids:
        held = rid in manager if isinstance(manager, HybridCacheManager) else manager.has_sequence(rid)
        if held:
            manager.deallocate(rid)
    request_ids.clear()


class PagedSequences:
    """The state every layer of one prompt cache shares: one manager sequence per batch row, each layer's offset.

    Rows open on the first write (as many as its batch) or with :meth:`admit`;
    they are freed by :meth:`release` or when the last layer view is
    garbage-collected. Several prompt caches may share one
    manager (pass ``manager=`` to ``make_paged_prompt_cache``): that is
    how a prompt admitted with its token ids reuses another's prefix blocks.
    """

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.storage: MlxStorage = manager.storage
        self.config: CacheConfig = manager.config
        self.layout = layout = self.config.layout  # built once: a uniform config plans it at each call
        self.slots = layout.slots  # model layers per cache group: a block's share of each layer is 1 / slots
        self.num_groups = len(layout.cache_groups)
        self.where: list[tuple[CacheGroup, int]] = [layout.locate(layer) for layer in range(self.config.num_layers)]
        self.offsets = [0] * self.config.num_layers
        self.request_ids: list[str] = []  # mutated in place only: the finalizer holds this list
        self.dtype: Any = None  # the model's K/V dtype, learnt from the writes; fetches return it
        self.floor = 0  # no rollback below this: a state gave some layer only its window's tail
        self._name = f"mlx-lm-{next(_CACHES)}"
        self._finalizer = weakref.finalize(self, _release, manager, self.request_ids)

    # -- where a layer lives ------------------------------------------------

    def group_of(self, layer: int) -> CacheGroup:
        return self.where[layer][0]

    def visible_from(self, layer: int, position: int) -> int:
        """The oldest position a query at ``position`` (or later) reads in ``layer``: 0, or the window's or chunk's start."""
        return self.where[layer][0].group.first_needed_token(position)

    # -- rows ----------------------------------------------------------------

    @property
    def reserved(self) -> int:
        """Token slots each row holds (every layer's offset is at most this)."""
        if not self.request_ids:
            return 0
        rid = self.request_ids[0]
        if isinstance(self.manager, HybridCacheManager):
            return self.manager.num_tokens(rid)
        return self.manager.get_handle(rid).num_tokens

    def admit(self, token_ids: Sequence[int] | Any, *, cache_salt: str | None = None) -> int:
        """Start this empty cache with a one-row prompt; return how many leading tokens the prefix cache holds.

        ``token_ids`` (ints, 1-D NumPy or MLX array) is the whole prompt. The
        manager reserves its slots and shares the full blocks it already
        holds (for a hybrid model, the longest prefix every group can serve);
        feed the model only ``token_ids[cached:]`` (at least one token is
        always left to compute). Run that forward before admitting another
        prompt with the same prefix: the prompt's blocks are registered now,
        and must be written before anyone reads them.
        """
        if self.request_ids or any(self.offsets):
            raise InvalidArgument("admit starts a prompt cache: this one already holds tokens (release() it first)")
        tokens = tuple(int(t) for t in np.asarray(token_ids).reshape(-1).tolist())
        rid = f"{self._name}/0"
        request = AllocationRequest(rid, token_ids=tokens, cache_salt=cache_salt)
        if isinstance(self.manager, HybridCacheManager):
            cached = self.manager.allocate(request).cached_tokens
        else:
            cached = self.manager.allocate(request).num_cached_tokens
        self.request_ids.append(rid)
        self.offsets[:] = [cached] * len(self.offsets)
        return cached

    def _open(self, batch: int) -> None:
        ids = [f"{self._name}/{row}" for row in range(batch)]
        requests = [AllocationRequest(rid, initial_tokens=0) for rid in ids]
        if isinstance(self.manager, HybridCacheManager):
            opened: list[str] = []
            try:  # the hybrid manager admits one request at a time: undo the first rows if a later one fails
                for request in requests:
                    self.manager.allocate(request)
                    opened.append(request.request_id)
            except BaseException:
                _release(self.manager, opened)
                raise
        else:
            self.manager.allocate_batch(requests)
        self.request_ids.extend(ids)

    def release(self) -> None:
        """Free every row's blocks now (full ones stay in the prefix cache); the cache reads as empty."""
        _release(self.manager, self.request_ids)
        self.offsets[:] = [0] * len(self.offsets)
        self.floor = 0

    def metadata(self) -> tuple[BatchMetadata, ...]:
        """Each cache group's current tables and lengths of the rows (one entry for a uniform manager)."""
        query_lens = [0] * len(self.request_ids)
        if isinstance(self.manager, HybridCacheManager):
            return self.manager.batch_metadata(self.request_ids, query_lens).groups
        return (self.manager.batch_metadata(self.request_ids, query_lens),)

    def block_tables(self, group: int = 0) -> np.ndarray:
        """int32 ``[batch, blocks]``: each row's physical blocks in cache ``group``, read from the manager at each call.

        Entries a sliding or chunked group released hold the manager's null block.
        """
        return self.metadata()[group].block_tables

    def shortest_length(self) -> int:
        """The fewest tokens the rows can be rolled back to: 0 until a window or chunk let go of old positions.

        Positions go when a sliding or chunked group releases blocks, and
        when a layer's state held only its window's (or chunk's) tail.
        """
        lowest = self.floor
        if isinstance(self.manager, HybridCacheManager) and self.request_ids:
            null, bs = self.manager.null_block, self.config.block_size
            for cache_group, meta in zip(self.layout.cache_groups, self.metadata()):
                if cache_group.drops_blocks and meta.block_tables.size:
                    live_from = int(np.cumprod(meta.block_tables == null, axis=1).sum(axis=1).max())
                    lowest = max(lowest, shortest_length(cache_group.group, live_from * bs))
        return lowest

    # -- data ----------------------------------------------------------------

    def _check(self, keys: Array, values: Array) -> None:
        c = self.config
        expected = (c.num_kv_heads, c.head_dim)
        if keys.ndim != 4 or (keys.shape[1], keys.shape[3]) != expected:
            raise ShapeMismatch(f"keys must be [batch, {c.num_kv_heads}, tokens, {c.head_dim}], got {keys.shape}")
        if tuple(values.shape) != tuple(keys.shape):
            raise ShapeMismatch(f"values {values.shape} must have the shape of keys {keys.shape}")
        if self.request_ids and keys.shape[0] != len(self.request_ids):
            rows = len(self.request_ids)
            raise ShapeMismatch(f"this prompt cache holds {rows} rows, got a batch of {keys.shape[0]}")

    def write(self, layer: int, keys: Array, values: Array, start: int | None = None) -> tuple[int, np.ndarray]:
        """Append ``keys, values [batch, n_kv_heads, tokens, head_dim]`` to ``layer`` at ``start`` (default: its offset).

        Positions not reserved yet are reserved for every row (and so for
        every layer) first, which is when sliding and chunked groups release
        what fell out of reach; then one ``storage.write`` scatters the
        tokens. Returns the layer's new offset and the block tables (of the
        layer's cache group) it wrote through.
        """
        self._check(keys, values)
        batch, heads, count, dim = keys.shape
        start = self.offsets[layer] if start is None else start
        if not self.request_ids:
            self._open(batch)
        missing = start + count - self.reserved
        if missing > 0:
            self.manager.extend_batch(self.request_ids, [missing] * batch)
        group, storage_layer = self.where[layer]
        bs = self.config.block_size
        pos = np.arange(start, start + count)
        tables = self.block_tables(group.index)
        slots = (tables[:, pos // bs].astype(np.int64) * bs + pos % bs).reshape(-1)
        if count:  # a state whose window or chunk holds no token yet only moves the offset
            k = keys.transpose(0, 2, 1, 3).reshape(batch * count, heads, dim)
            v = values.transpose(0, 2, 1, 3).reshape(batch * count, heads, dim)
            self.storage.write(storage_layer, slots, k, v)
        self.offsets[layer] = start + count
        self.dtype = keys.dtype
        return start + count, tables

    def fetch(self, layer: int, length: int, tables: np.ndarray | None = None, first: int = 0) -> tuple[Array, Array]:
        """Tokens ``[first, length)`` of ``layer`` as K, V ``[batch, n_kv_heads, length - first, head_dim]``.

        Only the blocks holding those positions are gathered (none before
        ``first // block_size``). ``tables``: the rows' current block tables of
        the layer's cache group, when the caller has them.
        """
        group, storage_layer = self.where[layer]
        bs = self.config.block_size
        skip = first // bs  # whole blocks before the first position: released ones among them
        ks, vs = [], []
        for table in self.block_tables(group.index) if tables is None else tables:
            k, v = self.storage.gather(storage_layer, table[skip:], length - skip * bs)
            ks.append(k[first - skip * bs:])
            vs.append(v[first - skip * bs:])
        k, v = (mx.stack(ks), mx.stack(vs)) if len(ks) > 1 else (ks[0][None], vs[0][None])
        if self.dtype is not None and k.dtype != self.dtype:  # int8 pools, or a pool wider than the model
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def trim(self, layer: int, num_tokens: int) -> int:
        """Roll ``layer`` back by up to ``num_tokens``; slots beyond every layer's offset go back to the manager.

        Never below :meth:`shortest_length`, so every layer of the cache trims
        the same amount and the manager's rollback (made with the last layer)
        cannot be refused halfway.
        """
        n = max(0, min(self.offsets[layer] - self.shortest_length(), int(num_tokens)))
        self.offsets[layer] -= n
        extra = self.reserved - max(self.offsets)
        if n and extra > 0:
            for rid in self.request_ids:
                self.manager.trim(rid, extra)
        return n

    def fork(self) -> PagedSequences:
        """A copy-on-write twin: new rows share every block (``manager.fork``) until one of them writes."""
        twin = PagedSequences(self.manager)
        twin.offsets[:] = self.offsets
        twin.dtype = self.dtype
        twin.floor = self.floor
        extra = self.reserved - max(self.offsets)
        for row, rid in enumerate(self.request_ids):
            new = f"{twin._name}/{row}"
            self.manager.fork(rid, new)
            twin.request_ids.append(new)
            if extra > 0:  # reserved but unwritten slots stay with the original
                self.manager.trim(new, extra)
        return twin

    def group_nbytes(self, group: int) -> int:
        """Device bytes of the distinct blocks the rows hold in cache ``group`` (all its layers, K and V)."""
        if not self.request_ids:
            return 0
        meta = self.metadata()[group]
        bs = self.config.block_size
        held = np.unique(np.concatenate([row[: -(-int(n) // bs)] for row, n in zip(meta.block_tables, meta.seq_lens)]))
        if isinstance(self.manager, HybridCacheManager):
            held = held[held != self.manager.null_block]
        return int(held.size) * self.config.bytes_per_block

    @property
    def nbytes(self) -> int:
        """Device bytes of the distinct blocks the rows hold, all layers (blocks shared with others included)."""
        return sum(self.group_nbytes(group) for group in range(self.num_groups))
