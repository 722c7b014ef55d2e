"""mlx-lm's per-layer KV-cache protocol over a paged pool: :class:`PagedKVCache` and :func:`make_paged_prompt_cache`.

mlx-lm gives a model a *prompt cache*: a list with one cache object per
layer, each with ``update_and_fetch(keys, values)`` and an ``offset``. Here
the layers of one prompt cache are thin views (a layer index) over one
:class:`PagedSequences`: a sequence per batch row in a
:class:`~pagedkv_core.PagedKvCacheManager` whose storage is an
:class:`~pagedkv_mlx.storage.MlxStorage` holding every layer's pools.

A forward pass reserves the new positions once, for all layers: the first
layer whose update reaches past the reserved tokens extends every row
(``manager.extend_batch``, copy-on-write included); each layer then scatters
its new keys and values with one ``storage.write`` and returns the gathered
K/V ``[batch, n_kv_heads, offset, head_dim]``. Each layer keeps its own
``offset`` (a layer reads it for RoPE before its update), so the views stay
independent within a forward pass.

Written for mlx-lm 0.32 (tested with 0.32.2 on mlx 0.32.4). mlx-lm itself is
imported only by :meth:`PagedKVCache.make_mask`, so importing this module needs
MLX but not mlx-lm. Like the storage, a prompt cache is not thread-safe.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.config import AllocationRequest, CacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.manager.facade import PagedKvCacheManager

from .storage import MlxStorage

__all__ = ["PagedKVCache", "PagedSequences", "make_paged_prompt_cache", "load_paged_prompt_cache"]

Array = Any  # mx.array

_CACHES = itertools.count()
_FLOAT_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
_LOADABLE = ("PagedKVCache", "KVCache")  # classes whose state is (keys, values, offset)


def _release(manager: PagedKvCacheManager, request_ids: list[str]) -> None:
    """Free the rows' sequences (also the finalizer of a :class:`PagedSequences`, so it must not hold one)."""
    for rid in request_ids:
        if manager.has_sequence(rid):
            manager.deallocate(rid)
    request_ids.clear()


class PagedSequences:
    """The state every layer of one prompt cache shares: one manager sequence per batch row, each layer's offset.

    Rows open on the first write (as many as its batch) or with :meth:`admit`;
    they are freed by :meth:`release` or when the last layer view is
    garbage-collected. Several prompt caches may share one
    manager (pass ``manager=`` to :func:`make_paged_prompt_cache`): that is
    how a prompt admitted with its token ids reuses another's prefix blocks.
    """

    def __init__(self, manager: PagedKvCacheManager) -> None:
        self.manager = manager
        self.storage: MlxStorage = manager.storage
        self.config: CacheConfig = manager.config
        self.offsets = [0] * self.config.num_layers
        self.request_ids: list[str] = []  # mutated in place only: the finalizer holds this list
        self.dtype: Any = None  # the model's K/V dtype, learnt from the writes; fetches return it
        self._name = f"mlx-lm-{next(_CACHES)}"
        self._finalizer = weakref.finalize(self, _release, manager, self.request_ids)

    # -- rows ----------------------------------------------------------------

    @property
    def reserved(self) -> int:
        """Token slots each row holds (every layer's offset is at most this)."""
        if not self.request_ids:
            return 0
        return self.manager.get_handle(self.request_ids[0]).num_tokens

    def admit(self, token_ids: Sequence[int] | Any, *, cache_salt: str | None = None) -> int:
        """Start this empty cache with a one-row prompt; return how many leading tokens the prefix cache holds.

        ``token_ids`` (ints, 1-D NumPy or MLX array) is the whole prompt. The
        manager reserves its slots and shares the full blocks it already
        holds; feed the model only ``token_ids[cached:]`` (at least one token
        is always left to compute). Run that forward before admitting another
        prompt with the same prefix: the prompt's blocks are registered now,
        and must be written before anyone reads them.
        """
        if self.request_ids or any(self.offsets):
            raise InvalidArgument("admit starts a prompt cache: this one already holds tokens (release() it first)")
        tokens = tuple(int(t) for t in np.asarray(token_ids).reshape(-1).tolist())
        rid = f"{self._name}/0"
        handle = self.manager.allocate(AllocationRequest(rid, token_ids=tokens, cache_salt=cache_salt))
        self.request_ids.append(rid)
        cached = handle.num_cached_tokens
        self.offsets[:] = [cached] * len(self.offsets)
        return cached

    def _open(self, batch: int) -> None:
        ids = [f"{self._name}/{row}" for row in range(batch)]
        self.manager.allocate_batch([AllocationRequest(rid, initial_tokens=0) for rid in ids])
        self.request_ids.extend(ids)

    def release(self) -> None:
        """Free every row's blocks now (full ones stay in the prefix cache); the cache reads as empty."""
        _release(self.manager, self.request_ids)
        self.offsets[:] = [0] * len(self.offsets)

    def block_tables(self) -> np.ndarray:
        """int32 ``[batch, blocks]``: each row's physical blocks, read from the manager at each call."""
        rows = len(self.request_ids)
        return self.manager.batch_metadata(self.request_ids, [0] * rows).block_tables

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

    def write(self, layer: int, keys: Array, values: Array) -> tuple[int, np.ndarray]:
        """Append ``keys, values [batch, n_kv_heads, tokens, head_dim]`` to ``layer``.

        Positions not reserved yet are reserved for every row (and so for
        every layer) first; then one ``storage.write`` scatters the tokens.
        Returns the layer's new offset and the block tables it wrote through.
        """
        self._check(keys, values)
        batch, heads, count, dim = keys.shape
        start = self.offsets[layer]
        if not self.request_ids:
            self._open(batch)
        missing = start + count - self.reserved
        if missing > 0:
            self.manager.extend_batch(self.request_ids, [missing] * batch)
        bs = self.config.block_size
        pos = np.arange(start, start + count)
        tables = self.block_tables()
        slots = (tables[:, pos // bs].astype(np.int64) * bs + pos % bs).reshape(-1)
        k = keys.transpose(0, 2, 1, 3).reshape(batch * count, heads, dim)
        v = values.transpose(0, 2, 1, 3).reshape(batch * count, heads, dim)
        self.storage.write(layer, slots, k, v)
        self.offsets[layer] = start + count
        self.dtype = keys.dtype
        return start + count, tables

    def fetch(self, layer: int, length: int, tables: np.ndarray | None = None) -> tuple[Array, Array]:
        """The first ``length`` tokens of ``layer`` as K, V ``[batch, n_kv_heads, length, head_dim]``.

        ``tables``: the rows' current block tables, when the caller has them.
        """
        ks, vs = [], []
        for table in self.block_tables() if tables is None else tables:
            k, v = self.storage.gather(layer, table, length)
            ks.append(k)
            vs.append(v)
        k, v = (mx.stack(ks), mx.stack(vs)) if len(ks) > 1 else (ks[0][None], vs[0][None])
        if self.dtype is not None and k.dtype != self.dtype:  # int8 pools, or a pool wider than the model
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def trim(self, layer: int, num_tokens: int) -> int:
        """Roll ``layer`` back by up to ``num_tokens``; slots beyond every layer's offset go back to the manager."""
        n = max(0, min(self.offsets[layer], int(num_tokens)))
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
        extra = self.reserved - max(self.offsets)
        for row, rid in enumerate(self.request_ids):
            new = f"{twin._name}/{row}"
            self.manager.fork(rid, new)
            twin.request_ids.append(new)
            if extra > 0:  # reserved but unwritten slots stay with the original
                self.manager.trim(new, extra)
        return twin

    @property
    def nbytes(self) -> int:
        """Device bytes of the distinct blocks the rows hold, all layers (blocks shared with others included)."""
        if not self.request_ids:
            return 0
        meta = self.manager.batch_metadata(self.request_ids, [0] * len(self.request_ids))
        bs = self.config.block_size
        held = [row[: -(-int(n) // bs)] for row, n in zip(meta.block_tables, meta.seq_lens)]
        return int(np.unique(np.concatenate(held)).size) * self.config.bytes_per_block


class PagedKVCache:
    """One layer of a paged prompt cache: mlx-lm's per-layer cache protocol (as its ``KVCache``).

    ``state`` is ``(keys, values, offset)`` with exactly ``offset`` tokens, the
    format of mlx-lm's ``KVCache``, so states move between the two classes and
    ``save_prompt_cache`` writes them; :func:`load_paged_prompt_cache` reads
    them back. ``meta_state`` is empty, as for ``KVCache`` in the mlx-lm
    releases that have it. ``copy.deepcopy`` of a prompt cache (what mlx-lm's
    ``LRUPromptCache`` does) forks its sequences copy-on-write instead of
    copying K/V.
    """

    __slots__ = ("sequences", "layer")

    def __init__(self, sequences: PagedSequences, layer: int) -> None:
        self.sequences = sequences
        self.layer = layer

    @property
    def offset(self) -> int:
        """Tokens this layer holds (the position of the next one)."""
        return self.sequences.offsets[self.layer]

    def update_and_fetch(self, keys: Array, values: Array) -> tuple[Array, Array]:
        """Append ``keys, values [B, n_kv_heads, L, head_dim]``; return K, V ``[B, n_kv_heads, offset, head_dim]``."""
        length, tables = self.sequences.write(self.layer, keys, values)
        return self.sequences.fetch(self.layer, length, tables)

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        """The attention mask of ``N`` new tokens after ``offset`` ones (mlx-lm's own rule, as ``KVCache``)."""
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def state(self) -> tuple[Array | None, Array | None, int]:
        if not self.offset:
            return None, None, 0
        keys, values = self.sequences.fetch(self.layer, self.offset)
        return keys, values, self.offset

    @state.setter
    def state(self, value: Sequence[Any]) -> None:
        """Replace this layer's tokens with ``(keys, values[, offset])`` (a ``KVCache`` state works too).

        Keys beyond ``offset`` (``KVCache`` keeps a padded buffer) are ignored.
        Assigning to a layer that holds tokens, or to a cache whose layers are
        all empty, first clears the whole prompt cache (the layers share one
        block table): assign every layer, in any order, as a loader does.
        """
        keys, values, *rest = value
        seqs = self.sequences
        if self.offset or not any(seqs.offsets):
            seqs.release()
        if keys is None:
            return
        offset = int(rest[0]) if rest else keys.shape[2]
        if offset:
            seqs.write(self.layer, keys[..., :offset, :], values[..., :offset, :])

    @property
    def meta_state(self) -> str:
        return ""

    @meta_state.setter
    def meta_state(self, value: Any) -> None:
        if value:
            raise InvalidArgument(f"a PagedKVCache has no meta state (its state holds the offset), got {value!r}")

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (fewer if the layer holds fewer); return how many were dropped."""
        return self.sequences.trim(self.layer, n)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """This layer's share of the device bytes of the blocks the cache holds (the sum over layers is the whole)."""
        return self.sequences.nbytes // self.sequences.config.num_layers

    def __deepcopy__(self, memo: dict[int, Any]) -> PagedKVCache:
        twin = memo.get(id(self.sequences))
        if twin is None:
            twin = memo[id(self.sequences)] = self.sequences.fork()
        return PagedKVCache(twin, self.layer)

    def __repr__(self) -> str:
        return f"PagedKVCache(layer={self.layer}, offset={self.offset}, rows={len(self.sequences.request_ids)})"


# -- building ------------------------------------------------------------------------


def _model_shape(model: Any, num_kv_heads: int | None = None, head_dim: int | None = None) -> tuple[int, int, int]:
    """(layers, KV heads, head dim): the overrides, else read from the attention modules or ``model.args``.

    Overrides win, so a model named otherwise (mlx-lm's gpt2) works once the caller passes them, as the error asks.
    """
    layers = model.layers
    attn = getattr(layers[0], "self_attn", None)
    args = getattr(model, "args", None)
    heads = (num_kv_heads or getattr(attn, "n_kv_heads", None) or getattr(args, "num_key_value_heads", None)
             or getattr(args, "num_attention_heads", None))
    dim = head_dim or getattr(attn, "head_dim", None) or getattr(args, "head_dim", None)
    if dim is None and getattr(args, "hidden_size", None) and getattr(args, "num_attention_heads", None):
        dim = args.hidden_size // args.num_attention_heads
    if heads is None or dim is None:
        raise InvalidArgument("cannot tell the model's KV heads and head dim: pass num_kv_heads= and head_dim=")
    return len(layers), int(heads), int(dim)


def _model_dtype(model: Any) -> str:
    """The first floating dtype among the model's parameters (a quantized model's scales), else float32."""
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if p.dtype in _FLOAT_NAMES:
            return _FLOAT_NAMES[p.dtype]
    return "float32"


def make_paged_prompt_cache(model: Any, num_blocks: int | None = None, block_size: int = 16, device: str = "cpu",
                            *, dtype: str | None = None, manager: PagedKvCacheManager | None = None,
                            num_kv_heads: int | None = None, head_dim: int | None = None) -> list[PagedKVCache]:
    """A paged prompt cache for ``model``: one :class:`PagedKVCache` per layer, all over one pool.

    ``num_blocks`` blocks of ``block_size`` tokens (all layers, K and V) are
    allocated on ``device`` (``"cpu"`` or ``"gpu"``) in ``dtype`` (default: the
    model's floating dtype; ``"int8"`` quantizes). ``manager=`` shares an
    existing manager (``cache[0].sequences.manager``) instead, for prefix
    sharing between prompt caches. ``num_kv_heads`` and ``head_dim`` give the
    K/V shapes of a model whose modules do not name them as mlx-lm's Llama
    does (gpt2); they win over what is read. Models whose ``make_cache`` builds
    anything but ``KVCache`` layers (rotating, quantized, state-space) are refused.
    """
    if hasattr(model, "make_cache"):
        kinds = sorted({type(c).__name__ for c in model.make_cache()} - {"KVCache"})
        if kinds:
            raise UnsupportedOperation(f"the paged cache replaces KVCache layers only; this model also uses {kinds}")
    layers, heads, dim = _model_shape(model, num_kv_heads, head_dim)
    if manager is None:
        if num_blocks is None:
            raise InvalidArgument("pass num_blocks (the pool's size) or an existing manager")
        config = CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=dim, num_blocks=num_blocks,
                             block_size=block_size, dtype=dtype or _model_dtype(model))
        manager = PagedKvCacheManager(MlxStorage(config, device))
    c = manager.config
    if (c.num_layers, c.num_kv_heads, c.head_dim) != (layers, heads, dim):
        pool = (c.num_layers, c.num_kv_heads, c.head_dim)
        raise ShapeMismatch(f"the manager's pool has (layers, kv heads, head dim) {pool}, "
                            f"the model {(layers, heads, dim)}")
    sequences = PagedSequences(manager)
    return [PagedKVCache(sequences, layer) for layer in range(layers)]


def load_paged_prompt_cache(file_name: str, model: Any, num_blocks: int | None = None, block_size: int = 16,
                            device: str = "cpu", *, return_metadata: bool = False,
                            **options: Any) -> list[PagedKVCache] | tuple[list[PagedKVCache], dict[str, str]]:
    """Read a file of mlx-lm's ``save_prompt_cache`` into a new paged prompt cache.

    The file may come from a paged cache or from mlx-lm's ``KVCache`` layers;
    ``options`` go to :func:`make_paged_prompt_cache` (``dtype``, ``manager``...).
    Returns the cache, and the saved metadata if ``return_metadata``.
    """
    from mlx.utils import tree_unflatten

    arrays, flat_meta = mx.load(file_name, return_metadata=True)
    metadata, classes, scalars = tree_unflatten(list(flat_meta.items()))
    unknown = sorted(set(classes) - set(_LOADABLE))
    if unknown:
        raise UnsupportedOperation(f"{file_name}: only {', '.join(_LOADABLE)} layers load into a paged cache, "
                                   f"not {unknown}")
    if len(classes) != len(model.layers):
        raise ShapeMismatch(f"{file_name} holds {len(classes)} layers, the model has {len(model.layers)}")
    for pos, kind in scalars[1:]:  # the first entry is a placeholder that keeps the list non-empty
        if kind == "scalar":
            arrays[pos] = arrays[pos].item()
        elif kind == "none":
            arrays[pos] = None
        else:
            raise UnsupportedOperation(f"{file_name}: a KVCache state holds no {kind!r} entries")
    cache = make_paged_prompt_cache(model, num_blocks, block_size, device, **options)
    for layer, state in zip(cache, tree_unflatten(list(arrays.items()))):
        layer.state = state
    return (cache, metadata) if return_metadata else cache
