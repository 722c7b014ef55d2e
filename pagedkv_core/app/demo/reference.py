"""The oracle: greedy decoding in float64 that recomputes full causal attention, with no cache at all.

The model runs over the whole sequence and attends over plain contiguous
K/V, so nothing the paged run relies on (block tables, slot mappings,
prefix hits, swaps, the backend's kernels) takes part. Positions are the
token indices: only sequences never trimmed by StreamingLLM can be
compared, since trimming changes the outputs by design.

:func:`reference_decode` is the literal greedy loop, one full pass per
generated token; :func:`reference_choices` gets the same answer from one
pass (see its docstring), which is what lets the demo check 8 requests in
well under a second instead of ten seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .model import TinyDecoder

__all__ = ["causal_attention", "reference_decode", "reference_logits", "reference_choices"]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Full causal GQA attention of one sequence: ``q [n, q_heads, d]``, ``k, v [n, kv_heads, d]``."""
    n, q_heads, d = q.shape
    group = q_heads // k.shape[1]
    kk = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # [q_heads, d, n]
    vv = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # [q_heads, n, d]
    scores = np.matmul(q.transpose(1, 0, 2), kk) / np.sqrt(d)  # [q_heads, n, n]
    scores = np.where(np.tri(n, dtype=bool)[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out: np.ndarray = np.matmul(weights, vv).transpose(1, 0, 2)  # [n, q_heads, d]
    return out


def reference_decode(model: TinyDecoder, prompt: Sequence[int], max_new_tokens: int,
                     stop_at: Sequence[int] | None = None) -> list[int]:
    """Greedy continuation of ``prompt`` by ``model`` (use a float64 model), recomputed from scratch each step.

    ``stop_at`` (the tokens to check against) ends the decode at the first
    token that differs from it: the rest could not match anyway, and a
    self-check then costs no more than it must.
    """
    tokens = list(prompt)
    out: list[int] = []
    for step in range(max_new_tokens):
        hidden = model.forward(np.asarray(tokens), np.arange(len(tokens)),
                               lambda _layer, q, k, v: causal_attention(q, k, v))
        token = int(np.argmax(model.logits(hidden[-1:])[0]))
        out.append(token)
        tokens.append(token)
        if stop_at is not None and (step >= len(stop_at) or stop_at[step] != token):
            break
    return out


def reference_logits(model: TinyDecoder, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
    """``[len(generated), vocab]``: the logits after ``prompt + generated[:k]`` for every ``k``, from one causal pass.

    See :func:`reference_choices`.
    """
    tokens = np.asarray([*prompt, *generated[:-1]])
    hidden = model.forward(tokens, np.arange(len(tokens)), lambda _layer, q, k, v: causal_attention(q, k, v))
    return model.logits(hidden[len(prompt) - 1:])


def reference_choices(model: TinyDecoder, prompt: Sequence[int], generated: Sequence[int]) -> list[int]:
    """The reference's greedy token after ``prompt + generated[:k]``, for every ``k``, from one causal pass.

    Causal attention makes position ``t`` of a pass over the whole sequence
    compute exactly what a cache-free pass over its first ``t + 1`` tokens
    computes at its end. So ``generated == reference_choices(...)`` holds
    exactly when ``generated == reference_decode(model, prompt, len(generated))``
    (by induction over the steps), at the cost of one pass instead of one
    per generated token; ``tests/test_demo.py`` checks the two agree.
    """
    if not generated:
        return []
    choices: list[int] = np.argmax(reference_logits(model, prompt, generated), axis=-1).tolist()
    return choices
