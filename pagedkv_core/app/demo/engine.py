"""The model on the paged cache: K/V go into the backend's block pool, attention reads them through block tables.

One call is one forward pass of a batch, prefill or decode. Following
FlashInfer's plan/run split, the batch's index arrays are turned into a
plan once and every layer only runs it; each layer first writes its new
K/V at the step's ``slot_mapping``, so a query sees its own token (and, in
a prefill, any prefix another sequence of the same batch just wrote).
"""

from __future__ import annotations

import numpy as np

from ...blocks.metadata import BatchMetadata
from ...contract.backend import Backend
from ...contract.storage import BlockStorage
from .model import TinyDecoder

__all__ = ["PagedRunner"]


class PagedRunner:
    """Runs a float32 :class:`TinyDecoder` whose K/V live in ``storage`` on ``backend``'s ``device``."""

    def __init__(self, model: TinyDecoder, backend: Backend, storage: BlockStorage, device: str) -> None:
        self.model = model
        self.backend = backend
        self.storage = storage
        self.device = device
        self.dtype = storage.config.dtype

    def step(self, meta: BatchMetadata, tokens: np.ndarray, positions: np.ndarray, *, prefill: bool) -> np.ndarray:
        """Greedy next token of each sequence of the batch.

        ``tokens [num_new_tokens]`` and ``positions [num_new_tokens]`` (absolute,
        for RoPE) follow ``meta.query_start_loc``; ``prefill`` selects the
        multi-token plan (``meta.query_start_loc``) over the decode plan.
        Returns ``int64 [batch]``: the argmax of each sequence's last logits.
        """
        backend, device, dtype, storage = self.backend, self.device, self.dtype, self.storage
        plan = backend.attention.plan(storage, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc if prefill else None)
        slots = meta.slot_mapping

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            storage.write(layer, slots, backend.asarray(k, device, dtype), backend.asarray(v, device, dtype))
            return np.asarray(backend.to_numpy(plan.run(backend.asarray(q, device, dtype), layer)))  # no copy

        hidden = self.model.forward(tokens, positions, attend)
        last = meta.query_start_loc[1:].astype(np.int64) - 1
        chosen: np.ndarray = np.argmax(self.model.logits(hidden[last]), axis=-1)
        return chosen
