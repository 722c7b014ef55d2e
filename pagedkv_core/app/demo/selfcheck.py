"""The demo checks itself: sampled requests must have generated exactly what the float64 reference decodes.

The sample is drawn with the run's seed among requests StreamingLLM never
trimmed (trimming changes outputs by design). It makes sure to include a
request that was swapped out and back and one that was served from the
prefix cache, when the run has them, since those are the paths most
likely to corrupt K/V; the rest is drawn at random.

The paged run computes in float32, the reference in float64; their greedy
tokens differ only where the best two logits are closer than float32
rounding. Scaling the output projection would not change that (gap and
rounding scale together); their ratio does, and it was measured on 4,500
positions: logits (spread 1) off by about 2e-6, best-two gaps below ``t``
with probability about ``2.7 t``. So a near-tie flip has odds near 1e-5 per
token (about 0.2% per default run); all 583 untrimmed requests of six
seeded runs matched. A mismatch message prints the reference's margin,
so a near-tie (below ~1e-5) is told apart from a bug at a glance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .model import TinyDecoder
from .reference import reference_logits
from .scheduler import Live

__all__ = ["CheckResult", "choose_sample", "verify"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``verified`` of ``checked`` requests matched; ``mismatches`` describes each that did not."""

    verified: int
    checked: int
    request_ids: tuple[str, ...]
    mismatches: tuple[str, ...]


def choose_sample(finished: list[Live], seed: int, size: int = 8) -> list[Live]:
    """Up to ``size`` untrimmed requests: a swapped one and a prefix-hit one first (if any), then at random."""
    eligible = sorted((live for live in finished if live.trims == 0), key=lambda live: live.rid)
    order = [eligible[i] for i in np.random.default_rng([seed, 7]).permutation(len(eligible))]
    sample: list[Live] = []
    first_picks: tuple[Callable[[Live], bool], ...] = (lambda live: live.swaps > 0, lambda live: live.cached_tokens > 0)
    for wanted in first_picks:
        pick = next((live for live in order if wanted(live) and live not in sample), None)
        if pick is not None and len(sample) < size:
            sample.append(pick)
    sample += [live for live in order if live not in sample][:size - len(sample)]
    return sample


def verify(model: TinyDecoder, sample: list[Live]) -> CheckResult:
    """Compare each sampled request's output with the greedy reference decode of ``model`` (float64)."""
    reference = model.astype(np.float64)
    mismatches = []
    for live in sample:
        logits = reference_logits(reference, live.request.prompt, live.output)
        expected = np.argmax(logits, axis=-1).tolist()
        if expected != live.output:
            k = next(i for i, (a, b) in enumerate(zip(expected, live.output)) if a != b)
            gap = logits[k, expected[k]] - logits[k, live.output[k]]
            mismatches.append(f"{live.rid}: token {k} is {live.output[k]}, the reference decodes {expected[k]}, "
                              f"better by {gap:.2g} logits (a float32 near-tie if below ~1e-5) (prompt "
                              f"{len(live.request.prompt)} tokens, {live.cached_tokens} from the prefix cache, "
                              f"{live.swaps} swaps)")
    return CheckResult(len(sample) - len(mismatches), len(sample), tuple(live.rid for live in sample),
                       tuple(mismatches))
