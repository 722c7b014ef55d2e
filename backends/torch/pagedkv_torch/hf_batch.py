"""The rows of a :class:`~pagedkv_torch.hf_cache.PagedCache` as sequences of its manager.

Split from :mod:`.hf_cache`, which speaks transformers' step protocol
(positions, layers, masks): this object owns what lives in the manager — one
request id per batch row, each row's leading padding (not stored) and its
first tokens that are shared (not to be written) — and every call that
admits, forks, trims or frees those sequences, through the
:mod:`.hf_rows` binding of either manager.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from pagedkv_core.config import AllocationRequest

from .hf_rows import Rows, blocks_from

__all__ = ["RowBatch"]


class RowBatch:
    """One manager sequence per batch row, in transformers' padded coordinates.

    ``lead[i]``: row ``i``'s leading padding, not stored; ``skip[i]``: its first
    tokens served by shared blocks (prefix hits, forks), not to be written;
    ``unwritten``: blocks were registered in the prefix cache whose K/V are
    not all written yet (a prefill under way).
    """

    def __init__(self, rows: Rows, tag: str) -> None:
        self.rows = rows
        self.manager = rows.manager
        self.tag = tag
        self._ids = itertools.count()
        self.clear()

    def clear(self) -> None:
        self.rids: list[str] = []
        self.lead = np.zeros(0, np.int64)
        self.skip = np.zeros(0, np.int64)
        self.unwritten = False

    def __len__(self) -> int:
        return len(self.rids)

    def new_id(self) -> str:
        return f"{self.tag}-{next(self._ids)}"

    def admit_prompts(self, ids: np.ndarray, real: np.ndarray, lead: np.ndarray, cache_salt: str | None) -> None:
        """Admit each row of ``ids [batch, length]`` from its first attended token, one after the other.

        A row whose mask ``real`` has holes after that token is admitted without
        token ids (stored as is, no sharing). All rows or none: a failure
        releases the rows admitted so far and forgets what they registered.
        """
        length = ids.shape[1]
        cached: list[int] = []
        try:
            for row, pad in enumerate(lead):
                tokens = tuple(ids[row, pad:].tolist()) if real[row, pad:].all() else None
                request = AllocationRequest(self.new_id(), initial_tokens=length - int(pad), token_ids=tokens,
                                            cache_salt=cache_salt)
                cached.append(self.rows.admit(request))
                self.rids.append(request.request_id)
        except BaseException:
            self.skip, self.unwritten = np.array(cached, np.int64), True
            self.release()
            raise
        self.lead, self.skip = lead.astype(np.int64), np.array(cached, np.int64)
        self.unwritten = self.rows.prefix_caching

    def admit_blank(self, batch: int, new: int) -> None:
        """``batch`` rows of ``new`` positions, without token ids: everything stored, nothing shared."""
        requests = [AllocationRequest(self.new_id(), initial_tokens=new) for _ in range(batch)]
        self.rows.admit_all(requests)
        self.rids = [r.request_id for r in requests]
        self.lead, self.skip = np.zeros(batch, np.int64), np.zeros(batch, np.int64)

    def readmit(self, end: int) -> None:
        """Admit the rows anew for ``end`` padded positions, without token ids, nothing shared (see ``_new_step``)."""
        self.release_rows()
        requests = [AllocationRequest(self.new_id(), initial_tokens=end - int(pad)) for pad in self.lead]
        lead = self.lead
        self.clear()
        self.rows.admit_all(requests)
        self.rids, self.lead, self.skip = [r.request_id for r in requests], lead, np.zeros(len(requests), np.int64)

    def release(self) -> None:
        """Free every row; forget the prefix hashes of blocks whose K/V were never (all) written."""
        self.release_rows()
        self.clear()

    def release_rows(self) -> None:
        unwritten = self.unwritten_blocks() if self.unwritten and self.rids else None
        for rid in self.rids:
            self.manager.deallocate(rid)
        if unwritten is not None:
            self.rows.forget(unwritten)
        self.rids = []

    def unwritten_blocks(self) -> set[int]:
        """The blocks admission gave the rows beyond their prefix hits: registered, their K/V not (all) written."""
        skip = np.zeros(len(self.rids), np.int64)  # rows admitted before a failure: no hits known
        skip[:len(self.skip)] = self.skip[:len(self.rids)]
        return blocks_from(self.rows, self.rids, skip)

    def reindex(self, indices: np.ndarray, length: int) -> None:
        """Row ``j`` becomes old row ``indices[j]``: a repeated row is forked (it shares every block, writes
        none of them), a row not named is freed. ``length``: the padded positions every row holds."""
        rids, used, skip = [], set(), self.skip[indices].copy()
        for j, i in enumerate(indices.tolist()):
            if i in used:
                rids.append(self.new_id())
                self.rows.fork(self.rids[i], rids[-1])
                skip[j] = length - self.lead[i]
            else:
                used.add(i)
                rids.append(self.rids[i])
        for i, rid in enumerate(self.rids):
            if i not in used:
                self.manager.deallocate(rid)
        self.rids, self.lead, self.skip = rids, self.lead[indices], skip

    def trim(self, drop: int, length: int) -> None:
        """Remove the last ``drop`` of ``length`` padded positions of every row, or raise before any row changes."""
        counts: Sequence[int] = [min(drop, length - int(pad)) for pad in self.lead]
        self.rows.check_trim(self.rids, counts)
        for rid, count in zip(self.rids, counts):
            self.manager.trim(rid, count)
        self.lead = np.minimum(self.lead, length - drop)
        self.skip[:] = 0
