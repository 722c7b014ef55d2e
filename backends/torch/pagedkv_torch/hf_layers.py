"""The per-layer side of the Hugging Face adapter: layer kinds, a layer's view of the cache, statistics.

Split out of :mod:`.hf_cache` to keep modules small. The layer objects exist
because transformers reads sizes per layer (``get_mask_sizes``,
``get_seq_length``, ``is_sliding``); the K/V themselves, and everything that
acts on whole sequences, belong to :class:`~pagedkv_torch.hf_cache.PagedCache`.

The layer kinds also become pagedkv layer groups (:func:`layer_groups`), by
which a hybrid manager releases blocks, so they say what the model's masks
do: a chunked layer is a ``chunked_local`` group (all of a chunk is freed
when the next chunk starts), although transformers caches it like a sliding
layer whose window is the chunk size (which sizes what its ``update`` returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagedkv_core.errors import UnsupportedOperation
from pagedkv_core.layers import LayerGroup, LayerKind

from .hf_compat import load_cache_utils
from .hf_pool import refuse_shared_kv

if TYPE_CHECKING:
    from .hf_cache import PagedCache

__all__ = ["HfCacheStats", "LayerSpec", "PagedLayer", "layer_groups", "layer_specs", "layer_windows"]

_cache_utils = load_cache_utils()
_KINDS: dict[str, LayerKind] = {"full_attention": "full", "sliding_attention": "sliding",
                                 "chunked_attention": "chunked_local"}
LayerSpec = tuple[LayerKind, int | None]  # (pagedkv layer kind, window or chunk size; None when full)


def layer_specs(config: Any) -> list[LayerSpec]:
    """Per decoder layer, its kind and size, read as ``DynamicCache(config=config)`` reads them.

    ``("full", None)``, ``("sliding", window)`` or ``("chunked_local",
    attention_chunk_size)`` (Llama 4). Raises :class:`UnsupportedOperation`
    for layer kinds without a plain K/V cache (linear attention, KV-sharing,
    indexed attention, ...).
    """
    text = config.get_text_config(decoder=True)
    refuse_shared_kv(text)  # its layers read as "dummy"; say why
    describe = getattr(_cache_utils, "get_layer_types_and_kwargs", None) or _layer_types
    types, kwargs = describe(text)
    unsupported = sorted({t for t in types if t not in _KINDS})
    if unsupported:
        raise UnsupportedOperation(f"PagedCache stores full, sliding and chunked attention layers; this model also "
                                   f"has {', '.join(unsupported)} layers")
    return [(_KINDS[t], kw.get("sliding_window") if _KINDS[t] != "full" else None) for t, kw in zip(types, kwargs)]


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer, None (full attention) or its window (a chunked layer's chunk size), as ``DynamicCache``.

    transformers caches a chunked layer like a sliding one of ``window = attention_chunk_size``
    (only the mask differs), so the window is what sizes the K/V a layer returns.
    """
    return [size for _, size in layer_specs(config)]


def layer_groups(specs: list[LayerSpec]) -> tuple[LayerGroup, ...]:
    """One :class:`LayerGroup` per kind and size of :func:`layer_specs`, in the order of their first layers."""
    members: dict[LayerSpec, list[int]] = {}
    for layer, spec in enumerate(specs):
        members.setdefault(spec, []).append(layer)
    return tuple(LayerGroup(kind, tuple(layers), window=size if kind == "sliding" else None,
                            chunk_size=size if kind == "chunked_local" else None)
                 for (kind, size), layers in members.items())


def _layer_types(config: Any) -> tuple[list[str], list[dict]]:
    """``get_layer_types_and_kwargs`` for 5.x releases that lack it: ``layer_types``, else one kind for all."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = ("sliding_attention" if getattr(config, "sliding_window", None) is not None
                else "chunked_attention" if getattr(config, "attention_chunk_size", None) is not None
                else "full_attention")
        types = [kind] * config.num_hidden_layers
    windows = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
    return list(types), [{"sliding_window": getattr(config, windows[t])} if t in windows else {} for t in types]


@dataclass(frozen=True, slots=True)
class HfCacheStats:
    """What a :class:`PagedCache` holds now, and what it admitted since it was built."""

    sequences: int  # rows now held
    seq_length: int  # padded length, what get_seq_length() reports
    stored_tokens: int  # tokens the rows hold (padding not counted)
    blocks: int  # distinct blocks under the rows (every cache group's; released ones not counted)
    shared_blocks: int  # of which under two rows or more
    prompt_tokens: int  # tokens admitted through begin(), since construction
    prefix_hit_tokens: int  # of which served by shared blocks (prefix cache)
    padding_skipped: int  # leading padding positions not stored, since construction


class PagedLayer(_cache_utils.CacheLayerMixin):
    """One decoder layer's view of a :class:`PagedCache`: its sizes, for masks; its K/V through the cache.

    Sequence-level operations (crop, reorder, select) act on every layer at
    once in the manager, so they are methods of the cache, not of a layer.
    """

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, sliding_window: int | None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to set up: the pools were allocated with the storage."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.layer_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def kv_start(self, seen: int) -> int:
        """First padded position returned by an update made after ``seen`` positions."""
        return 0 if self.sliding_window is None else max(seen - self.sliding_window + 1, 0)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next update, as ``DynamicLayer`` / ``DynamicSlidingWindowLayer``.

        Early 5.x releases passed ``cache_position`` here; its length is the query length.
        """
        q = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
        seen = self.get_seq_length()
        offset = self.kv_start(seen)
        return seen + q - offset, offset

    def _whole_cache(self, name: str):
        raise UnsupportedOperation(f"{name} acts on whole sequences: call it on the PagedCache, not on a layer")

    def crop(self, tokens_to_remove: int) -> None:
        self._whole_cache("crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._whole_cache("reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._whole_cache("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._whole_cache("batch_select_indices")

    def reset(self) -> None:
        self._whole_cache("reset")

    def offload(self) -> None:
        raise UnsupportedOperation("PagedCache does not offload layers; swap sequences with the manager instead")

    prefetch = offload
