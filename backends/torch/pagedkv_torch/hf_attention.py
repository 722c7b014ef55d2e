"""transformers' attention read straight from pagedkv's pool: the ``"pagedkv"`` attention implementation.

With :func:`register_attention` called and a model built with
``attn_implementation="pagedkv"`` (or switched with
``model.set_attn_implementation("pagedkv")``), a
:class:`~pagedkv_torch.hf_cache.PagedCache` stops gathering: its ``update``
writes the step's K/V into the pool and hands back the new K/V only, noting
which layer and which key tensor it deferred (:func:`defer`); the attention
function registered here, called by the layer right after, runs a
:class:`~pagedkv_torch.attention.TorchAttention` plan over the pool for that
layer. The cache reads the model config's ``_attn_implementation`` at every
``update``, so switching the model back to ``"sdpa"`` switches the gather on
again; a model of another implementation never sees deferred K/V.

A step whose new K/V are all the layer attends to (a prefill with nothing
cached, in a pool of the model's dtype) has nothing to read back: its
attention runs transformers' SDPA (or eager) on the K/V in hand with the mask
transformers built, which is ``DynamicCache``'s very call. Every other step
(decode, a prefill after cached blocks) reads the pool.

A step's plan inputs are built once per step and cache group, from the
adapter's :class:`~pagedkv_torch.hf_layout.StepPlan` (its block tables and
each row's leading padding): row ``i`` holds ``end - lead[i]`` tokens and
brings the queries of its real positions ``[max(start, lead[i]), end)``;
queries on padding get zeros (nothing reads them: their K/V are not stored,
and ``generate`` takes the last position). One kernel plan per
``(window, scale, soft-cap)`` serves every layer of the group that shares them.

Exactness. The kernel applies causality and the layer's window to each row's
real tokens, nothing else. Before it runs, the mask transformers built for the
layer (``sdpa_mask``, registered for ``"pagedkv"``; ``None`` when it would let
SDPA's ``is_causal`` do) is compared, on every real query, with the mask the
kernel implies — once per mask tensor and step. Where they differ (holes or
right padding in ``attention_mask``, a custom 4D mask), and wherever the kernel
cannot follow the layer (chunked attention, whose chunks transformers counts
in padded positions; non-causal or dropout; a layer packed into a wider pool,
see :mod:`.hf_pool`), the layer gathers its K/V as before and runs
transformers' SDPA (or, with soft-capping or sinks, the model's eager
attention) on them: the result is then exactly the gather path's. Without a
deferred update (``DynamicCache``, a gathered prefill layer that checked
shared keys) the function is plain SDPA / eager on the K/V it is given.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedkv_core.errors import UnsupportedOperation

from .attention import TorchAttention
from .convert import index_tensor

if TYPE_CHECKING:
    from .hf_cache import PagedCache
    from .hf_layout import StepPlan

__all__ = ["ATTENTION_NAME", "defer", "paged_attention_active", "paged_attention_forward", "register_attention"]

ATTENTION_NAME = "pagedkv"


def register_attention(name: str = ATTENTION_NAME) -> None:
    """Register :func:`paged_attention_forward` (and SDPA's boolean mask) under ``name`` with transformers.

    Call before ``from_pretrained`` / ``from_config(..., attn_implementation=name)``.
    Registering again replaces the entries (transformers' registries are global).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, paged_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def paged_attention_active(text_config: Any) -> bool:
    """Whether the model of this (text) config attends with the ``"pagedkv"`` implementation now."""
    return text_config is not None and getattr(text_config, "_attn_implementation", None) == ATTENTION_NAME


class _Deferred:
    """The last update a :class:`PagedCache` left ungathered: the cache, its layer, the key tensor it returned."""

    __slots__ = ("cache", "layer", "key")

    def __init__(self) -> None:
        self.cache: PagedCache | None = None
        self.layer = -1
        self.key: torch.Tensor | None = None


_DEFERRED = _Deferred()


def defer(cache: PagedCache, layer: int, key: torch.Tensor) -> None:
    """Note that ``cache.update`` of ``layer`` returned ``key`` (the new keys only): its attention reads the pool."""
    _DEFERRED.cache, _DEFERRED.layer, _DEFERRED.key = cache, layer, key


def _claim(layer: int, key: torch.Tensor) -> PagedCache | None:
    cache = _DEFERRED.cache
    if cache is None or layer != _DEFERRED.layer or key is not _DEFERRED.key:
        return None
    _DEFERRED.cache, _DEFERRED.key = None, None
    return cache


class _Step:
    """One step's plan inputs for one cache group's rows, and what was decided on them (kernel plans, masks)."""

    __slots__ = ("source", "lead", "seq_lens", "query_start_loc", "query_index", "real_queries", "plans",
                 "verdicts")

    def __init__(self, plan: StepPlan, device: torch.device) -> None:
        self.source = plan
        lead = np.asarray(plan.lead, np.int64)
        first = np.maximum(plan.start, lead)
        self.seq_lens = plan.end - lead
        qlens = plan.end - first
        self.query_start_loc = None if (qlens == 1).all() else np.concatenate(([0], np.cumsum(qlens)))
        real = np.arange(plan.start, plan.end)[None, :] >= lead[:, None]  # [batch, new]
        self.query_index = None if real.all() else index_tensor(np.flatnonzero(real.reshape(-1)), device)
        self.real_queries = torch.from_numpy(real).to(device)
        self.lead = torch.from_numpy(lead).to(device)
        self.plans: dict[tuple[Any, ...], Any] = {}
        self.verdicts: dict[tuple[Any, ...], tuple[Any, bool]] = {}

    def kernel_plan(self, cache: PagedCache, window: int | None, scale: float, soft_cap: float | None) -> Any:
        key = (window, scale, soft_cap)
        plan = self.plans.get(key)
        if plan is None:
            plan = _ATTENTION.plan(cache.storage, self.source.block_tables, self.seq_lens, self.query_start_loc,
                                   causal=True, scale=scale, sliding_window=window, soft_cap=soft_cap)
            self.plans[key] = plan
        return plan

    def mask_matches(self, mask: torch.Tensor | None, kv_start: int, window: int | None) -> bool:
        """Whether ``mask`` shows every real query exactly the keys the kernel lets it see."""
        key = (id(mask), kv_start, window)
        seen = self.verdicts.get(key)
        if seen is not None and seen[0] is mask:
            return seen[1]
        verdict = self._compare(mask, kv_start, window)
        self.verdicts[key] = (mask, verdict)  # holds the mask, so its id stays its own for the step
        return verdict

    def _compare(self, mask: torch.Tensor | None, kv_start: int, window: int | None) -> bool:
        start, end, device = self.source.start, self.source.end, self.lead.device
        pos_q = torch.arange(start, end, device=device)[:, None]
        pos_k = torch.arange(kv_start, end, device=device)[None, :]
        causal = pos_k <= pos_q  # [new, kv]
        sees = causal if window is None else causal & (pos_k > pos_q - window)
        expected = sees[None] & (pos_k[None] >= self.lead[:, None, None])  # [batch, new, kv]
        if mask is None:  # transformers leaves causality to SDPA: every returned key is real
            given = causal[None]
        elif mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
                or tuple(mask.shape[2:]) != tuple(causal.shape) or mask.shape[0] not in (1, expected.shape[0]):
            return False
        else:
            given = mask[:, 0]
        return not bool(((given != expected) & self.real_queries[:, :, None]).any())


_ATTENTION = TorchAttention()
# (cache id, group) -> (the StepPlan it was built from, step); the StepPlan's identity says whether it is current
_STEPS: dict[tuple[int, int], tuple[Any, _Step]] = {}


def _step(cache: PagedCache, layer: int) -> _Step:
    plan, group = cache.layer_step(layer)
    key = (id(cache), group)
    held = _STEPS.get(key)
    if held is not None and held[0] is plan:
        return held[1]
    step = _Step(plan, cache.storage.torch_device)
    for other in [k for k in _STEPS if k[0] != key[0]]:  # one cache at a time: keep no other's plans alive
        del _STEPS[other]
    _STEPS[key] = (plan, step)  # replaces this group's previous step
    return step


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; ``query [batch, heads, new, head_dim]`` → ``([batch, new, heads, head_dim], None)``.

    Reads the pool when ``key`` is what a :class:`PagedCache` just deferred
    for ``module.layer_idx`` and the kernel computes exactly what the layer's
    mask asks (see the module docstring); gathers and falls back otherwise.
    """
    layer: int = getattr(module, "layer_idx", -1)
    cache = _claim(layer, key)
    if cache is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = cache.layers[layer].sliding_window
    usable = (causal and not (dropout and module.training) and not cache.layer_packed(layer)
              and not cache.layer_chunked(layer) and query.shape[0] == key.shape[0])
    step = _step(cache, layer) if usable else None
    kv_start = cache.layers[layer].kv_start(step.source.start) if step is not None else 0
    if step is not None and _holds_whole_context(cache, step, kv_start, key):
        # a prefill with nothing cached: the new K/V, in hand, are all the layer attends to (DynamicCache's call)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if step is None or not step.mask_matches(attention_mask, kv_start, window):
        keys, values = cache.gather_layer(layer, key.dtype)
        return _fallback(module, query, keys, values, attention_mask, dropout, scaling, is_causal, kwargs)
    batch, heads, new, head_dim = query.shape
    scale = float(head_dim ** -0.5 if scaling is None else scaling)
    soft_cap = kwargs.get("softcap")
    plan = step.kernel_plan(cache, window, scale, None if soft_cap is None else float(soft_cap))
    flat = query.transpose(1, 2).reshape(batch * new, heads, head_dim)
    if step.query_index is not None:
        flat = flat.index_select(0, step.query_index)
    pool_dtype = cache.storage.dtype
    q = flat if cache.storage.quantized or flat.dtype == pool_dtype else flat.to(pool_dtype)
    out = plan.run(q.contiguous(), cache.storage_layer(layer), sinks=kwargs.get("s_aux")).to(query.dtype)
    if step.query_index is not None:
        out = torch.zeros(batch * new, heads, head_dim, dtype=out.dtype, device=out.device).index_copy_(
            0, step.query_index, out)
    return out.view(batch, new, heads, head_dim), None


def _holds_whole_context(cache: PagedCache, step: _Step, kv_start: int, key: torch.Tensor) -> bool:
    """Whether ``key`` (the step's new keys) covers every position the layer reads, in the pool's values.

    Then reading them back from the pool would only cost: the prefill's
    attention runs on them as with ``DynamicCache`` (whose first update returns
    them too), with the mask transformers built for that length. A quantized
    pool, or one of another dtype, holds other values than the new keys: its
    layers read the pool, as the gather path would.
    """
    storage = cache.storage
    return (kv_start == step.source.start and key.shape[-2] == step.source.end - kv_start
            and not storage.quantized and storage.dtype == key.dtype)


def _fallback(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, is_causal: bool | None,
              kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """SDPA on whole K/V, or the model's eager attention where SDPA cannot follow (soft-capping, sinks)."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedOperation(f"{type(module).__name__} needs soft-capping or sinks, which SDPA lacks, and its "
                                   "module has no eager_attention_forward to fall back on")
    if attention_mask is None and query.shape[-2] > 1:  # SDPA's is_causal, which eager does not have
        q_len, kv_len = query.shape[-2], key.shape[-2]
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :]
                          <= torch.arange(q_len, device=query.device)[:, None] + kv_len - q_len)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds its mask to the scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    result: tuple[torch.Tensor, Any] = eager(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    return result
