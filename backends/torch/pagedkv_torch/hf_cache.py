"""A Hugging Face transformers ``Cache`` whose keys and values live in pagedkv's paged pools.

``PagedCache`` drops into ``model.generate(..., past_key_values=cache)`` or a
hand-written forward loop (transformers 5, see :mod:`.hf_compat`). Each batch
row is one sequence of a :class:`~pagedkv_core.PagedKvCacheManager` over a
:class:`~pagedkv_torch.storage.TorchStorage`; the model's attention modules
call ``update(k, v, layer_idx)`` and get back the whole K/V to attend over.

How a step works. The first layer to see a step's new tokens reserves their
slots for every row (``append_slots`` for one token, ``extend_batch`` for
more), and the step's index tensors are planned once (:mod:`.hf_layout`).
Every layer then makes one ``storage.write`` for the whole batch and one
gather that returns ``[batch, kv_heads, length, head_dim]`` — the same sizes
``DynamicCache`` returns, so the masks transformers builds from
``get_mask_sizes`` line up. Sliding-window (and chunked) layers return the
last ``window - 1 + new`` positions, as ``DynamicSlidingWindowLayer`` does;
all tokens stay stored, so ``crop`` can always roll back.

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
the whole batch) but not written: the shared blocks are read instead. All
this holds only if positions count from each row's first attended token, as
in ``generate`` (``position_ids = attention_mask.cumsum(-1) - 1``); the first
layer of the prefill compares recomputed keys of shared tokens with the
shared ones and raises if they differ (a manual loop with padded positions).
Without ``begin`` the first ``update`` admits the rows itself, without token
ids: everything, padding included, is stored and nothing is shared.

Beams and multiple return sequences fork rows (blocks shared by reference,
the partly filled last one copied on the first write); ``crop`` trims, and a
step of several positions may follow (speculative decoding's verify steps;
the first one, right after ``begin``, brings the prompt and the drafts).
Generated tokens are not registered in the prefix cache (``update`` does not
see token ids). One forward at a time; not thread-safe; no gradients flow
through cached K/V (inference only).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from pagedkv_core.config import AllocationRequest, PrefixCacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.manager.facade import PagedKvCacheManager

from .hf_compat import load_cache_utils
from .hf_layers import HfCacheStats, PagedLayer, layer_windows
from .hf_layout import StepPlan, host_2d, plan_step
from .hf_pool import LayerPools, cache_config, layer_kv_shapes
from .storage import TorchStorage

__all__ = ["PagedCache", "PagedLayer", "HfCacheStats", "layer_windows"]

_cache_utils = load_cache_utils()
_CACHE_IDS = itertools.count()


class PagedCache(_cache_utils.Cache):
    """transformers ``Cache`` over a :class:`PagedKvCacheManager` on the torch backend (see the module docstring).

    ``config`` (the model's config) gives the layer kinds, sliding windows and
    each layer's K/V shape (packed into the pool where it differs, see
    :mod:`.hf_pool`); without it every layer is full attention with the
    pool's shape. Build both at once with :meth:`from_model_config`.
    """

    def __init__(self, manager: PagedKvCacheManager, config: Any = None) -> None:
        storage = manager.storage
        if not isinstance(storage, TorchStorage):
            raise UnsupportedOperation(f"PagedCache needs a manager over the torch backend's storage, "
                                       f"got {type(storage).__name__}")
        c = storage.config
        shapes = None if config is None else layer_kv_shapes(config)
        windows = [None] * c.num_layers if config is None else layer_windows(config)
        if len(windows) != c.num_layers:
            raise ShapeMismatch(f"the model has {len(windows)} decoder layers, the storage {c.num_layers}")
        super().__init__(layers=[PagedLayer(self, i, w) for i, w in enumerate(windows)])
        self.manager = manager
        self.storage = storage
        self._pools = LayerPools(storage, shapes)
        self._tag = f"hf{next(_CACHE_IDS)}"
        self._ids = itertools.count()
        self._totals = [0, 0, 0]  # prompt tokens, prefix hits, padding skipped
        self._clear()

    @classmethod
    def from_model_config(cls, config: Any, *, num_blocks: int, block_size: int = 16, device: str = "cpu",
                          dtype: str | torch.dtype | None = None, max_seq_len: int | None = None,
                          prefix_cache: PrefixCacheConfig | None = None, **manager_options: Any) -> PagedCache:
        """A cache with its own pools (``num_blocks`` blocks of ``block_size`` tokens) for a model of ``config``.

        ``dtype`` (a pagedkv name such as ``"bfloat16"``, ``"int8"``, or a
        torch dtype) defaults to the model's; ``prefix_cache`` defaults to
        ``PrefixCacheConfig()`` (``PrefixCacheConfig(enabled=False)`` turns
        sharing off); ``manager_options`` go to the manager. Layers of different
        K/V shapes (Gemma 4's ``global_head_dim``) share one pool, packed.
        """
        config_ = cache_config(config, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                               max_seq_len=max_seq_len, prefix_cache=prefix_cache)
        return cls(PagedKvCacheManager(TorchStorage(config_, device), **manager_options), config)

    # -- rows -------------------------------------------------------------------------

    def _clear(self) -> None:
        self._rids: list[str] = []
        self._lead = np.zeros(0, np.int64)  # leading padding per row, not stored
        self._skip = np.zeros(0, np.int64)  # first tokens per row that are shared, not to be written
        self._length = 0  # padded positions reserved in every row
        self._layer_lens = [0] * len(self.layers)  # padded positions written, per layer
        self._span: tuple[int, int] | None = None  # the step under way
        self._plan: StepPlan | None = None
        self._unwritten = False  # blocks registered in the prefix cache before their K/V were written
        self._fresh = False  # admitted by begin(), nothing written yet: rows may still be repeated
        self._verify = False  # compare shared keys with fresh ones at the next update

    def _new_id(self) -> str:
        return f"{self._tag}-{next(self._ids)}"

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
        handles = []
        try:
            for row, pad in enumerate(lead):
                tokens = tuple(ids[row, pad:].tolist()) if real[row, pad:].all() else None
                request = AllocationRequest(self._new_id(), initial_tokens=length - int(pad), token_ids=tokens,
                                            cache_salt=cache_salt)
                handles.append(self.manager.allocate(request))
                self._rids.append(request.request_id)
        except BaseException:
            self._unwritten = True
            self.release()
            raise
        self._lead = lead
        self._skip = np.array([h.num_cached_tokens for h in handles], np.int64)
        # positions every row already has (padding or shared blocks) need not go through the model again
        done = int((lead + self._skip).min()) if skip_cached else 0
        self._length, self._span, self._layer_lens = length, (done, length), [done] * len(self.layers)
        self._unwritten = self.manager.prefix_config is not None
        self._fresh = True
        self._verify = bool(self._skip.any())
        self._totals[0] += int((length - lead).sum())
        self._totals[1] += int(self._skip.sum())
        self._totals[2] += int(lead.sum())
        return self._skip.tolist()

    def release(self) -> None:
        """Free every row (their full blocks stay in the prefix cache); the cache is empty afterwards.

        If a prefill did not complete, blocks may be registered whose K/V were
        never written: then the manager's cached free blocks are forgotten too.
        """
        for rid in self._rids:
            self.manager.deallocate(rid)
        if self._unwritten and self._rids:
            self.manager.gc(all_prefixes=True)
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
        if not self._rids:
            self._admit(batch, new)
        elif batch != len(self._rids):
            self._expand(batch)
        start = self._layer_lens[layer_idx]
        end = start + new
        if (start, end) != self._span:
            self._new_step(layer_idx, start, end)
        plan = self._plan if self._plan is not None and self._plan.span == self._span else self._make_plan()
        self._pools.write(layer_idx, key_states, value_states, plan)
        self._fresh = False
        kv_start = self.layers[layer_idx].kv_start(start)
        keys, values = self._pools.gather(layer_idx, plan, self._lead, kv_start, key_states.dtype)
        if self._verify:
            self._verify = False
            self._check_shared(key_states, keys, plan, kv_start)
        self._layer_lens[layer_idx] = end
        if self._unwritten and all(n == self._length for n in self._layer_lens):
            self._unwritten = False
        return keys, values

    def _admit(self, batch: int, new: int) -> None:
        """First update without ``begin``: one sequence per row, all ``new`` positions stored, no token ids."""
        requests = [AllocationRequest(self._new_id(), initial_tokens=new) for _ in range(batch)]
        self.manager.allocate_batch(requests)
        self._rids = [r.request_id for r in requests]
        self._lead = np.zeros(batch, np.int64)
        self._skip = np.zeros(batch, np.int64)
        self._length, self._span = new, (0, new)

    def _expand(self, batch: int) -> None:
        rows = len(self._rids)
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
        new = end - self._length
        if new == 1:
            self.manager.append_slots(self._rids)
        else:
            self.manager.extend_batch(self._rids, [new] * len(self._rids))
        self._length, self._span = end, (start, end)
        if not self._fresh:  # begin()'s shared tokens stay unwritten in the step that extends the prompt
            self._skip[:] = 0

    def _make_plan(self) -> StepPlan:
        meta = self.manager.batch_metadata(self._rids, [0] * len(self._rids))
        start, end = self._span
        self._plan = plan_step(meta.block_tables, meta.seq_lens, self._lead, self._skip, start, end,
                               self.storage.config.block_size, self.storage.torch_device)
        return self._plan

    def _check_shared(self, fresh: torch.Tensor, keys: torch.Tensor, plan: StepPlan, kv_start: int) -> None:
        """Shared tokens must have the keys this forward computed for them, or sharing would change the output."""
        for row, lo, hi in plan.shared:
            new = fresh[row, :, lo - plan.start:hi - plan.start].float()
            old = keys[row, :, lo - kv_start:hi - kv_start].float()
            if (new - old).abs().max() > 1e-2 * old.abs().max() + 1e-5:
                self._unwritten = True
                self.release()
                raise InvalidArgument(
                    f"row {row} shares cached blocks whose keys differ from the ones this forward computed: "
                    "prefix sharing needs position ids that count from each row's first attended token "
                    "(generate() does this; in a manual loop pass position_ids=attention_mask.cumsum(-1) - 1, "
                    "clamped at 0), and one model per manager. The rows were released.")

    # -- sequence-level operations ----------------------------------------------------------

    def _require_in_step(self, name: str) -> None:
        if any(n != self._length for n in self._layer_lens):
            raise InvalidArgument(f"{name} needs every layer at the same position, written: {self._layer_lens}")

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions of every row (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                             "Please use a negative integer to remove that number of tokens from the cache instead.")
        if tokens_to_remove == 0 or not self._rids:
            return
        self._require_in_step("crop")
        drop = min(-tokens_to_remove, self._length)
        kept = self._length - drop
        for rid, pad in zip(self._rids, self._lead):
            self.manager.trim(rid, min(drop, self._length - int(pad)))
        self._lead = np.minimum(self._lead, kept)
        self._length, self._layer_lens = kept, [kept] * len(self.layers)
        self._span, self._plan = None, None
        self._skip[:] = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``j`` becomes old row ``beam_idx[j]`` (beam search); repeated rows are forked, dropped ones freed."""
        self._reindex(np.asarray(beam_idx.tolist(), np.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(np.repeat(np.arange(len(self._rids)), repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        self._reindex(np.asarray(index.tolist(), np.int64))

    def _reindex(self, indices: np.ndarray) -> None:
        if not self._rids:
            return
        if not self._fresh:
            self._require_in_step("reordering rows")
        if indices.ndim != 1 or ((indices < 0) | (indices >= len(self._rids))).any():
            raise InvalidArgument(f"row indices {indices.tolist()} out of range for {len(self._rids)} rows")
        rids, used, skip = [], set(), self._skip[indices].copy()
        for j, i in enumerate(indices.tolist()):
            if i in used:  # a copy shares every block; it never writes what it shares
                rids.append(self._new_id())
                self.manager.fork(self._rids[i], rids[-1])
                skip[j] = self._length - self._lead[i]
            else:
                used.add(i)
                rids.append(self._rids[i])
        for i, rid in enumerate(self._rids):
            if i not in used:
                self.manager.deallocate(rid)
        self._rids, self._lead, self._skip, self._plan = rids, self._lead[indices], skip, None

    # -- facts ------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self._rids) if self._rids else -1

    def layer_length(self, layer_idx: int) -> int:
        """Padded positions layer ``layer_idx`` has written (its layer object's ``get_seq_length``)."""
        return self._layer_lens[layer_idx]

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The manager's request id of each row."""
        return tuple(self._rids)

    def block_ids(self, row: int) -> list[int]:
        """Physical block ids under row ``row``, in order."""
        return list(self.manager.get_handle(self._rids[row]).block_table.block_ids)

    def stats(self) -> HfCacheStats:
        tables = [self.block_ids(row) for row in range(len(self._rids))]
        counts: dict[int, int] = {}
        for table in tables:
            for block in set(table):
                counts[block] = counts.get(block, 0) + 1
        stored = int(np.maximum(self._length - self._lead, 0).sum()) if self._rids else 0
        return HfCacheStats(len(self._rids), self._layer_lens[0] if self._layer_lens else 0, stored, len(counts),
                            sum(1 for n in counts.values() if n > 1), *self._totals)

    def __repr__(self) -> str:
        return (f"PagedCache(rows={len(self._rids)}, seq_length={self.get_seq_length()}, "
                f"layers={len(self.layers)}, sliding={self.is_sliding})")

