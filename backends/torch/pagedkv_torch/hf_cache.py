"""A Hugging Face transformers ``Cache`` whose keys and values live in pagedkv's paged pools.

``PagedCache`` drops into ``model.generate(..., past_key_values=cache)`` or a
hand-written forward loop (transformers 5, see :mod:`.hf_compat`). Each batch
row is one sequence of the manager (:mod:`.hf_batch`) over a
:class:`~pagedkv_torch.storage.TorchStorage`; the model's attention modules
call ``update(k, v, layer_idx)`` and get back the whole K/V to attend over.
A model with sliding-window or chunked layers runs on a
:class:`~pagedkv_core.HybridCacheManager` built from its layer groups, read
from the model config as ``DynamicCache(config=...)`` reads them; a model of
full-attention layers only on a :class:`~pagedkv_core.PagedKvCacheManager`
(:mod:`.hf_rows` says why both).

How a step works. The first layer to see a step's new tokens reserves their
slots for every row (``append_slots`` for one token, ``extend_batch`` for
more), and the step's index tensors are planned once per cache group
(:mod:`.hf_layout`). Every layer then makes one ``storage.write`` for the
whole batch, into its group's blocks at its storage layer, and one gather
that returns ``[batch, kv_heads, length, head_dim]`` — the same sizes
``DynamicCache`` returns, so the masks transformers builds from
``get_mask_sizes`` line up. Sliding-window and chunked layers return the last
``window - 1 + new`` positions (a chunk's size is the window), as
``DynamicSlidingWindowLayer`` does. When the model attends with the
``"pagedkv"`` implementation (:mod:`.hf_attention`), ``update`` skips the
gather and returns the new K/V only: the attention reads the pool itself.

Released blocks. In a hybrid cache, a sliding or chunked group releases the
blocks no future query of a row can read before each step reserves new
slots (their table entries point at the manager's null block). Its plan
starts at the window's first position, so its layers never gather what was
released; a released position inside the returned range (the end of a
chunked layer's previous chunk, a shared prefix beyond a row's window) comes
back as zeros, which the layer's mask hides, exactly like padding. ``crop``
rolls back as far as every row still holds what the remaining positions'
queries read — always the last step's positions, which is what speculative
decoding crops — and raises :class:`CropPastWindow` (a ``RuntimeError``, as
transformers' sliding layer raises past its window) before changing
anything otherwise. ``from_model_config(..., hybrid=False)`` keeps every
token of every layer instead.

Padding. Rows keep transformers' padded coordinates (what ``get_seq_length``
reports and masks index), but the leading padding of each row, known from
``begin``'s ``attention_mask``, is not stored: it would take blocks and would
break prefix sharing between prompts of different lengths. The gather puts
zeros there, which the attention mask hides, so every attended position sees
the same values as with ``DynamicCache``. Padding after a row's first token
(right padding, holes) is stored like any token and masked as usual.

Prefix sharing. ``begin(input_ids, attention_mask)`` admits each row with its
token ids (from its first attended token), one after the other, so a row that
starts like an earlier row of the batch — or like any prompt still in the
manager's prefix cache — gets those full blocks instead of new ones. The
positions that every row already has (padding or shared blocks; the shortest
such prefix over the rows) count as cached: ``get_seq_length()`` reports
them, so ``generate`` feeds only the rest through the model. Shared tokens of
a row beyond that common prefix are still computed (one forward pass serves
the whole batch) but not written: the shared blocks are read instead (a
hybrid hit leaves a sliding group only the blocks its window reaches). All
this holds only if positions count from each row's first attended token, as
in ``generate`` (``position_ids = attention_mask.cumsum(-1) - 1``); the first
layer of the prefill compares recomputed keys of shared tokens with the
shared ones and raises if they differ (a manual loop with padded positions).
Without ``begin`` the first ``update`` admits the rows itself, without token
ids: everything, padding included, is stored and nothing is shared.

Beams and multiple return sequences fork rows (blocks shared by reference,
the partly filled last one copied on the first write); ``crop`` trims, and a
step of several positions may follow (speculative decoding's verify steps;
the first one, right after ``begin``, brings the prompt and the drafts: when
a hybrid manager would release blocks that step still computes, the rows are
admitted anew for all its positions, without prefix sharing).
Generated tokens are not registered in the prefix cache (``update`` does not
see token ids). One forward at a time; not thread-safe; no gradients flow
through cached K/V (inference only).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from pagedkv_core.config import PrefixCacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.manager.facade import PagedKvCacheManager
from pagedkv_core.manager.hybrid import HybridCacheManager

from .hf_attention import defer, paged_attention_active
from .hf_batch import RowBatch
from .hf_compat import load_cache_utils
from .hf_layers import HfCacheStats, PagedLayer, layer_groups, layer_specs, layer_windows
from .hf_layout import StepPlan, host_2d, plan_step, shared_keys_differ
from .hf_pool import LayerPools, cache_config, layer_kv_shapes
from .hf_rows import CropPastWindow, bind, block_owners, layer_windows_of, row_blocks
from .storage import TorchStorage

__all__ = ["PagedCache", "PagedLayer", "HfCacheStats", "CropPastWindow", "layer_windows"]

_cache_utils = load_cache_utils()
_CACHE_IDS = itertools.count()


class PagedCache(_cache_utils.Cache):
    """transformers ``Cache`` over a pagedkv manager on the torch backend (see the module docstring).

    ``manager``: a :class:`HybridCacheManager` (one table per cache group;
    sliding and chunked layers release their old blocks) or a
    :class:`PagedKvCacheManager` (one table for every layer; every token
    stays stored). ``config`` (the model's config) gives the layer kinds,
    windows and each layer's K/V shape (packed into the pool where it
    differs, see :mod:`.hf_pool`); a hybrid manager's layer groups must match
    it. Without it the layer kinds come from a hybrid manager's layout, or
    are all full attention, in the pool's shape. Build both at once with
    :meth:`from_model_config`.
    """

    def __init__(self, manager: PagedKvCacheManager | HybridCacheManager, config: Any = None) -> None:
        rows = bind(manager)
        storage = manager.storage
        if not isinstance(storage, TorchStorage):
            raise UnsupportedOperation(f"PagedCache needs a manager over the torch backend's storage, "
                                       f"got {type(storage).__name__}")
        layout = rows.layout
        specs = None if config is None else layer_specs(config)
        windows = layer_windows_of(layout, specs, rows.drops_blocks)
        super().__init__(layers=[PagedLayer(self, i, w) for i, w in enumerate(windows)])
        self.manager = manager
        self.storage = storage
        self._rows = rows
        where = [layout.locate(layer) for layer in range(layout.num_layers)]
        self._group_of = [group.index for group, _ in where]
        # the "pagedkv" attention implementation (.hf_attention): read from the model's config at every update
        self._text_config = None if config is None else config.get_text_config(decoder=True)
        self._chunked = ([kind == "chunked_local" for kind, _ in specs] if specs is not None
                         else [group.kind == "chunked_local" for group, _ in where])
        self._pools = LayerPools(storage, None if config is None else layer_kv_shapes(config),
                                 [slot for _, slot in where])
        self._batch = RowBatch(rows, f"hf{next(_CACHE_IDS)}")
        self._totals = [0, 0, 0]  # prompt tokens, prefix hits, padding skipped
        self._clear()

    @classmethod
    def from_model_config(cls, config: Any, *, num_blocks: int, block_size: int = 16, device: str = "cpu",
                          dtype: str | torch.dtype | None = None, max_seq_len: int | None = None,
                          prefix_cache: PrefixCacheConfig | None = None, hybrid: bool | None = None,
                          **manager_options: Any) -> PagedCache:
        """A cache with its own pools (``num_blocks`` blocks of ``block_size`` tokens) for a model of ``config``.

        ``dtype`` (a pagedkv name such as ``"bfloat16"``, ``"int8"``, or a
        torch dtype) defaults to the model's; ``prefix_cache`` defaults to
        ``PrefixCacheConfig()`` (``PrefixCacheConfig(enabled=False)`` turns
        sharing off); ``manager_options`` go to the manager. Layers of different
        K/V shapes (Gemma 4's ``global_head_dim``) share one pool, packed.
        ``hybrid`` (default: whether the model has sliding or chunked layers)
        picks a :class:`HybridCacheManager` over the model's layer groups, whose
        sliding and chunked layers free out-of-window blocks; ``False`` keeps one
        :class:`PagedKvCacheManager` table for every layer (every token stored,
        ``crop`` unrestricted, swapping and defragmentation available). A hybrid
        block holds one cache group's layers (``manager.layout.slots``), not all:
        the same ``num_blocks`` is a smaller pool (``manager.config.device_bytes``).
        """
        specs = layer_specs(config)
        if hybrid is None:
            hybrid = any(kind != "full" for kind, _ in specs)
        config_ = cache_config(config, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                               max_seq_len=max_seq_len, prefix_cache=prefix_cache,
                               layer_groups=layer_groups(specs) if hybrid else None)
        storage = TorchStorage(config_.storage_config(), device)
        if hybrid:
            return cls(HybridCacheManager(storage, config_, **manager_options), config)
        return cls(PagedKvCacheManager(storage, **manager_options), config)

    # -- rows -------------------------------------------------------------------------

    def _clear(self) -> None:
        self._batch.clear()
        self._length = 0  # padded positions reserved in every row
        self._layer_lens = [0] * len(self.layers)  # padded positions written, per layer
        self._span: tuple[int, int] | None = None  # the step under way
        self._plans: list[StepPlan | None] = [None] * len(self._rows.layout.cache_groups)  # the step's, per group
        self._fresh = False  # admitted by begin(), nothing written yet: rows may still be repeated
        self._verify = False  # compare shared keys with fresh ones at the next update

    def begin(self, input_ids: Any, attention_mask: Any = None, *, cache_salt: str | None = None,
              skip_cached: bool = True) -> list[int]:
        """Admit a batch of prompts (``[batch, length]``, left padded); returns each row's shared tokens.

        Releases the rows held before. Rows that start like an earlier row or a
        cached prefix share its full blocks (the manager's prefix cache). A row
        whose mask has zeros after its first attended token is stored as is,
        without prefix sharing. The forward pass that follows brings the
        positions from ``get_seq_length()`` on (``generate`` slices its input
        itself, and may repeat each row for beams or return sequences, which
        forks them; a manual loop passes ``input_ids[:, cache.get_seq_length():]``).
        ``skip_cached=False`` keeps ``get_seq_length()`` at 0: every position is
        computed again (shared blocks stay shared, unwritten), as transformers'
        assisted and prompt-lookup decoding need, since they feed the whole prompt.
        """
        ids = host_2d(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else host_2d(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ShapeMismatch(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        real = mask != 0
        if not real.any(axis=1).all():
            raise InvalidArgument(f"rows {np.flatnonzero(~real.any(axis=1)).tolist()} attend to no token")
        self.release()
        length = ids.shape[1]
        lead = real.argmax(axis=1).astype(np.int64)
        batch = self._batch
        batch.admit_prompts(ids, real, lead, cache_salt)
        # positions every row already has (padding or shared blocks) need not go through the model again
        done = int((lead + batch.skip).min()) if skip_cached else 0
        self._length, self._span, self._layer_lens = length, (done, length), [done] * len(self.layers)
        self._fresh = True
        self._verify = bool(batch.skip.any())
        self._totals[0] += int((length - lead).sum())
        self._totals[1] += int(batch.skip.sum())
        self._totals[2] += int(lead.sum())
        return batch.skip.tolist()

    def release(self) -> None:
        """Free every row (their full blocks stay in the prefix cache); the cache is empty afterwards.

        If a prefill did not complete, blocks may be registered whose K/V were
        never written: then their prefix hashes are forgotten too (a uniform
        manager forgets every cached free block, as it has no finer call).
        """
        self._batch.release()
        self._clear()

    def reset(self) -> None:
        """transformers' reset: release the rows, keep the object for the next batch."""
        self.release()

    # -- the step -----------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``[batch, kv_heads, new, head_dim]`` K/V of ``layer_idx``; return all it attends to."""
        if key_states.dim() != 4 or tuple(value_states.shape) != tuple(key_states.shape):
            raise ShapeMismatch(f"update takes k and v of one shape [batch, kv_heads, new, head_dim], "
                                f"got {tuple(key_states.shape)} and {tuple(value_states.shape)}")
        batch, heads, new, head_dim = key_states.shape
        if not 0 <= layer_idx < len(self.layers):
            raise InvalidArgument(f"layer {layer_idx} out of range: the cache has {len(self.layers)} layers")
        if (heads, head_dim) != self._pools.shapes[layer_idx]:
            held = self._pools.shapes[layer_idx]
            raise ShapeMismatch(f"layer {layer_idx} holds {held[0]} KV heads of {held[1]}, got {heads} of {head_dim}")
        if not self._batch.rids:  # first update without begin(): every position stored, nothing shared
            self._batch.admit_blank(batch, new)
            self._length, self._span = new, (0, new)
        elif batch != len(self._batch):
            self._expand(batch)
        start = self._layer_lens[layer_idx]
        end = start + new
        if (start, end) != self._span:
            self._new_step(layer_idx, start, end)
        plan = self._plans[self._group_of[layer_idx]]
        if plan is None or plan.span != (start, end):
            plan = self._make_plans(start, end)[self._group_of[layer_idx]]
        self._pools.write(layer_idx, key_states, value_states, plan)
        self._fresh = False
        kv_start = self.layers[layer_idx].kv_start(start)
        if self._verify or not paged_attention_active(self._text_config):
            keys, values = self._pools.gather(layer_idx, plan, kv_start, key_states.dtype)
        else:  # the attention reads the pool itself (.hf_attention)
            keys, values = key_states, value_states
            defer(self, layer_idx, key_states)
        if self._verify:
            self._verify = False
            self._check_shared(key_states, keys, plan, kv_start)
        self._layer_lens[layer_idx] = end
        if self._batch.unwritten and all(n == self._length for n in self._layer_lens):
            self._batch.unwritten = False
        return keys, values

    def _expand(self, batch: int) -> None:
        rows = len(self._batch)
        if batch % rows or not self._fresh:
            raise ShapeMismatch(f"the cache holds {rows} rows, the forward pass has {batch}")
        self._reindex(np.repeat(np.arange(rows), batch // rows))

    def _new_step(self, layer_idx: int, start: int, end: int) -> None:
        """Reserve positions ``[start, end)`` for a step that starts where every layer stands, or refuse.

        Right after ``begin`` (nothing cached) a step may bring more than the
        prompt: speculative decoding verifies the prompt and the first drafts
        in one forward pass. Otherwise a step starts at the rows' end.
        """
        first = self._span[0] if self._fresh and self._span is not None else self._length
        if start != first or end <= self._length or any(n != start for n in self._layer_lens):
            expected = (f"{self._length - first} at {first} (the prompt from get_seq_length() on)"
                        + ("" if first else " or more (the prompt, then drafts)") if self._fresh else
                        f"new positions at {first} with every layer in step (written: {self._layer_lens})")
            raise InvalidArgument(f"layer {layer_idx} brings {end - start} positions at {start}; the cache expects "
                                  f"{expected}")
        if self._fresh and first and end > self._length:
            raise InvalidArgument(
                f"layer {layer_idx} brings {end - start} positions at {start}, more than the {self._length - start} "
                f"the prompt has after {start} cached ones: transformers' assisted and prompt-lookup decoding feed "
                "the whole prompt at their first step; start them with begin(..., skip_cached=False)")
        new, rids = end - self._length, self._batch.rids
        if self._fresh and self._rows.would_release(rids):
            # a hybrid manager releases out-of-window blocks before it reserves slots, taking the admitted
            # tokens as computed; this step computes them: admit the rows anew (no sharing in this request)
            self._totals[1] -= int(self._batch.skip.sum())  # those hits are given up
            try:
                self._batch.readmit(end)
            except BaseException:
                self._clear()
                raise
        elif new == 1:
            self.manager.append_slots(rids)
        else:
            self.manager.extend_batch(rids, [new] * len(rids))
        self._length, self._span = end, (start, end)
        if not self._fresh:  # begin()'s shared tokens stay unwritten in the step that extends the prompt
            self._batch.skip[:] = 0

    def _make_plans(self, start: int, end: int) -> list[StepPlan]:
        """Plan the step for every cache group, each from the first position its layers read."""
        batch, bs, null = self._batch, self.storage.config.block_size, self._rows.null_block
        plans = []
        for group, meta in zip(self._rows.layout.cache_groups, self._rows.metadata(batch.rids)):
            lo = min(self.layers[layer].kv_start(start) for layer in group.layers)
            plans.append(plan_step(meta.block_tables, meta.seq_lens, batch.lead, batch.skip, start, end, bs,
                                   self.storage.torch_device, lo=lo, null_block=null if group.drops_blocks else None))
        self._plans = list(plans)
        return plans

    def _check_shared(self, fresh: torch.Tensor, keys: torch.Tensor, plan: StepPlan, kv_start: int) -> None:
        """Shared tokens must have the keys this forward computed for them, or sharing would change the output."""
        row = shared_keys_differ(fresh, keys, plan, kv_start)
        if row is not None:
            self._batch.unwritten = True
            self.release()
            raise InvalidArgument(
                f"row {row} shares cached blocks whose keys differ from the ones this forward computed: "
                "prefix sharing needs position ids that count from each row's first attended token "
                "(generate() does this; in a manual loop pass position_ids=attention_mask.cumsum(-1) - 1, "
                "clamped at 0), and one model per manager. The rows were released.")

    # -- what the "pagedkv" attention reads (.hf_attention) -----------------------------------

    def layer_step(self, layer_idx: int) -> tuple[StepPlan, int]:
        """The plan of the step under way for ``layer_idx``'s cache group, and the group's index."""
        group = self._group_of[layer_idx]
        plan = self._plans[group]
        if plan is None or plan.span != self._span:
            raise InvalidArgument(f"layer {layer_idx} has no step under way to attend over")
        return plan, group

    def gather_layer(self, layer_idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update`` returns without the "pagedkv" attention: the K/V ``layer_idx`` attends to this step."""
        plan, _ = self.layer_step(layer_idx)
        return self._pools.gather(layer_idx, plan, self.layers[layer_idx].kv_start(plan.start), dtype)

    def storage_layer(self, layer_idx: int) -> int:
        """Where ``layer_idx`` lives in the storage (its slot in its cache group)."""
        return self._pools.storage_layers[layer_idx]

    def layer_packed(self, layer_idx: int) -> bool:
        """Whether ``layer_idx``'s K/V shape differs from the pool's (packed, see :mod:`.hf_pool`)."""
        return self._pools.shapes[layer_idx] != self._pools.pool

    def layer_chunked(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` is a chunked-attention layer."""
        return self._chunked[layer_idx]

    # -- sequence-level operations ----------------------------------------------------------

    def _require_in_step(self, name: str) -> None:
        if any(n != self._length for n in self._layer_lens):
            raise InvalidArgument(f"{name} needs every layer at the same position, written: {self._layer_lens}")

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions of every row (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                             "Please use a negative integer to remove that number of tokens from the cache instead.")
        if tokens_to_remove == 0 or not self._batch.rids:
            return
        self._require_in_step("crop")
        drop = min(-tokens_to_remove, self._length)
        self._batch.trim(drop, self._length)  # all rows or none (CropPastWindow)
        kept = self._length - drop
        self._length, self._layer_lens = kept, [kept] * len(self.layers)
        self._span, self._plans = None, [None] * len(self._plans)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``j`` becomes old row ``beam_idx[j]`` (beam search); repeated rows are forked, dropped ones freed."""
        self._reindex(np.asarray(beam_idx.tolist(), np.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(np.repeat(np.arange(len(self._batch)), repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        self._reindex(np.asarray(index.tolist(), np.int64))

    def _reindex(self, indices: np.ndarray) -> None:
        rows = len(self._batch)
        if not rows:
            return
        if not self._fresh:
            self._require_in_step("reordering rows")
        if indices.ndim != 1 or ((indices < 0) | (indices >= rows)).any():
            raise InvalidArgument(f"row indices {indices.tolist()} out of range for {rows} rows")
        self._batch.reindex(indices, self._length)
        self._plans = [None] * len(self._plans)

    # -- facts ------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self._batch) if self._batch.rids else -1

    def layer_length(self, layer_idx: int) -> int:
        """Padded positions layer ``layer_idx`` has written (its layer object's ``get_seq_length``)."""
        return self._layer_lens[layer_idx]

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The manager's request id of each row."""
        return tuple(self._batch.rids)

    def block_ids(self, row: int, group: int = 0) -> list[int]:
        """Physical block ids under row ``row`` in cache group ``group``, in order.

        A hybrid manager's released entries show its ``null_block``.
        """
        return row_blocks(self._rows.metadata([self._batch.rids[row]])[group], 0)

    def stats(self) -> HfCacheStats:
        batch = self._batch
        owners = block_owners(self._rows, batch.rids)
        stored = int(np.maximum(self._length - batch.lead, 0).sum()) if batch.rids else 0
        return HfCacheStats(len(batch), self._layer_lens[0] if self._layer_lens else 0, stored, len(owners),
                            sum(1 for n in owners.values() if n > 1), *self._totals)

    def __repr__(self) -> str:
        return (f"PagedCache(rows={len(self._batch)}, seq_length={self.get_seq_length()}, "
                f"layers={len(self.layers)}, sliding={self.is_sliding})")

