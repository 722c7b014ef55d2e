"""The synthetic traffic: who arrives when, with which prompt, wanting how many tokens.

Lengths are lognormal (most requests short, a long tail), as in production
traces; half of the prompts start with one of a few shared system prompts,
which is what prefix caching feeds on; a small share of requests generate
past the context limit, which is what StreamingLLM trimming is for.
Everything is drawn from one seed, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WorkloadConfig", "Request", "make_workload", "peak_demand"]


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Shape of the traffic. Lengths in tokens; ``arrival_rate`` in requests per engine step."""

    vocab_size: int = 512
    prompt_median: float = 48.0
    prompt_sigma: float = 0.6
    prompt_max: int = 192
    output_median: float = 24.0
    output_sigma: float = 0.7
    output_max: int = 128
    system_prompt_lengths: tuple[int, ...] = (32, 48, 64)
    system_share: float = 0.5
    long_share: float = 0.02
    """Share of long requests (at least one when there are two requests or more): a prompt of 0.7-0.85 x
    ``context`` tokens and an answer of 0.35-0.55 x ``context``, so they outgrow the context and need
    StreamingLLM trimming."""
    context: int = 256
    arrival_rate: float = 2.0


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the workload; ``system`` is the index of its system prompt or -1."""

    request_id: str
    arrival_step: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    system: int = -1


def _lognormal(rng: np.random.Generator, median: float, sigma: float, low: int, high: int, n: int) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), low, high).astype(np.int64)


def make_workload(num_requests: int, seed: int = 0, config: WorkloadConfig | None = None) -> list[Request]:
    """``num_requests`` requests in arrival order (Poisson arrivals, ``arrival_rate`` per step)."""
    c = config or WorkloadConfig()
    rng = np.random.default_rng(seed)
    systems = [tuple(int(t) for t in rng.integers(0, c.vocab_size, n)) for n in c.system_prompt_lengths]
    gaps = rng.exponential(1.0 / c.arrival_rate, num_requests)
    arrivals = np.floor(np.cumsum(gaps) - gaps[0]).astype(np.int64)
    prompt_lens = _lognormal(rng, c.prompt_median, c.prompt_sigma, 4, c.prompt_max, num_requests)
    output_lens = _lognormal(rng, c.output_median, c.output_sigma, 1, c.output_max, num_requests)
    long = rng.random(num_requests) < c.long_share
    if num_requests > 1 and not long.any():  # a lone request stays checkable: trimmed ones are not
        long[rng.integers(num_requests)] = True
    prompt_lens[long] = rng.integers(70 * c.context // 100, 85 * c.context // 100, int(long.sum()))
    output_lens[long] = rng.integers(35 * c.context // 100, 55 * c.context // 100, int(long.sum()))
    with_system = rng.random(num_requests) < c.system_share
    which = rng.integers(0, len(systems), num_requests)
    requests = []
    for i in range(num_requests):
        system = int(which[i]) if with_system[i] else -1
        head = systems[system] if system >= 0 else ()
        if long[i]:
            user = int(prompt_lens[i]) - len(head)
        else:  # a system prompt adds to a shorter question
            user = min(max(1, int(prompt_lens[i]) - len(head) // 2), c.prompt_max - len(head))
        prompt = head + tuple(int(t) for t in rng.integers(0, c.vocab_size, user))
        requests.append(Request(f"req-{i:04d}", int(arrivals[i]), prompt, int(output_lens[i]), system))
    return requests


def peak_demand(requests: list[Request], block_size: int, context: int) -> int:
    """Blocks the workload would hold at its busiest step if every request ran the moment it arrived.

    Each request holds ``ceil(tokens / block_size)`` blocks while it
    decodes, its length capped by the ``context`` limit; shared prefixes
    are counted once per request, so this is an upper bound that the demo
    sizes its pool against.
    """
    if not requests:
        return 0
    horizon = max(r.arrival_step + r.max_new_tokens for r in requests) + 1
    demand = np.zeros(horizon, np.int64)
    for r in requests:
        lengths = np.minimum(len(r.prompt) + np.arange(r.max_new_tokens), context)
        demand[r.arrival_step:r.arrival_step + r.max_new_tokens] += -(-lengths // block_size)
    return int(demand.max())
