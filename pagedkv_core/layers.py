"""Layer groups: which layers keep which kind of cache, and how they share one block pool.

Hybrid models mix layer kinds — full attention beside sliding-window or
chunked-local layers (Gemma 2/3, Mistral, gpt-oss, Llama 4, Cohere 2), and
some keep a fixed-size state per sequence (Mamba, linear attention). A
:class:`LayerGroup` names a kind and its layers; :func:`plan_layout` turns the
groups into *cache groups*, the unit that has one block table per sequence.

One pool, equal pages (vLLM's hybrid allocator): every cache group holds the
same number of layers, ``slots`` (the greatest common divisor of the KV
groups' sizes), so a block is the same number of bytes whichever group owns
it and the pool's capacity flows to whichever group needs it. A group of
``m * slots`` layers becomes ``m`` cache groups whose tables evolve in step.
The backend's storage is built for ``slots`` layers (:meth:`CacheConfig.storage_config`):
model layer ``L`` lives in storage layer ``slot_of(L)`` of its cache group's blocks.

State groups take no blocks: the manager hands each sequence a slot index in
``[0, state_slots)`` and the engine keeps the ``[state_slots, *state_shape]``
arrays itself (the core never touches device arrays).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .dtypes import check_dtype
from .errors import InvalidArgument

__all__ = ["LayerKind", "LayerGroup", "CacheGroup", "GroupLayout", "plan_layout"]

LayerKind = Literal["full", "sliding", "chunked_local", "state"]
_KINDS = ("full", "sliding", "chunked_local", "state")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers that keep the same kind of cache. Build with the class methods."""

    kind: LayerKind
    layers: tuple[int, ...]
    window: int | None = None  # sliding: the query at t sees keys in (t - window, t]
    chunk_size: int | None = None  # chunked_local: keys of the query's own chunk only
    state_shape: tuple[int, ...] | None = None
    state_dtype: str | None = None
    state_slots: int = 0  # state: sequences that can hold a state at once

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidArgument(f"layer group kind must be one of {_KINDS}, got {self.kind!r}")
        layers = tuple(self.layers)
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise InvalidArgument(f"a layer group needs layer indices >= 0, got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise InvalidArgument(f"a layer appears twice in one group: {layers}")
        object.__setattr__(self, "layers", layers)
        if (self.kind == "sliding") != (self.window is not None) or (
                self.window is not None and not _positive(self.window)):
            raise InvalidArgument(f"a sliding group needs window > 0 (and only it), got {self.window!r}")
        if (self.kind == "chunked_local") != (self.chunk_size is not None) or (
                self.chunk_size is not None and not _positive(self.chunk_size)):
            raise InvalidArgument(f"a chunked_local group needs chunk_size > 0 (and only it), got {self.chunk_size!r}")
        if self.kind == "state":
            shape = self.state_shape
            if shape is None or not all(_positive(d) for d in shape):
                raise InvalidArgument(f"a state group needs a shape of positive ints, got {shape!r}")
            object.__setattr__(self, "state_shape", tuple(shape))
            if not isinstance(self.state_dtype, str):
                raise InvalidArgument(f"a state group needs a dtype name, got {self.state_dtype!r}")
            check_dtype(self.state_dtype)
            if not _positive(self.state_slots):
                raise InvalidArgument(f"a state group needs state_slots > 0, got {self.state_slots!r}")
        elif self.state_shape is not None or self.state_dtype is not None or self.state_slots:
            raise InvalidArgument("state_shape, state_dtype and state_slots belong to state groups only")

    @classmethod
    def full(cls, layers: Iterable[int]) -> LayerGroup:
        return cls("full", tuple(layers))

    @classmethod
    def sliding(cls, window: int, layers: Iterable[int]) -> LayerGroup:
        return cls("sliding", tuple(layers), window=window)

    @classmethod
    def chunked_local(cls, chunk_size: int, layers: Iterable[int]) -> LayerGroup:
        return cls("chunked_local", tuple(layers), chunk_size=chunk_size)

    @classmethod
    def state(cls, shape: Iterable[int], dtype: str, layers: Iterable[int], *, slots: int) -> LayerGroup:
        return cls("state", tuple(layers), state_shape=tuple(shape), state_dtype=dtype, state_slots=slots)

    def first_needed_token(self, num_tokens: int) -> int:
        """The oldest position a query at ``num_tokens`` (or later) can still see: what must stay cached."""
        if self.window is not None:
            return max(0, num_tokens - self.window + 1)
        if self.chunk_size is not None:
            return num_tokens // self.chunk_size * self.chunk_size
        return 0

    def shortest_length_keeping(self, first_kept: int) -> int:
        """The fewest tokens a sequence can have while its queries read nothing before position ``first_kept``."""
        if first_kept <= 0:
            return 0
        if self.window is not None:
            return first_kept + self.window - 1
        if self.chunk_size is not None:
            return -(-first_kept // self.chunk_size) * self.chunk_size
        return 0


@dataclass(frozen=True, slots=True)
class CacheGroup:
    """Layers with one block table per sequence; ``layers[j]`` lives in storage layer ``j``."""

    index: int
    group: LayerGroup  # the layer group it was cut from (its kind, window, chunk)
    layers: tuple[int, ...]

    @property
    def kind(self) -> LayerKind:
        return self.group.kind

    @property
    def drops_blocks(self) -> bool:
        """Whether old blocks fall out of what queries can see (sliding and chunked groups)."""
        return self.group.kind in ("sliding", "chunked_local")


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """The cache groups of a model, the state groups, and where each layer lives."""

    cache_groups: tuple[CacheGroup, ...]
    state_groups: tuple[LayerGroup, ...]
    slots: int  # layers per cache group: the storage's number of layers
    num_layers: int

    def locate(self, layer: int) -> tuple[CacheGroup, int]:
        """The cache group of a KV layer and its storage layer."""
        for cache_group in self.cache_groups:
            if layer in cache_group.layers:
                return cache_group, cache_group.layers.index(layer)
        kinds = {x: g.kind for g in self.state_groups for x in g.layers}
        if layer in kinds:
            raise InvalidArgument(f"layer {layer} keeps a state, not KV blocks")
        raise InvalidArgument(f"layer {layer!r} out of range [0, {self.num_layers})")

    def state_group_of(self, layer: int) -> int:
        """The index (in ``state_groups``) of a state layer's group."""
        for i, group in enumerate(self.state_groups):
            if layer in group.layers:
                return i
        raise InvalidArgument(f"layer {layer!r} is not a state layer")


def plan_layout(groups: tuple[LayerGroup, ...], num_layers: int) -> GroupLayout:
    """Check that the groups cover every layer exactly once and cut the KV groups into equal cache groups."""
    seen: list[int] = sorted(x for g in groups for x in g.layers)
    if seen != list(range(num_layers)):
        raise InvalidArgument(f"layer groups must cover layers 0..{num_layers - 1} exactly once, got {seen}")
    kv = [g for g in groups if g.kind != "state"]
    if not kv:
        raise InvalidArgument("at least one layer group must keep KV blocks (full, sliding or chunked_local)")
    slots = math.gcd(*(len(g.layers) for g in kv))
    cache_groups: list[CacheGroup] = []
    for group in kv:
        for start in range(0, len(group.layers), slots):
            cache_groups.append(CacheGroup(len(cache_groups), group, group.layers[start:start + slots]))
    return GroupLayout(tuple(cache_groups), tuple(g for g in groups if g.kind == "state"), slots, num_layers)
