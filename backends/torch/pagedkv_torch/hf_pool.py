"""How a model's layers live in the Hugging Face adapter's pool: their K/V shapes, the pool's, reads and writes.

Most models give every decoder layer the same ``(num_key_value_heads,
head_dim)``. Heterogeneous configs (transformers' ``per_layer_config``) do
not: Gemma 4's full-attention layers have ``global_head_dim`` (and, with
``attention_k_eq_v``, ``num_global_key_value_heads``) while its sliding
layers have ``head_dim``, and reading ``config.head_dim`` on such a config
raises transformers' ``RuntimeError``. So shapes are read per layer here.

One pool for every layer. The manager keeps one block table per sequence for
all layers (a hybrid manager one per cache group, over the same blocks; that
is what makes prefix sharing, forks and ``crop`` one operation), and the
torch storage keeps one ``[storage layers, blocks, block_size, kv_heads,
head_dim]`` tensor (a hybrid storage has one layer per slot of a cache group:
model layer ``L`` lives at its group's storage layer, in its group's blocks). Rather than one manager per head dim, whose
block tables would have to move in lockstep, a layer whose shape differs
from the pool's is *packed*: each token's ``heads x head_dim`` values are
flattened and zero-padded to the pool's ``kv_heads x head_dim`` width, and
unpacked on the way out — the same floats, so attention sees exactly what
``DynamicCache`` holds. :func:`pool_shape` picks the smallest layer head dim
and the fewest heads as wide as the widest layer: a homogeneous model gets
its own shape (nothing packed); a heterogeneous one pays the padding of its
narrower layers (a quantized pool's per-head scales then cover chunks of a
token's values, not the model's heads). :class:`LayerPools` does one step's
writes and gathers for :class:`~pagedkv_torch.hf_cache.PagedCache`, in each
layer's own shape.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedkv_core.config import CacheConfig, PrefixCacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.layers import LayerGroup

from .convert import TORCH_DTYPES, dtype_name, take
from .hf_layout import StepPlan
from .storage import TorchStorage

__all__ = ["KvShape", "LayerPools", "cache_config", "check_fits", "layer_kv_shapes", "pack", "pool_shape",
           "refuse_shared_kv", "unpack"]

KvShape = tuple[int, int]  # (kv heads, head dim)


def layer_kv_shapes(config: Any) -> list[KvShape]:
    """``(kv_heads, head_dim)`` of every decoder layer, from ``per_layer_config`` where the release has it.

    Raises :class:`UnsupportedOperation` for layers that reuse another layer's
    K/V (Gemma 4's ``num_kv_shared_layers``): they store nothing of their own.
    """
    text = config.get_text_config(decoder=True)
    refuse_shared_kv(text)
    layers = getattr(text, "per_layer_config", None)
    if layers is None:  # 5.x releases before heterogeneous configs: one shape for all
        layers = [text] * text.num_hidden_layers
    shapes = []
    for layer in layers:
        heads = layer.num_attention_heads
        kv_heads = getattr(layer, "num_key_value_heads", None) or heads
        head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // heads
        shapes.append((int(kv_heads), int(head_dim)))
    return shapes


def refuse_shared_kv(text: Any) -> None:
    """Raise :class:`UnsupportedOperation` for a (text) config whose layers reuse other layers' K/V."""
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    if shared:
        raise UnsupportedOperation(
            f"this model's last {shared} layers reuse other layers' K/V (num_kv_shared_layers={shared}), which "
            "PagedCache does not store; use DynamicCache for it (a config with num_kv_shared_layers=0 works)")


def pool_shape(shapes: list[KvShape]) -> KvShape:
    """The pool's ``(kv_heads, head_dim)``: the smallest head dim, and enough heads for the widest layer."""
    head_dim = min(d for _, d in shapes)
    width = max(h * d for h, d in shapes)
    return -(-width // head_dim), head_dim


def check_fits(shapes: list[KvShape], pool: KvShape) -> None:
    """Raise :class:`ShapeMismatch` if a layer's token holds more values than a pool slot."""
    too_wide = [i for i, (h, d) in enumerate(shapes) if h * d > pool[0] * pool[1]]
    if too_wide:
        raise ShapeMismatch(f"layers {too_wide} have K/V {shapes[too_wide[0]]} (kv heads, head dim), "
                            f"more than the pool's {pool} holds per token")


def cache_config(config: Any, *, num_blocks: int, block_size: int, dtype: str | torch.dtype | None,
                 max_seq_len: int | None, prefix_cache: PrefixCacheConfig | None,
                 layer_groups: tuple[LayerGroup, ...] | None = None) -> CacheConfig:
    """The :class:`CacheConfig` of a pool for a model of ``config`` (see :meth:`PagedCache.from_model_config`).

    With ``layer_groups`` it is a hybrid config: build the storage from its ``storage_config()``.
    """
    text = config.get_text_config(decoder=True)
    kv_heads, head_dim = pool_shape(layer_kv_shapes(config))
    dtype = getattr(text, "dtype", None) if dtype is None else dtype
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else (dtype or "float32")
    if name not in TORCH_DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    return CacheConfig(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                       num_blocks=num_blocks, block_size=block_size, dtype=name, max_seq_len=max_seq_len,
                       prefix_cache=PrefixCacheConfig() if prefix_cache is None else prefix_cache,
                       layer_groups=layer_groups)


def pack(x: torch.Tensor, pool: KvShape) -> torch.Tensor:
    """``[n, heads, head_dim]`` → ``[n, *pool]``: each token's values flattened, zero-padded to the pool's width."""
    flat = x.reshape(x.shape[0], -1)
    pad = pool[0] * pool[1] - flat.shape[1]
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(x.shape[0], *pool)


def unpack(x: torch.Tensor, shape: KvShape) -> torch.Tensor:
    """``[..., pool_heads, pool_head_dim]`` → ``[..., *shape]``: the inverse of :func:`pack`."""
    lead = x.shape[:-2]
    return x.reshape(*lead, -1)[..., :shape[0] * shape[1]].reshape(*lead, *shape)


class LayerPools:
    """One cache's reads and writes of a :class:`TorchStorage`, each layer in its own ``(kv_heads, head_dim)``.

    ``shapes`` (one per model layer, by default the pool's) must fit the
    pool's width; a layer of another shape is packed (:func:`pack`).
    ``storage_layers[L]`` is where model layer ``L`` lives in the storage (its
    slot in its cache group; by default ``L``).
    """

    def __init__(self, storage: TorchStorage, shapes: list[KvShape] | None = None,
                 storage_layers: list[int] | None = None) -> None:
        c = storage.config
        self.storage = storage
        self.pool: KvShape = (c.num_kv_heads, c.head_dim)
        self.storage_layers = list(range(c.num_layers)) if storage_layers is None else list(storage_layers)
        self.shapes = [self.pool] * len(self.storage_layers) if shapes is None else list(shapes)
        if len(self.storage_layers) != len(self.shapes) or not all(0 <= x < c.num_layers for x in self.storage_layers):
            raise ShapeMismatch(f"{len(self.shapes)} layers cannot live in storage layers {self.storage_layers} "
                                f"of a storage with {c.num_layers}")
        check_fits(self.shapes, self.pool)
        # flat [slots, kv_heads, head_dim] views of every storage layer's pools (int8 / float8 ones too)
        self._flat = [(storage.k[i].view(-1, *self.pool), storage.v[i].view(-1, *self.pool))
                      for i in range(c.num_layers)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Store the step's ``[batch, kv_heads, new, head_dim]`` K/V where ``plan`` says (shared tokens are not)."""
        shape = self.shapes[layer]
        flat_k = k.transpose(1, 2).reshape(-1, *shape)
        flat_v = v.transpose(1, 2).reshape(-1, *shape)
        if shape != self.pool:
            flat_k, flat_v = pack(flat_k, self.pool), pack(flat_v, self.pool)
        if plan.write_rows is not None:
            flat_k, flat_v = flat_k.index_select(0, plan.write_rows), flat_v.index_select(0, plan.write_rows)
        if plan.write_slots.size:
            self.storage.write(self.storage_layers[layer], plan.write_slots, flat_k, flat_v)

    def gather(self, layer: int, plan: StepPlan, kv_start: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[batch, kv_heads, end - kv_start, head_dim]`` of padded positions ``kv_start..end``, hidden ones zeroed.

        ``kv_start >= plan.lo``. One index over the slots for the whole batch;
        a quantized pool is dequantized slot by slot with its block's scales
        (the arithmetic of :func:`~pagedkv_torch.quant.dequantize_blocks`).
        """
        offset = kv_start - plan.lo
        if offset < 0:
            raise InvalidArgument(f"layer {layer} reads from position {kv_start}, before the step's plan ({plan.lo})")
        rows, length = plan.gather_slots.shape[0], plan.end - kv_start
        index = plan.gather_slots[:, offset:].reshape(-1)
        slot = self.storage_layers[layer]
        pool_k, pool_v = self._flat[slot]
        keys, values = take(pool_k, 0, index), take(pool_v, 0, index)
        scales = self.storage.scales(slot)
        if scales is not None:
            blocks = torch.div(index, self.storage.config.block_size, rounding_mode="floor")
            keys = keys.float() * scales[0].index_select(0, blocks)[..., None]
            values = values.float() * scales[1].index_select(0, blocks)[..., None]
        keys, values = keys.view(rows, length, *self.pool), values.view(rows, length, *self.pool)
        if self.shapes[layer] != self.pool:
            keys, values = unpack(keys, self.shapes[layer]), unpack(values, self.shapes[layer])
        if plan.pad_mask is not None:
            hidden = plan.pad_mask[:, offset:, None, None]
            keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
        return keys.transpose(1, 2).to(dtype), values.transpose(1, 2).to(dtype)
