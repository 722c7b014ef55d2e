"""A hypothesis state machine drives the hybrid manager with mixed groups (full, sliding, chunked, state).

After every step the block counts must match their owners, every group must
agree on each sequence's length, and every position a group still holds must
hold the K/V the shadow expects. K/V are a deterministic function of the
token prefix (as in a real model), so a prefix hit — served by a sliding
group from its window only — must find exactly the expected bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv_core import (
    AllocationRequest,
    CacheConfig,
    HybridCacheManager,
    InvalidArgument,
    LayerGroup,
    OutOfBlocks,
)
from pagedkv_numpy.storage import NumpyStorage

GROUPS = (LayerGroup.full([1, 4]), LayerGroup.sliding(6, [0, 2]), LayerGroup.chunked_local(8, [3, 5]),
          LayerGroup.state((2,), "float32", [6], slots=5))
CONFIG = CacheConfig(num_layers=7, num_kv_heads=1, head_dim=2, num_blocks=40, block_size=4, max_seq_len=64,
                     layer_groups=GROUPS)
KV_LAYERS = [x for g in GROUPS if g.kind != "state" for x in g.layers]
PROMPTS = [tuple(range(100, 111)), tuple(range(100, 107)) + (5, 5, 5, 5, 5, 5), (7,) * 13]


def kv_for(history: tuple[int, ...], layer: int) -> np.ndarray:
    """K and V of the last token of ``history`` in ``layer``: [2, heads, dim]."""
    digest = hashlib.sha256(np.asarray((layer, *history), np.int64).tobytes()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal((2, 1, 2)).astype(np.float32)


class HybridMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = HybridCacheManager(NumpyStorage(CONFIG.storage_config()), CONFIG)
        self.history: dict[str, list[int]] = {}
        self.next_id = 0

    def _write(self, rids: list[str], qlens: list[int]) -> None:
        """Write the K/V of each sequence's last ``qlens`` tokens, as a forward step would."""
        meta = self.m.batch_metadata(rids, qlens)
        for layer in KV_LAYERS:
            step = meta.for_layer(layer)
            rows = []
            for rid, q in zip(rids, qlens):
                hist = self.history[rid]
                rows += [kv_for(tuple(hist[:p + 1]), layer) for p in range(len(hist) - q, len(hist))]
            if rows:
                kv = np.stack(rows)
                self.m.storage.write(step.storage_layer, step.metadata.slot_mapping, kv[:, 0], kv[:, 1])

    @rule(prompt=st.sampled_from(PROMPTS), extra=st.integers(0, 6))
    def allocate(self, prompt, extra):
        rid = f"r{self.next_id}"
        self.next_id += 1
        tokens = prompt + tuple(range(extra))
        request = AllocationRequest(rid, token_ids=tokens)
        fits = self.m.can_allocate(request)
        try:
            admitted = self.m.allocate(request)
        except OutOfBlocks:
            assert not fits
            return
        assert fits
        self.history[rid] = list(tokens)
        self._write([rid], [len(tokens) - admitted.cached_tokens])

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def decode(self, data):
        rids = data.draw(st.lists(st.sampled_from(sorted(self.history)), min_size=1, unique=True))
        tokens = [data.draw(st.integers(0, 3)) for _ in rids]
        try:
            self.m.append_slots(rids, tokens)
        except OutOfBlocks:
            return
        except Exception as exc:  # a sequence at max_seq_len
            assert type(exc).__name__ == "OutOfBounds"
            return
        for rid, t in zip(rids, tokens):
            self.history[rid].append(t)
        self._write(rids, [1] * len(rids))

    @precondition(lambda self: self.history)
    @rule(data=st.data(), count=st.integers(1, 6))
    def speculate_and_roll_back(self, data, count):
        rid = data.draw(st.sampled_from(sorted(self.history)))
        drafts = [data.draw(st.integers(0, 3)) for _ in range(count)]
        try:
            self.m.extend_batch([rid], [count], [drafts])
        except (OutOfBlocks, IndexError):
            return
        self.history[rid] += drafts
        self._write([rid], [count])
        rejected = data.draw(st.integers(0, count))
        self.m.trim(rid, rejected)  # the tokens of the last step can always be rolled back
        del self.history[rid][len(self.history[rid]) - rejected:]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def fork(self, data):
        rid = data.draw(st.sampled_from(sorted(self.history)))
        try:
            child = self.m.fork(rid)
        except OutOfBlocks:
            return
        self.history[child] = list(self.history[rid])

    @precondition(lambda self: self.history)
    @rule(data=st.data(), back=st.integers(1, 12))
    def trim_far(self, data, back):
        rid = data.draw(st.sampled_from(sorted(self.history)))
        back = min(back, len(self.history[rid]))
        try:
            self.m.trim(rid, back)
        except InvalidArgument:
            return  # a sliding or chunked group released what the shorter sequence would read
        del self.history[rid][len(self.history[rid]) - back:]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def deallocate(self, data):
        rid = data.draw(st.sampled_from(sorted(self.history)))
        self.m.deallocate(rid)
        del self.history[rid]

    @invariant()
    def counts_and_groups_agree(self):
        self.m.check_invariants()

    @invariant()
    def held_positions_hold_the_expected_kv(self):
        bs = CONFIG.block_size
        for layer in KV_LAYERS:
            group, slot = CONFIG.layout.locate(layer)
            k_pool, v_pool = self.m.storage.to_numpy(slot)
            sequences = self.m.groups[group.index].sequences
            for rid, hist in self.history.items():
                seq = sequences.find(rid)
                assert seq.num_tokens == len(hist)
                for p in range(seq.live_from * bs, len(hist)):
                    block = seq.blocks[p // bs]
                    expected = kv_for(tuple(hist[:p + 1]), layer)
                    np.testing.assert_array_equal(k_pool[block, p % bs], expected[0])
                    np.testing.assert_array_equal(v_pool[block, p % bs], expected[1])

    @invariant()
    def the_next_query_finds_everything_it_reads(self):
        for group in self.m.groups:
            for seq in group.sequences:
                assert seq.live_from <= group.reach(seq.num_tokens)
                if not group.drops_blocks:
                    assert seq.live_from == 0


HybridMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestHybridMachine = HybridMachine.TestCase
