"""The float64 reference of paged attention: the oracle every kernel is checked against.

Written for clarity, not speed: a loop over sequences, queries and heads,
following the conventions of ``pagedkv_core.contract.attention`` word for word.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["reference_attention", "gather_sequence"]


def gather_sequence(pool: np.ndarray, block_table: np.ndarray, seq_len: int) -> np.ndarray:
    """Token ``p`` of a sequence lives at ``pool[block_table[p // bs], p % bs]``."""
    block_size = pool.shape[1]
    rows = [pool[block_table[p // block_size], p % block_size] for p in range(seq_len)]
    return np.stack(rows).astype(np.float64) if rows else np.zeros((0,) + pool.shape[2:], np.float64)


def reference_attention(
    q: np.ndarray,
    k_pool: np.ndarray,
    v_pool: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    chunk_size: int | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Attention of ``q [num_queries, num_q_heads, head_dim]`` over paged K/V, in float64.

    ``k_pool, v_pool: [num_blocks, block_size, num_kv_heads, head_dim]``;
    ``query_start_loc=None`` means one query per sequence (decode).
    ``chunk_size``: a query sees only keys of its own chunk (``p // c == t // c``);
    ``sinks [num_q_heads]``: each head's sink logit joins the denominator.
    A query row that can see no key (possible only with ``causal=False`` and
    an empty sequence) gets zeros.
    """
    q = np.asarray(q, dtype=np.float64)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_pool.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    batch = len(seq_lens)
    if query_start_loc is None:
        query_start_loc = np.arange(batch + 1)
    out = np.zeros_like(q)
    for b in range(batch):
        seq_len = int(seq_lens[b])
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        keys = gather_sequence(k_pool, block_tables[b], seq_len)
        values = gather_sequence(v_pool, block_tables[b], seq_len)
        for i, row in enumerate(range(start, end)):
            t = seq_len - (end - start) + i  # the query's position
            visible = [p for p in range(seq_len)
                       if (not causal or p <= t) and (sliding_window is None or t - sliding_window < p <= t)
                       and (chunk_size is None or p // chunk_size == t // chunk_size)]
            if not visible:
                continue
            for h in range(num_q_heads):
                kv = h // group
                scores = np.array([scale * np.dot(q[row, h], keys[p, kv]) for p in visible])
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                top = scores.max() if sinks is None else max(scores.max(), float(sinks[h]))
                weights = np.exp(scores - top)
                denominator = weights.sum() + (0.0 if sinks is None else math.exp(float(sinks[h]) - top))
                weights /= denominator
                out[row, h] = sum(w * values[p, kv] for w, p in zip(weights, visible))
    return out
