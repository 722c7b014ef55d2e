"""Prefix hits across layer groups: what every group needs for a hit, and why a hit stops where it does.

A hit of ``h`` blocks lets the engine skip computing the prompt's first
``h * block_size`` tokens, so every group must hold what the first computed
query reads: a full group the whole prefix, a sliding group only the blocks
its window reaches back to, a chunked group the blocks of the current
chunk. A state group would need the state at that boundary, which pagedkv
does not checkpoint (the engine owns the state arrays), so a model with state
layers gets no prefix hits; :func:`explain` says so instead of reporting a
silent 0 %. The common hit is the largest ``h`` every group can serve; the
per-group answers are not monotone in ``h`` (a sliding group may serve 40
blocks but not 41), so the search lowers ``h`` until all agree.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..config import AllocationRequest, PrefixCacheConfig
from ..layers import LayerGroup
from .groups import KvGroup

__all__ = ["GroupHit", "PrefixExplanation", "GroupLookup", "search", "explain"]


@dataclass(frozen=True, slots=True)
class GroupHit:
    """One group's answer: the longest hit it could serve on its own, and why it stops there."""

    group: int  # cache group index; state groups follow the cache groups
    kind: str
    layers: tuple[int, ...]
    hit_tokens: int
    reason: str


@dataclass(frozen=True, slots=True)
class PrefixExplanation:
    """What ``allocate`` would reuse for a prompt now (``hit_tokens``), group by group."""

    prompt_tokens: int
    hit_tokens: int
    groups: tuple[GroupHit, ...]

    @property
    def limiting_groups(self) -> tuple[GroupHit, ...]:
        """The groups that could serve no more than the common hit."""
        return tuple(g for g in self.groups if g.hit_tokens <= self.hit_tokens)

    def __str__(self) -> str:
        lines = [f"prefix hit {self.hit_tokens} of {self.prompt_tokens} prompt tokens"]
        for g in self.groups:
            lines.append(f"  group {g.group} ({g.kind}, layers {list(g.layers)}): {g.hit_tokens} tokens — {g.reason}")
        return "\n".join(lines)


@dataclass(slots=True)
class GroupLookup:
    """A group's hashes of the prompt's full blocks and the cached block of each (None: not cached)."""

    group: KvGroup
    root: Hashable | None
    hashes: list[Hashable]
    cached: list[int | None]
    run: list[int]  # run[i]: cached blocks in a row ending at block i

    def longest_from_start(self) -> int:
        for i, block in enumerate(self.cached):
            if block is None:
                return i
        return len(self.cached)

    def best_at_most(self, h: int) -> int:
        """The largest hit ``<= h`` blocks this group can serve."""
        group = self.group
        while h > 0:
            start = min(group.reach(h * group.block_size), h) if group.drops_blocks else 0
            need = h - start
            if need == 0 or self.run[h - 1] >= need:
                return h
            h -= 1
        return 0


def _lookup(group: KvGroup, request: AllocationRequest, full_blocks: int) -> GroupLookup:
    hasher = group.prefix.hasher
    if hasher is None or request.token_ids is None:
        return GroupLookup(group, None, [], [], [])
    root = hasher.root(request.cache_salt)
    hashes = hasher.chain(request.token_ids[:full_blocks * group.block_size], root)
    cached = [group.pool.lookup(h) for h in hashes]
    run: list[int] = []
    for block in cached:
        run.append(0 if block is None else (run[-1] + 1 if run else 1))
    return GroupLookup(group, root, hashes, cached, run)


def search(groups: Sequence[KvGroup], state_groups: Sequence[LayerGroup], request: AllocationRequest,
           prefix: PrefixCacheConfig | None) -> tuple[int, list[GroupLookup]]:
    """The common hit in blocks and each group's lookup (hashes and cached blocks)."""
    n = request.initial_tokens or 0
    bs = groups[0].block_size
    full_blocks = max(0, (n - 1) // bs)  # at least one token is always computed
    if prefix is not None and prefix.ttl_seconds is not None:
        groups[0].pool.expire_cached(prefix.ttl_seconds)
    lookups = [_lookup(g, request, full_blocks) for g in groups]
    if prefix is None or request.token_ids is None or state_groups:
        return 0, lookups
    h = full_blocks
    for lookup in lookups:
        if not lookup.group.drops_blocks:
            h = min(h, lookup.longest_from_start())
    changed = True
    while changed and h:
        changed = False
        for lookup in lookups:
            if lookup.group.drops_blocks:
                best = lookup.best_at_most(h)
                changed |= best != h
                h = best
    if h * bs < prefix.min_prefix_length:
        h = 0
    return h, lookups


def _reason(lookup: GroupLookup, own: int, full_blocks: int) -> str:
    group, bs = lookup.group, lookup.group.block_size
    if own == full_blocks:
        return "holds the whole prompt but its last token (which is always computed)"
    if not group.drops_blocks:
        return f"block {own} (tokens {own * bs}-{own * bs + bs - 1}) is not cached"
    h = own + 1
    start = min(group.reach(h * bs), h)
    missing = max(i for i in range(start, h) if lookup.cached[i] is None)
    what = (f"window {group.spec.window}" if group.spec.window is not None
            else f"chunk {group.spec.chunk_size}")
    return (f"a hit of {h * bs} tokens needs blocks {start}-{h - 1} ({what}); block {missing} "
            f"(tokens {missing * bs}-{missing * bs + bs - 1}) is not cached")


def explain(groups: Sequence[KvGroup], state_groups: Sequence[LayerGroup], request: AllocationRequest,
            prefix: PrefixCacheConfig | None) -> PrefixExplanation:
    """Per group: the hit it could serve alone and why it stops; overall: what an allocation would reuse."""
    n = request.initial_tokens or 0
    bs = groups[0].block_size
    full_blocks = max(0, (n - 1) // bs)
    h, lookups = search(groups, state_groups, request, prefix)
    answers: list[GroupHit] = []
    for lookup in lookups:
        group = lookup.group
        if prefix is None:
            own, reason = 0, "prefix caching is off"
        elif request.token_ids is None:
            own, reason = 0, "no token ids given: nothing to look up"
        else:
            own = lookup.best_at_most(full_blocks) if group.drops_blocks else lookup.longest_from_start()
            reason = _reason(lookup, own, full_blocks)
        answers.append(GroupHit(group.cache_group.index, group.spec.kind, group.cache_group.layers, own * bs, reason))
    for i, state in enumerate(state_groups):
        answers.append(GroupHit(len(groups) + i, "state", state.layers, 0,
                                "a state group keeps no checkpoints at block boundaries, so no prefix can be "
                                "resumed: the engine owns the state arrays and must recompute the prompt"))
    return PrefixExplanation(n, h * bs, tuple(answers))
