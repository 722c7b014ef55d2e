"""How a model's layers live in the Hugging Face adapter's pool: their K/V shapes, the pool's, reads and writes.

Most models give every decoder layer the same ``(num_key_value_heads,
head_dim)``. Heterogeneous configs (transformers' ``per_layer_config``) do
not: Gemma 4's full-attention layers have ``global_head_dim`` (and, with
``attention_k_eq_v``, ``num_global_key_value_heads``) while its sliding
layers have ``head_dim``, and reading ``config.head_dim`` on such a config
raises transformers' ``RuntimeError``. So shapes are read per layer here.

One pool for every layer. The manager keeps one block table per sequence for
all layers (that is what makes prefix sharing, forks and ``crop`` one
operation), and the torch storage keeps one ``[layers, blocks, block_size,
kv_heads, head_dim]`` tensor. Rather than one manager per head dim, whose
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

import numpy as np
import torch

from pagedkv_core.config import CacheConfig, PrefixCacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation

from .convert import TORCH_DTYPES, dtype_name, take
from .hf_layout import StepPlan
from .storage import TorchStorage

__all__ = ["KvShape", "LayerPools", "cache_config", "check_fits", "layer_kv_shapes", "pack", "pool_shape", "unpack"]

KvShape = tuple[int, int]  # (kv heads, head dim)


def layer_kv_shapes(config: Any) -> list[KvShape]:
    """``(kv_heads, head_dim)`` of every decoder layer, from ``per_layer_config`` where the release has it.

    Raises :class:`UnsupportedOperation` for layers that reuse another layer's
    K/V (Gemma 4's ``num_kv_shared_layers``): they store nothing of their own.
    """
    text = config.get_text_config(decoder=True)
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    if shared:
        raise UnsupportedOperation(
            f"this model's last {shared} layers reuse other layers' K/V (num_kv_shared_layers={shared}), which "
            "PagedCache does not store; use DynamicCache for it (a config with num_kv_shared_layers=0 works)")
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
                 max_seq_len: int | None, prefix_cache: PrefixCacheConfig | None) -> CacheConfig:
    """The :class:`CacheConfig` of a pool for a model of ``config`` (see :meth:`PagedCache.from_model_config`)."""
    text = config.get_text_config(decoder=True)
    kv_heads, head_dim = pool_shape(layer_kv_shapes(config))
    dtype = getattr(text, "dtype", None) if dtype is None else dtype
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else (dtype or "float32")
    if name not in TORCH_DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    return CacheConfig(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                       num_blocks=num_blocks, block_size=block_size, dtype=name, max_seq_len=max_seq_len,
                       prefix_cache=PrefixCacheConfig() if prefix_cache is None else prefix_cache)


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

    ``shapes`` (one per layer, by default the pool's) must fit the pool's
    width; a layer of another shape is packed (:func:`pack`).
    """

    def __init__(self, storage: TorchStorage, shapes: list[KvShape] | None = None) -> None:
        c = storage.config
        self.storage = storage
        self.pool: KvShape = (c.num_kv_heads, c.head_dim)
        self.shapes = [self.pool] * c.num_layers if shapes is None else list(shapes)
        check_fits(self.shapes, self.pool)
        # flat [slots, kv_heads, head_dim] views of float pools; quantized pools go through storage.gather
        self._flat = None if storage.quantized else [
            (storage.k[i].view(-1, *self.pool), storage.v[i].view(-1, *self.pool)) for i in range(c.num_layers)]

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
            self.storage.write(layer, plan.write_slots, flat_k, flat_v)

    def gather(self, layer: int, plan: StepPlan, lead: np.ndarray, kv_start: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[batch, kv_heads, end - kv_start, head_dim]`` of padded positions ``kv_start..end``, padding zeroed.

        ``lead [batch]``: each row's leading padding, which is not stored.
        """
        rows, length = len(lead), plan.end - kv_start
        if self._flat is not None:
            index = plan.gather_slots[:, kv_start:].reshape(-1)
            pool_k, pool_v = self._flat[layer]
            keys = take(pool_k, 0, index).view(rows, length, *self.pool)
            values = take(pool_v, 0, index).view(rows, length, *self.pool)
        else:  # quantized pools: dequantized per row by the storage
            keys = torch.zeros((rows, plan.end, *self.pool), dtype=torch.float32, device=self.storage.torch_device)
            values = torch.zeros_like(keys)
            for row in range(rows):
                n, pad = int(plan.seq_lens[row]), int(lead[row])
                keys[row, pad:pad + n], values[row, pad:pad + n] = self.storage.gather(
                    layer, plan.block_tables[row], n)
            keys, values = keys[:, kv_start:], values[:, kv_start:]
        if self.shapes[layer] != self.pool:
            keys, values = unpack(keys, self.shapes[layer]), unpack(values, self.shapes[layer])
        if plan.pad_mask is not None:
            hidden = plan.pad_mask[:, kv_start:, None, None]
            keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
        return keys.transpose(1, 2).to(dtype), values.transpose(1, 2).to(dtype)
