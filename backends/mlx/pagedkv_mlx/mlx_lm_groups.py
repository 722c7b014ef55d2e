"""Which layers of an mlx-lm model keep which kind of cache: the layer groups of a paged prompt cache.

mlx-lm states a model's cache kinds in one place, ``model.make_cache()``:
``KVCache`` for full attention, ``RotatingKVCache(max_size=w)`` for a
sliding window of ``w`` tokens (Gemma 3, Cohere 2, gpt-oss, Llama with
``layer_types``...) and ``ChunkedKVCache(chunk_size=c)`` for chunked-local
attention (Llama 4). Those objects are what the model's attention was written
against, so they, not the model arguments (whose names differ from model to
model), are read here; a model without ``make_cache`` gets ``KVCache`` layers
from mlx-lm, so it is uniform here too.

The classes are recognised by name, so this module never imports mlx-lm.
"""

from __future__ import annotations

from typing import Any

from pagedkv_core.errors import ShapeMismatch, UnsupportedOperation
from pagedkv_core.layers import LayerGroup

__all__ = ["model_layer_groups", "shortest_length", "layer_kinds"]


def _kind_of(cache: Any) -> tuple[str, int | None] | str:
    """``(kind, window or chunk)`` of one mlx-lm cache object, or the description of why it is refused."""
    name = type(cache).__name__
    if name == "KVCache":
        return "full", None
    if name == "RotatingKVCache":
        keep = int(getattr(cache, "keep", 0))
        if keep:  # the first ``keep`` tokens stay visible forever: no sliding-window group says that
            return f"RotatingKVCache(keep={keep})"
        return "sliding", int(cache.max_size)
    if name == "ChunkedKVCache":
        return "chunked_local", int(cache.chunk_size)
    return name


def model_layer_groups(model: Any) -> tuple[LayerGroup, ...] | None:
    """The layer groups that mirror ``model.make_cache()``; ``None`` when every layer keeps a ``KVCache``.

    Layers with the same kind and window (or chunk) form one group, in order
    of their first layer. Raises :class:`UnsupportedOperation` for any other
    cache class (quantized, state-space, ``CacheList``, a rotating cache that
    keeps its first tokens), naming them all.
    """
    if not hasattr(model, "make_cache"):
        return None
    caches = list(model.make_cache())
    if len(caches) != len(model.layers):
        raise ShapeMismatch(f"make_cache() builds {len(caches)} caches for {len(model.layers)} layers")
    layers: dict[tuple[str, int | None], list[int]] = {}
    refused: set[str] = set()
    for layer, cache in enumerate(caches):
        kind = _kind_of(cache)
        if isinstance(kind, str):
            refused.add(kind)
        else:
            layers.setdefault(kind, []).append(layer)
    if refused:
        raise UnsupportedOperation("the paged cache replaces KVCache, RotatingKVCache (keep=0) and ChunkedKVCache "
                                   f"layers; this model also uses {sorted(refused)}")
    if list(layers) == [("full", None)]:
        return None
    groups = []
    for (kind, size), members in layers.items():
        if kind == "sliding" and size is not None:
            groups.append(LayerGroup.sliding(size, members))
        elif kind == "chunked_local" and size is not None:
            groups.append(LayerGroup.chunked_local(size, members))
        else:
            groups.append(LayerGroup.full(members))
    return tuple(groups)


def shortest_length(group: LayerGroup, first: int) -> int:
    """The fewest tokens a sequence can be rolled back to while ``group``'s layers still hold position ``first`` on.

    A query at ``t`` reads from ``first_needed_token(t)``; rolling back to
    ``t`` is sound while that is not before ``first``, the oldest position the
    group still holds (released blocks, or a state that held only a window's
    tail). This is the manager's own rule (``HybridCacheManager.trim``) and
    ``first_needed_token`` grows with ``t``, so this is its inverse, rounded up.
    """
    if first <= 0:
        return 0
    if group.window is not None:  # max(0, t - window + 1) >= first
        return first + group.window - 1
    if group.chunk_size is not None:  # t // chunk * chunk >= first
        return -(-first // group.chunk_size) * group.chunk_size
    return 0


def layer_kinds(groups: tuple[LayerGroup, ...] | None, num_layers: int) -> tuple[tuple[str, int | None], ...]:
    """Each layer's ``(kind, window or chunk)``: two group lists that cut the same layers differently compare equal."""
    kinds: list[tuple[str, int | None]] = [("full", None)] * num_layers
    for group in groups or ():
        for layer in group.layers:
            if layer < num_layers:
                kinds[layer] = (group.kind, group.window or group.chunk_size)
    return tuple(kinds)
