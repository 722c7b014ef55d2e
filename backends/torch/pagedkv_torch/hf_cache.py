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
the partly filled last one copied on the first write); ``crop`` trims.
Generated tokens are not registered in the prefix cache (``update`` does not
see token ids). One forward at a time; not thread-safe; no gradients flow
through cached K/V (inference only).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from pagedkv_core.config import AllocationRequest, CacheConfig, PrefixCacheConfig
from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.manager import PagedKvCacheManager

from .convert import TORCH_DTYPES, dtype_name, take
from .hf_compat import load_cache_utils
from .hf_layers import HfCacheStats, PagedLayer, layer_windows
from .hf_layout import StepPlan, host_2d, plan_step
from .storage import TorchStorage

__all__ = ["PagedCache", "PagedLayer", "HfCacheStats", "layer_windows"]

_cache_utils = load_cache_utils()
_CACHE_IDS = itertools.count()


class PagedCache(_cache_utils.Cache):
    """transformers ``Cache`` over a :class:`PagedKvCacheManager` on the torch backend (see the module docstring).

    ``config`` (the model's config) gives the layer kinds and sliding windows;
    without it every layer is full attention. Build both at once with
    :meth:`from_model_config`.
    """

    def __init__(self, manager: PagedKvCacheManager, config: Any = None) -> None:
        storage = manager.storage
        if not isinstance(storage, TorchStorage):
            raise UnsupportedOperation(f"PagedCache needs a manager over the torch backend's storage, "
                                       f"got {type(storage).__name__}")
        c = storage.config
        windows = [None] * c.num_layers if config is None else layer_windows(config)
        if len(windows) != c.num_layers:
            raise ShapeMismatch(f"the model has {len(windows)} decoder layers, the storage {c.num_layers}")
        super().__init__(layers=[PagedLayer(self, i, w) for i, w in enumerate(windows)])
        self.manager = manager
        self.storage = storage
        self._shape = (c.num_kv_heads, c.head_dim)
        # flat [slots, kv_heads, head_dim] views of float pools; quantized pools go through storage.gather
        self._flat = None if storage.quantized else [
            (storage.k[i].view(-1, *self._shape), storage.v[i].view(-1, *self._shape)) for i in range(c.num_layers)]
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
        sharing off); ``manager_options`` go to the manager.
        """
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype = getattr(text, "dtype", None) if dtype is None else dtype
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else (dtype or "float32")
        if name not in TORCH_DTYPES:
            raise InvalidArgument(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        cache_config = CacheConfig(
            num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=num_blocks,
            block_size=block_size, dtype=name, max_seq_len=max_seq_len,
            prefix_cache=PrefixCacheConfig() if prefix_cache is None else prefix_cache)
        return cls(PagedKvCacheManager(TorchStorage(cache_config, device), **manager_options), config)

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

    def begin(self, input_ids: Any, attention_mask: Any = None, *, cache_salt: str | None = None) -> list[int]:
        """Admit a batch of prompts (``[batch, length]``, left padded); returns each row's shared tokens.

        Releases the rows held before. Rows that start like an earlier row or a
        cached prefix share its full blocks (the manager's prefix cache). A row
        whose mask has zeros after its first attended token is stored as is,
        without prefix sharing. The forward pass that follows brings the
        positions from ``get_seq_length()`` on (``generate`` slices its input
        itself, and may repeat each row for beams or return sequences, which
        forks them; a manual loop passes ``input_ids[:, cache.get_seq_length():]``).
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
        done = int((lead + self._skip).min())
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
        if (heads, head_dim) != self._shape:
            raise ShapeMismatch(f"the pools hold {self._shape[0]} KV heads of {self._shape[1]}, "
                                f"layer {layer_idx} gave {heads} of {head_dim}")
        if not self._rids:
            self._admit(batch, new)
        elif batch != len(self._rids):
            self._expand(batch)
        start = self._layer_lens[layer_idx]
        end = start + new
        if (start, end) != self._span:
            if self._fresh or start != self._length or any(n != start for n in self._layer_lens):
                expected = "" if self._span is None else f"{self._span[1] - self._span[0]} at {self._span[0]} or "
                hint = " (after begin(), feed the positions from get_seq_length() on)" if self._fresh else ""
                raise InvalidArgument(f"layer {layer_idx} brings {new} positions at {start}; the cache expects "
                                      f"{expected}new positions at {self._length} with every layer in step "
                                      f"(written: {self._layer_lens}){hint}")
            self._reserve(new)
        plan = self._plan if self._plan is not None and self._plan.span == self._span else self._make_plan()
        self._write(layer_idx, key_states, value_states, plan)
        self._fresh = False
        kv_start = self.layers[layer_idx].kv_start(start)
        keys, values = self._gather(layer_idx, plan, kv_start, key_states.dtype)
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

    def _reserve(self, new: int) -> None:
        if new == 1:
            self.manager.append_slots(self._rids)
        else:
            self.manager.extend_batch(self._rids, [new] * len(self._rids))
        start = self._length
        self._length, self._span = start + new, (start, start + new)
        self._skip[:] = 0

    def _make_plan(self) -> StepPlan:
        meta = self.manager.batch_metadata(self._rids, [0] * len(self._rids))
        start, end = self._span
        self._plan = plan_step(meta.block_tables, meta.seq_lens, self._lead, self._skip, start, end,
                               self.storage.config.block_size, self.storage.torch_device)
        return self._plan

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        flat_k = k.transpose(1, 2).reshape(-1, *self._shape)
        flat_v = v.transpose(1, 2).reshape(-1, *self._shape)
        if plan.write_rows is not None:
            flat_k, flat_v = flat_k.index_select(0, plan.write_rows), flat_v.index_select(0, plan.write_rows)
        if plan.write_slots.size:
            self.storage.write(layer, plan.write_slots, flat_k, flat_v)

    def _gather(self, layer: int, plan: StepPlan, kv_start: int, dtype: torch.dtype):
        rows, length = len(self._rids), plan.end - kv_start
        if self._flat is not None:
            index = plan.gather_slots[:, kv_start:].reshape(-1)
            pool_k, pool_v = self._flat[layer]
            keys = take(pool_k, 0, index).view(rows, length, *self._shape)
            values = take(pool_v, 0, index).view(rows, length, *self._shape)
        else:  # quantized pools: dequantized per row by the storage
            keys = torch.zeros((rows, plan.end, *self._shape), dtype=torch.float32, device=self.storage.torch_device)
            values = torch.zeros_like(keys)
            for row in range(rows):
                n, pad = int(plan.seq_lens[row]), int(self._lead[row])
                keys[row, pad:pad + n], values[row, pad:pad + n] = self.storage.gather(
                    layer, plan.block_tables[row], n)
            keys, values = keys[:, kv_start:], values[:, kv_start:]
        if plan.pad_mask is not None:
            hidden = plan.pad_mask[:, kv_start:, None, None]
            keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
        return keys.transpose(1, 2).to(dtype), values.transpose(1, 2).to(dtype)

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

