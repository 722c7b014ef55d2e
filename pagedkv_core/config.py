"""Configuration and request records: small frozen dataclasses, validated on creation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .dtypes import check_dtype, is_quantized, itemsize
from .errors import InvalidArgument
from .layers import GroupLayout, LayerGroup, plan_layout

__all__ = [
    "PressureThresholds",
    "PrefixCacheConfig",
    "CacheConfig",
    "AllocationRequest",
    "HashAlgorithm",
]

HashAlgorithm = Literal["sha256", "builtin"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


@dataclass(frozen=True, slots=True)
class PressureThresholds:
    """Utilization watermarks (used blocks / total blocks) of the pressure levels.

    Below ``medium`` the pressure is LOW; at or above ``critical`` it is CRITICAL.
    """

    medium: float = 0.6
    high: float = 0.8
    critical: float = 0.95

    def __post_init__(self) -> None:
        _require(
            0.0 < self.medium < self.high < self.critical <= 1.0,
            f"pressure thresholds must satisfy 0 < medium < high < critical <= 1, got "
            f"{self.medium}/{self.high}/{self.critical}",
        )


@dataclass(frozen=True, slots=True)
class PrefixCacheConfig:
    """How full blocks are recognised and kept for reuse across requests.

    ``max_prefixes`` bounds the number of cached (hashed) blocks kept while
    free; ``min_prefix_length`` ignores hits shorter than that many tokens;
    ``ttl_seconds`` forgets free cached blocks older than that (``None``: never).
    ``hash_seed`` is part of every chain, so two deployments that must never
    share blocks can choose different seeds; it comes from configuration and is
    the same in every process.
    """

    enabled: bool = True
    max_prefixes: int | None = None
    min_prefix_length: int = 0
    ttl_seconds: float | None = None
    hash_algorithm: HashAlgorithm = "sha256"
    hash_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.max_prefixes is None or self.max_prefixes >= 0, "max_prefixes must be >= 0")
        _require(self.min_prefix_length >= 0, "min_prefix_length must be >= 0")
        _require(self.ttl_seconds is None or self.ttl_seconds > 0, "ttl_seconds must be > 0")
        _require(self.hash_algorithm in ("sha256", "builtin"), "hash_algorithm must be 'sha256' or 'builtin'")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Shape of the paged cache: what a backend needs to build its pools.

    Pools are ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer,
    for K and for V. ``num_host_blocks`` is the capacity of the host (swap) tier.

    ``layer_groups`` describes a hybrid model (full, sliding-window,
    chunked-local and state layers; see :mod:`pagedkv_core.layers`): such a
    config is served by :class:`~pagedkv_core.HybridCacheManager`, and the
    backend's storage is built from :meth:`storage_config` (one layer per
    slot of a cache group, not one per model layer). ``None``: every layer
    is a full-attention layer with the same block table.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: str = "float32"
    num_host_blocks: int = 0
    max_seq_len: int | None = None
    prefix_cache: PrefixCacheConfig | None = field(default_factory=PrefixCacheConfig)
    pressure: PressureThresholds = field(default_factory=PressureThresholds)
    layer_groups: tuple[LayerGroup, ...] | None = None
    _layout: GroupLayout | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, f"{name} must be a positive int, got {value!r}")
        _require(_is_int(self.num_host_blocks) and self.num_host_blocks >= 0,
                 f"num_host_blocks must be an int >= 0, got {self.num_host_blocks!r}")
        _require(self.max_seq_len is None or (_is_int(self.max_seq_len) and self.max_seq_len > 0),
                 f"max_seq_len must be a positive int or None, got {self.max_seq_len!r}")
        _require(isinstance(self.dtype, str), f"dtype must be a name such as 'float16', got {self.dtype!r}")
        check_dtype(self.dtype)
        if self.layer_groups is not None:
            groups = tuple(self.layer_groups)
            _require(all(isinstance(g, LayerGroup) for g in groups), "layer_groups must hold LayerGroup objects")
            object.__setattr__(self, "layer_groups", groups)
            object.__setattr__(self, "_layout", plan_layout(groups, self.num_layers))

    @property
    def layout(self) -> GroupLayout:
        """The cache groups and where each layer lives (one full group of every layer without ``layer_groups``)."""
        if self._layout is None:
            return plan_layout((LayerGroup.full(range(self.num_layers)),), self.num_layers)
        return self._layout

    @property
    def hybrid(self) -> bool:
        return self.layer_groups is not None

    def storage_config(self) -> CacheConfig:
        """What the backend's storage is built for: one layer per slot of a cache group, no groups.

        Every block of the shared pool holds ``layout.slots`` layers, whichever
        cache group owns it; for a config without groups this is the config itself.
        """
        if self._layout is None:
            return self
        return dataclasses.replace(self, num_layers=self._layout.slots, layer_groups=None)

    @property
    def max_blocks_per_seq(self) -> int:
        """Width of a block-table row: enough for ``max_seq_len``.

        Default: the whole pool; for a hybrid model whose every KV group
        releases old blocks (all sliding or chunked), positions are not bounded
        by the pool, so the default is the int32 position limit (rows grow
        only as far as a sequence does).
        """
        if self.max_seq_len is None:
            layout = self._layout
            if layout is not None and all(g.drops_blocks for g in layout.cache_groups):
                return (2**31 - 1) // self.block_size
            return self.num_blocks
        return math.ceil(self.max_seq_len / self.block_size)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)

    @property
    def bytes_per_block(self) -> int:
        """Device bytes of one block over all its layers (a cache group's slots when hybrid), K and V, scales included."""
        values = self.block_size * self.num_kv_heads * self.head_dim * itemsize(self.dtype)
        scales = self.num_kv_heads * 4 if self.quantized else 0
        layers = self.num_layers if self._layout is None else self._layout.slots
        return 2 * layers * (values + scales)

    @property
    def device_bytes(self) -> int:
        """Bytes of the device pools (every layer, K and V, scales included): what ``create_storage`` allocates."""
        return self.num_blocks * self.bytes_per_block

    @property
    def host_tier_bytes(self) -> int:
        """Bytes the host (swap) tier holds when full."""
        return self.num_host_blocks * self.bytes_per_block

    @property
    def prefix_caching(self) -> bool:
        return self.prefix_cache is not None and self.prefix_cache.enabled


@dataclass(frozen=True, slots=True)
class AllocationRequest:
    """Ask for a sequence's cache.

    ``token_ids`` (the prompt) enables prefix-cache hits and registration;
    without it only ``initial_tokens`` slots are reserved. ``cache_salt``
    isolates tenants: blocks hashed under one salt never match another's.
    ``max_sequence_length`` feeds ``estimated_memory_bytes``; it does not
    reserve anything.
    """

    request_id: str
    initial_tokens: int | None = None
    token_ids: tuple[int, ...] | None = None
    max_sequence_length: int | None = None
    priority: int = 0
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.token_ids is not None and not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        initial = len(self.token_ids or ()) if self.initial_tokens is None else self.initial_tokens
        object.__setattr__(self, "initial_tokens", initial)
        _require(initial >= 0, f"initial_tokens must be >= 0, got {initial}")
        if self.token_ids is not None:
            _require(
                len(self.token_ids) == initial,
                f"initial_tokens={initial} but {len(self.token_ids)} token ids given",
            )
        if self.max_sequence_length is not None:
            _require(
                self.max_sequence_length >= initial,
                "max_sequence_length must be >= initial_tokens",
            )

    def num_blocks(self, block_size: int) -> int:
        # ``or 0`` only narrows the type: ``__post_init__`` replaced the ``None`` default by a count
        return -(-(self.initial_tokens or 0) // block_size)

    def estimated_memory_bytes(self, config: CacheConfig) -> int:
        """Device bytes the sequence needs at its maximum length, in whole blocks."""
        tokens = self.max_sequence_length or self.initial_tokens or 0
        return -(-tokens // config.block_size) * config.bytes_per_block
