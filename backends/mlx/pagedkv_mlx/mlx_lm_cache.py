"""mlx-lm's per-layer KV-cache protocol over a paged pool: :func:`make_paged_prompt_cache` and its layer views.

mlx-lm gives a model a *prompt cache*: a list with one cache object per
layer, each with ``update_and_fetch(keys, values)`` and an ``offset``. Here
the layers of one prompt cache are thin views (a layer index) over one
:class:`~pagedkv_mlx.mlx_lm_rows.PagedSequences`: a sequence per batch row in
a manager whose storage is an :class:`~pagedkv_mlx.storage.MlxStorage`.

The view of a layer stands in for the cache mlx-lm's ``model.make_cache()``
gives it: :class:`PagedKVCache` for ``KVCache`` (full attention),
:class:`PagedSlidingKVCache` for ``RotatingKVCache`` (a sliding window) and
:class:`PagedChunkedKVCache` for ``ChunkedKVCache`` (chunked-local attention,
Llama 4). Each returns to the model's attention the keys and values, and
builds the mask, that mlx-lm's own class would. A model whose layers all use
``KVCache`` runs on a :class:`~pagedkv_core.PagedKvCacheManager` with one
block table; a hybrid one on a :class:`~pagedkv_core.HybridCacheManager`
with a cache group per kind (:mod:`pagedkv_mlx.mlx_lm_groups`), whose sliding
and chunked groups return the blocks no future query can read to the pool
while the sequence grows, instead of keeping a private window buffer per layer.

A forward pass reserves the new positions once, for all layers: the first
layer whose update reaches past the reserved tokens extends every row
(``manager.extend_batch``, copy-on-write and window releases included); each
layer then scatters its new keys and values with one ``storage.write`` and
returns the gathered K/V ``[batch, n_kv_heads, tokens, head_dim]``. Each
layer keeps its own ``offset`` (a layer reads it for RoPE before its update),
so the views stay independent within a forward pass.

Written for mlx-lm 0.32 (tested with 0.32.2 on mlx 0.32.4). mlx-lm itself is
imported only when a model builds its masks, so importing this module needs
MLX but not mlx-lm. Like the storage, a prompt cache is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from pagedkv_core.config import CacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.manager.facade import PagedKvCacheManager
from pagedkv_core.manager.hybrid import HybridCacheManager

from .mlx_lm_groups import layer_kinds, model_layer_groups, shortest_length
from .mlx_lm_rows import Manager, PagedSequences
from .storage import MlxStorage

__all__ = ["PagedKVCache", "PagedSlidingKVCache", "PagedChunkedKVCache", "PagedSequences",
           "make_paged_prompt_cache", "load_paged_prompt_cache"]

Array = Any  # mx.array

_FLOAT_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
# classes whose state is (keys, values, offset)
_LOADABLE = ("PagedKVCache", "PagedSlidingKVCache", "PagedChunkedKVCache", "KVCache")


class PagedKVCache:
    """One full-attention layer of a paged prompt cache: mlx-lm's per-layer cache protocol (as its ``KVCache``).

    ``state`` is ``(keys, values, offset)`` with exactly ``offset`` tokens, the
    format of mlx-lm's ``KVCache``, so states move between the two classes and
    ``save_prompt_cache`` writes them; :func:`load_paged_prompt_cache` reads
    them back. ``meta_state`` is empty, as for ``KVCache`` in the mlx-lm
    releases that have it. ``copy.deepcopy`` of a prompt cache (what mlx-lm's
    ``LRUPromptCache`` does) forks its sequences copy-on-write instead of
    copying K/V. The sliding and chunked layers below differ only in which
    positions they return and in their masks.
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
        """Append ``keys, values [B, n_kv_heads, L, head_dim]``; return the K, V ``[B, n_kv_heads, T, head_dim]`` to attend.

        ``T`` runs from the oldest position the new queries can see (0 for a
        full layer) to the new ``offset``.
        """
        first = self.sequences.visible_from(self.layer, self.offset)
        length, tables = self.sequences.write(self.layer, keys, values)
        return self.sequences.fetch(self.layer, length, tables, first)

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        """The attention mask of ``N`` new tokens after ``offset`` ones (mlx-lm's own rule, as ``KVCache``)."""
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def state(self) -> tuple[Array | None, Array | None, int]:
        """``(keys, values, offset)``: every token here, only those a future query can read in a window or chunk."""
        if not self.offset:
            return None, None, 0
        first = self.sequences.visible_from(self.layer, self.offset)
        keys, values = self.sequences.fetch(self.layer, self.offset, first=first)
        return keys, values, self.offset

    @state.setter
    def state(self, value: Sequence[Any]) -> None:
        """Replace this layer's tokens with ``(keys, values[, offset])`` (a ``KVCache`` state works too).

        ``keys`` holds either every token from position 0 (keys beyond
        ``offset``, ``KVCache``'s padded buffer, are ignored) or, with fewer
        than ``offset`` tokens, the newest ones: enough for a sliding or
        chunked layer, whose state is that tail (the cache then cannot be
        trimmed back past what the tail covers). Assigning to a layer that
        holds tokens, or to a cache whose layers are all empty, first clears the
        whole prompt cache (the layers share their rows): assign every layer,
        in any order, as a loader does.
        """
        keys, values, *rest = value
        if len(rest) > 1:
            raise UnsupportedOperation(f"{type(self).__name__} takes a (keys, values[, offset]) state, "
                                       f"got {len(value)} entries (mlx-lm's RotatingKVCache and ChunkedKVCache "
                                       "states do not load into a paged cache)")
        offset = 0 if keys is None else int(rest[0]) if rest else keys.shape[2]
        first = self.sequences.visible_from(self.layer, offset)
        held = 0 if keys is None else keys.shape[2]
        start = first if held >= offset else first - (offset - held)  # from position 0, or the newest tokens
        if start < 0:
            raise ShapeMismatch(f"layer {self.layer} reads positions {first}..{offset - 1}, but the state's "
                                f"{held} tokens start at position {offset - held}")
        seqs = self.sequences
        if self.offset or not any(seqs.offsets):
            seqs.release()
        if not offset:
            return
        if held < offset:  # positions before the tail were never here: no rollback may reach them
            seqs.floor = max(seqs.floor, shortest_length(seqs.group_of(self.layer).group, offset - held))
        end = start + offset - first
        seqs.write(self.layer, keys[..., start:end, :], values[..., start:end, :], start=first)

    @property
    def meta_state(self) -> str:
        return ""

    @meta_state.setter
    def meta_state(self, value: Any) -> None:
        if value:
            raise InvalidArgument(f"a {type(self).__name__} has no meta state (its state holds the offset), "
                                  f"got {value!r}")

    def is_trimmable(self) -> bool:
        """Whether ``trim(n)`` drops ``n`` tokens (all it holds, at most): until a window or chunk let go of any."""
        return self.sequences.shortest_length() == 0

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (fewer if the layer holds fewer, or if a window or chunk let go of what
        the shorter sequence would read); return how many were dropped, the same number for every layer."""
        return self.sequences.trim(self.layer, n)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """This layer's share of the device bytes of the blocks the cache holds (the sum over layers is the whole)."""
        seqs = self.sequences
        return seqs.group_nbytes(seqs.group_of(self.layer).index) // seqs.slots

    def __deepcopy__(self, memo: dict[int, Any]) -> PagedKVCache:
        twin = memo.get(id(self.sequences))
        if twin is None:
            twin = memo[id(self.sequences)] = self.sequences.fork()
        return type(self)(twin, self.layer)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer={self.layer}, offset={self.offset}, "
                f"rows={len(self.sequences.request_ids)})")


class PagedSlidingKVCache(PagedKVCache):
    """A sliding-window layer: what mlx-lm's ``RotatingKVCache(max_size=window)`` gives attention, paged.

    A query at ``t`` sees the ``window`` positions ``(t - window, t]``. The K/V
    returned are those of mlx-lm's rotating cache, in temporal order (it keeps
    a rotated buffer; attention does not depend on the order): for ``L`` new
    tokens at ``offset``, the ``min(offset, window - 1)`` before them and the
    ``L`` new ones. :meth:`make_mask` is ``RotatingKVCache.make_mask`` for those
    keys. Blocks wholly before the window go back to the pool as the
    sequence grows. ``state`` holds the ``min(offset, window - 1)`` newest
    tokens, all a future query reads; the layer takes them back, or a
    ``KVCache`` state of every token.
    """

    __slots__ = ()
    keep = 0  # mlx-lm's RotatingKVCache attribute: no leading tokens are kept outside the window

    @property
    def max_size(self) -> int:
        """The window, in tokens (the name of ``RotatingKVCache``'s bound)."""
        return self.sequences.group_of(self.layer).group.window or 0

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        """The mask of ``N`` new queries over the keys :meth:`update_and_fetch` returns (``RotatingKVCache``'s rule)."""
        from mlx_lm.models.base import create_causal_mask

        window = self.max_size
        if N > 1:
            window_size = window_size or window
            before = min(window - 1, self.offset)
            if before + N > window_size or return_array:
                return create_causal_mask(N, before, window_size=window_size)
            return "causal"
        keys = min(self.offset + 1, window)
        if window_size is None or keys <= window_size:
            return None
        return mx.arange(keys) >= keys - window_size  # a narrower window than the cache's, in temporal order

    def size(self) -> int:
        return min(self.offset, self.max_size)


class PagedChunkedKVCache(PagedKVCache):
    """A chunked-local layer: what mlx-lm's ``ChunkedKVCache(chunk_size)`` gives Llama 4's attention, paged.

    A query at ``t`` sees the positions of its own chunk up to ``t``. The K/V
    returned start at ``start_position``, the first position of the chunk of
    the first new token (``ChunkedKVCache`` may start up to a chunk earlier, at
    positions the model's chunk mask hides anyway), and Llama 4 builds its mask
    from ``start_position`` and ``offset``, so the two agree. Blocks of earlier
    chunks go back to the pool as the sequence grows. ``state`` holds the
    tokens of the current chunk (none right at a chunk's start).
    """

    __slots__ = ()

    @property
    def chunk_size(self) -> int:
        return self.sequences.group_of(self.layer).group.chunk_size or 0

    @property
    def start_position(self) -> int:
        """The first position the next update returns: the start of the chunk of position ``offset``."""
        return self.sequences.visible_from(self.layer, self.offset)

    def maybe_trim_front(self) -> None:
        """Nothing to do: the returned positions follow ``offset``, and the manager releases old blocks itself."""

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        """The chunk mask of ``N`` new queries over the keys :meth:`update_and_fetch` returns.

        ``ChunkedKVCache`` has no ``make_mask`` (Llama 4 builds this mask
        itself); this one is given so that mlx-lm's ``create_attention_mask``
        never pairs these keys with a plain causal mask.
        """
        start, chunk = self.start_position, self.chunk_size
        keys = mx.arange(start, self.offset + N)[None]
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        mask = (keys // chunk == queries // chunk) & (keys <= queries)
        if window_size is not None:
            mask = mask & (keys > queries - window_size)
        return mask

    def size(self) -> int:
        return self.offset - self.start_position


_VIEWS: dict[str, type[PagedKVCache]] = {
    "full": PagedKVCache, "sliding": PagedSlidingKVCache, "chunked_local": PagedChunkedKVCache}


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


def _new_manager(model: Any, shape: tuple[int, int, int], num_blocks: int | None, block_size: int, device: str,
                 dtype: str | None, groups: Any) -> Manager:
    if num_blocks is None:
        raise InvalidArgument("pass num_blocks (the pool's size) or an existing manager")
    layers, heads, dim = shape
    config = CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=dim, num_blocks=num_blocks,
                         block_size=block_size, dtype=dtype or _model_dtype(model), layer_groups=groups)
    storage = MlxStorage(config.storage_config(), device)
    return PagedKvCacheManager(storage) if groups is None else HybridCacheManager(storage, config)


def make_paged_prompt_cache(model: Any, num_blocks: int | None = None, block_size: int = 16, device: str = "cpu",
                            *, dtype: str | None = None, manager: Manager | None = None,
                            num_kv_heads: int | None = None, head_dim: int | None = None) -> list[PagedKVCache]:
    """A paged prompt cache for ``model``: one view per layer, all over one pool.

    The views mirror ``model.make_cache()``: :class:`PagedKVCache` where it
    builds a ``KVCache``, :class:`PagedSlidingKVCache` for a
    ``RotatingKVCache`` (keep=0) and :class:`PagedChunkedKVCache` for a
    ``ChunkedKVCache``; any other class (quantized, state-space, a rotating
    cache that keeps its first tokens) is refused with
    :class:`UnsupportedOperation`. A model of ``KVCache`` layers only gets a
    :class:`~pagedkv_core.PagedKvCacheManager`, whose blocks hold every layer;
    any other a :class:`~pagedkv_core.HybridCacheManager`, whose blocks hold
    ``config.layout.slots`` layers of one cache group.

    ``num_blocks`` blocks of ``block_size`` tokens (K and V) are allocated on
    ``device`` (``"cpu"`` or ``"gpu"``) in ``dtype`` (default: the model's
    floating dtype; ``"int8"`` quantizes). ``manager=`` shares an existing
    manager (``cache[0].sequences.manager``) instead, for prefix sharing
    between prompt caches; its layers must keep the kinds the model's do.
    ``num_kv_heads`` and ``head_dim`` give the K/V shapes of a model whose
    modules do not name them as mlx-lm's Llama does (gpt2); they win over what
    is read.
    """
    groups = model_layer_groups(model)
    shape = _model_shape(model, num_kv_heads, head_dim)
    if manager is None:
        manager = _new_manager(model, shape, num_blocks, block_size, device, dtype, groups)
    c = manager.config
    if (c.num_layers, c.num_kv_heads, c.head_dim) != shape:
        pool = (c.num_layers, c.num_kv_heads, c.head_dim)
        raise ShapeMismatch(f"the manager's pool has (layers, kv heads, head dim) {pool}, the model {shape}")
    if layer_kinds(c.layer_groups, c.num_layers) != layer_kinds(groups, shape[0]):
        raise InvalidArgument(f"the manager's layer groups {c.layer_groups} do not keep the caches the model's "
                              f"make_cache() asks for {groups}")
    sequences = PagedSequences(manager)
    return [_VIEWS[sequences.group_of(layer).kind](sequences, layer) for layer in range(shape[0])]


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
