"""Attention cases: a default set that touches every value of every dimension, and the full sweep."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["AttentionCase", "DEFAULT_CASES", "sweep_cases"]


@dataclass(frozen=True)
class AttentionCase:
    name: str
    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...] | None = None  # None: decode
    block_size: int = 16
    num_kv_heads: int = 2
    group: int = 1  # query heads per KV head
    head_dim: int = 64
    sliding_window: int | None = None
    soft_cap: float | None = None
    scale: float | None = None
    causal: bool = True

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def num_blocks(self) -> int:
        return sum(-(-n // self.block_size) for n in self.seq_lens) + 3

    def describe(self) -> str:
        return (f"{self.name}: seq_lens={list(self.seq_lens)} query_lens={self.query_lens} bs={self.block_size} "
                f"kv_heads={self.num_kv_heads} q_heads={self.num_q_heads} head_dim={self.head_dim} "
                f"window={self.sliding_window} soft_cap={self.soft_cap} scale={self.scale} causal={self.causal}")


_LENS33 = tuple(int(n) for n in np.random.default_rng(33).integers(1, 70, 33))

DEFAULT_CASES = [
    AttentionCase("decode-single-token", (1,)),
    AttentionCase("decode-ragged-gqa4", (1, 16, 17, 40, 3), group=4, head_dim=128),
    AttentionCase("decode-batch33", _LENS33, block_size=8, group=4),
    AttentionCase("decode-bs1-mqa", (5, 9), block_size=1, num_kv_heads=1, group=8, head_dim=80),
    AttentionCase("decode-bs32-gqa8", (33, 64, 1), block_size=32, group=8, head_dim=96),
    AttentionCase("decode-hd256-mqa", (20, 7), num_kv_heads=1, group=4, head_dim=256),
    AttentionCase("decode-window", (40, 13, 1), block_size=8, group=2, sliding_window=16),
    AttentionCase("decode-softcap", (30, 17), group=4, soft_cap=5.0, scale=1.0),
    AttentionCase("prefill-causal", (17, 5, 32), (17, 5, 32), group=4),
    AttentionCase("prefill-chunked-prefix", (40, 23), (8, 23), block_size=8, group=2, head_dim=128),
    AttentionCase("prefill-window-softcap", (50,), (20,), group=4, sliding_window=12, soft_cap=5.0, scale=1.0),
    AttentionCase("prefill-noncausal", (12, 9), (12, 4), block_size=4, causal=False),
    AttentionCase("prefill-empty-sequence", (0, 10, 3), (0, 10, 1), block_size=4, group=2),
    AttentionCase("prefill-bs1-mqa-hd80", (6, 3), (3, 3), block_size=1, num_kv_heads=1, group=8, head_dim=80),
]


def sweep_cases() -> list[AttentionCase]:
    """The full cross product of the issue's dimensions (marked slow)."""
    cases = []
    for bs, hd, (hkv, group), kind, (window, cap) in itertools.product(
            (1, 8, 16, 32), (64, 80, 96, 128, 256), ((2, 1), (2, 4), (1, 8), (1, 4)), ("decode", "prefill"),
            ((None, None), (24, None), (None, 10.0))):
        rng = np.random.default_rng(zlib.crc32(repr((bs, hd, hkv, group, kind, window, cap)).encode()))
        batch = int(rng.choice([1, 7, 33]))
        lens = tuple(int(n) for n in rng.integers(1, 3 * bs + 2, batch))
        qlens = None if kind == "decode" else tuple(int(rng.integers(1, n + 1)) for n in lens)
        name = f"sweep-{kind}-bs{bs}-hd{hd}-kv{hkv}x{group}-w{window}-cap{cap}"
        cases.append(AttentionCase(name, lens, qlens, bs, hkv, group, hd, window, cap, 1.0 if cap else None))
    return cases
