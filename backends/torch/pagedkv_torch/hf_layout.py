"""Index planning for the Hugging Face adapter: one step's slots, in transformers' padded coordinates.

transformers sees a batch as ``[batch, padded_length]``: row ``i`` starts
with ``lead[i]`` padding positions, then its tokens. The manager stores only
the tokens, so padded position ``p`` of row ``i`` is token ``p - lead[i]`` of
that row's sequence, at slot ``table[i, t // block_size] * block_size + t %
block_size``. A step covers positions ``[start, end)`` of every row; this
module turns the block tables into the few index tensors the step needs, once
per step (every layer reuses them), with NumPy in O(batch x length) vector
work and no per-token Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedkv_core.errors import CorruptBlockTable, ShapeMismatch

from .convert import index_tensor

__all__ = ["StepPlan", "host_2d", "plan_step", "shared_keys_differ"]


class StepPlan:
    """The index tensors of one step ``[start, end)`` over a batch, for one cache group's tables.

    The plan covers padded positions ``[lo, end)``: a sliding or chunked group
    never reads further back than its window, so its plan (and its gathers)
    stay ``O(window)`` whatever the length.

    * ``write_slots``: int64 host array, where the step's written tokens go (``storage.write``).
    * ``write_rows``: which of the step's ``batch x (end - start)`` tokens (row-major) are
      written, as an int64 tensor on the device, or None when all are.
    * ``gather_slots``: int64 ``[batch, end - lo]`` tensor on the device, the slot of every padded
      position (hidden positions point at slot 0 and are zeroed with ``pad_mask``).
    * ``pad_mask``: bool ``[batch, end - lo]`` tensor, True on positions the gather must not read:
      padding, and tokens whose block a sliding or chunked group released; None when there is none.
    * ``shared``: ``(row, lo, hi)`` padded ranges inside the step that are not written because
      the row shares those blocks (prefix-cache hits, forks); they are read back instead.
    * ``block_tables`` (int ``[batch, max_blocks]``, host) and ``lead`` (int64 ``[batch]``, host): the
      rows' tables and leading padding the plan was made from (what a paged attention kernel reads).
    """

    __slots__ = ("lo", "start", "end", "write_slots", "write_rows", "gather_slots", "pad_mask", "shared",
                 "block_tables", "lead")

    def __init__(self, lo: int, start: int, end: int, write_slots: np.ndarray, write_rows: torch.Tensor | None,
                 gather_slots: torch.Tensor, pad_mask: torch.Tensor | None,
                 shared: list[tuple[int, int, int]]) -> None:
        self.lo = lo
        self.start = start
        self.end = end
        self.write_slots = write_slots
        self.write_rows = write_rows
        self.gather_slots = gather_slots
        self.pad_mask = pad_mask
        self.shared = shared
        self.block_tables: np.ndarray | None = None
        self.lead: np.ndarray | None = None

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


def plan_step(block_tables: np.ndarray, seq_lens: np.ndarray, lead: np.ndarray, skip: np.ndarray,
              start: int, end: int, block_size: int, device: torch.device, *, lo: int = 0,
              null_block: int | None = None) -> StepPlan:
    """Plan the step that brings positions ``[start, end)`` of every row, reading from ``lo <= start`` on.

    ``block_tables [batch, max_blocks]`` and ``seq_lens [batch]`` come from
    ``manager.batch_metadata``; ``lead[i]`` is row ``i``'s padding,
    ``skip[i]`` how many of its first tokens are shared and must not be
    written; ``null_block`` is where a hybrid manager points released
    entries (those positions are hidden, never read). Raises
    :class:`CorruptBlockTable` if a table does not cover the row's tokens
    or the step would write into a released block (the rows were changed
    behind the adapter's back).
    """
    lead = np.asarray(lead, np.int64)
    token = np.arange(lo, end, dtype=np.int64)[None, :] - lead[:, None]  # [batch, end - lo]; < 0 on padding
    real = token >= 0
    needed = np.maximum(end - lead, 0)
    if (np.asarray(seq_lens) < needed).any():
        raise CorruptBlockTable(f"sequences hold {np.asarray(seq_lens).tolist()} tokens, the step needs {needed.tolist()}")
    clipped = np.maximum(token, 0)
    if block_tables.shape[1]:
        column = np.minimum(clipped // block_size, block_tables.shape[1] - 1)
        blocks = np.take_along_axis(block_tables, column, axis=1).astype(np.int64)
    else:
        blocks = np.full(token.shape, -1, np.int64)
    if (blocks[real] < 0).any():
        raise CorruptBlockTable("a block table has no block under a stored token")
    hidden = ~real if null_block is None else ~real | (blocks == null_block)
    slots = blocks * block_size + clipped % block_size
    step_tokens = token[:, start - lo:]
    written = step_tokens >= np.asarray(skip, np.int64)[:, None]
    if null_block is not None and (written & hidden[:, start - lo:]).any():
        raise CorruptBlockTable("the step would write into a block that a sliding or chunked group released")
    write = np.where(written, slots[:, start - lo:], -1).reshape(-1)
    keep = np.flatnonzero(write >= 0)
    write_rows = None if keep.size == write.size else index_tensor(keep, device)
    shared: list[tuple[int, int, int]] = []
    for row in np.flatnonzero((~written & (step_tokens >= 0)).any(axis=1)):
        first = max(start, int(lead[row]))
        last = min(end, int(lead[row] + skip[row]))
        shared.append((int(row), first, last))
    pad_mask = torch.from_numpy(hidden).to(device) if hidden.any() else None
    plan = StepPlan(lo, start, end, write[keep], write_rows, index_tensor(np.where(hidden, 0, slots), device),
                    pad_mask, shared)
    plan.block_tables, plan.lead = block_tables, lead.copy()
    return plan


def host_2d(x: Any, name: str) -> np.ndarray:
    """A host int64 copy of a ``[batch, length]`` integer tensor or array (token ids, masks)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 2 or array.dtype.kind not in "iub":
        raise ShapeMismatch(f"{name} must be an integer [batch, length] array, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def shared_keys_differ(fresh: torch.Tensor, keys: torch.Tensor, plan: StepPlan, kv_start: int) -> int | None:
    """The first row whose keys computed for shared positions differ from the stored ones it reads; None if none.

    ``fresh [batch, heads, end - start, dim]`` are the step's new keys,
    ``keys [batch, heads, end - kv_start, dim]`` what the gather returned.
    Hidden positions (a sliding group released them) hold no stored keys to
    compare with and are left out.
    """
    for row, lo, hi in plan.shared:
        new = fresh[row, :, lo - plan.start:hi - plan.start].float()
        old = keys[row, :, lo - kv_start:hi - kv_start].float()
        if plan.pad_mask is not None:
            seen = ~plan.pad_mask[row, lo - plan.lo:hi - plan.lo]
            new, old = new[:, seen], old[:, seen]
        if old.numel() and (new - old).abs().max() > 1e-2 * old.abs().max() + 1e-5:
            return row
    return None
