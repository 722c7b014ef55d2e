"""Attention cases: a default set that touches every value of every dimension, and the full sweep."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["AttentionCase", "DEFAULT_CASES", "SINK_KINDS", "sweep_cases", "feature_sweep_cases", "sink_logits"]

SINK_KINDS = ("moderate", "large")
"""How a case draws its sink logits (:func:`sink_logits`)."""


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
    chunk_size: int | None = None
    sinks: str | None = None  # one of SINK_KINDS; None: no sinks

    def __post_init__(self) -> None:
        if self.sinks is not None and self.sinks not in SINK_KINDS:
            raise ValueError(f"{self.name}: sinks must be one of {SINK_KINDS} or None, got {self.sinks!r}")

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def features(self) -> tuple[str, ...]:
        """The ``Capabilities.kernels`` names this case needs besides its kernel."""
        used = (("sliding_window", self.sliding_window), ("soft_cap", self.soft_cap),
                ("chunked_local", self.chunk_size), ("sinks", self.sinks))
        return tuple(name for name, value in used if value is not None)

    @property
    def num_blocks(self) -> int:
        return sum(-(-n // self.block_size) for n in self.seq_lens) + 3

    def describe(self) -> str:
        return (f"{self.name}: seq_lens={list(self.seq_lens)} query_lens={self.query_lens} bs={self.block_size} "
                f"kv_heads={self.num_kv_heads} q_heads={self.num_q_heads} head_dim={self.head_dim} "
                f"window={self.sliding_window} soft_cap={self.soft_cap} scale={self.scale} causal={self.causal} "
                f"chunk_size={self.chunk_size} sinks={self.sinks}")


def sink_logits(kind: str, num_q_heads: int, rng: np.random.Generator) -> np.ndarray:
    """One float32 sink logit per query head.

    ``moderate``: uniform in [-3, 3], the size of unit-normal scores, so a
    kernel that drops the sink, or adds it to the numerator, is far off.
    ``large``: heads alternate between about +60 and -60: the sink takes
    nearly all the weight (outputs near zero, and ``exp(60)`` overflows
    float16, so the max must include the sink) or none of it.
    """
    if kind == "moderate":
        return rng.uniform(-3.0, 3.0, num_q_heads).astype(np.float32)
    sign = np.where(np.arange(num_q_heads) % 2 == 0, 1.0, -1.0)
    return (sign * rng.uniform(50.0, 70.0, num_q_heads)).astype(np.float32)


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
    # chunked-local attention: chunks smaller than, equal to and not dividing the block size
    AttentionCase("decode-chunk-lt-block", (1, 5, 6, 16, 17, 40, 33), group=2, chunk_size=5),
    AttentionCase("decode-chunk-eq-block-window", (8, 9, 31, 40), block_size=8, group=4, chunk_size=8,
                  sliding_window=6),
    AttentionCase("prefill-chunk-prefix-crossing", (40, 23, 9), (21, 23, 2), block_size=8, group=2, chunk_size=12),
    AttentionCase("prefill-chunk-window-softcap", (70, 33), (50, 33), group=4, chunk_size=24, sliding_window=20,
                  soft_cap=5.0, scale=1.0),
    # attention sinks
    AttentionCase("decode-sinks-gqa4", (1, 16, 17, 40), group=4, sinks="moderate"),
    AttentionCase("decode-sinks-large-softcap", (30, 17, 2), group=2, soft_cap=5.0, scale=1.0, sinks="large"),
    AttentionCase("prefill-sinks-chunk", (40, 23), (8, 23), block_size=8, group=4, chunk_size=6, sinks="moderate"),
    AttentionCase("prefill-sinks-large-noncausal", (12, 9), (12, 4), block_size=4, causal=False, sinks="large"),
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


def feature_sweep_cases() -> list[AttentionCase]:
    """Chunk sizes and sinks crossed with block sizes, window and soft-cap, decode and prefill (marked slow).

    Chunk sizes per block size ``bs``: 3 (smaller than most blocks, dividing
    none but 1), ``bs`` (equal) and ``bs + bs // 2 + 1`` (larger, not a
    multiple); lengths reach three chunks or blocks, so prefill queries over
    a cached prefix cross chunk boundaries.
    """
    cases = []
    for bs, chunk, sinks, kind, (window, cap) in itertools.product(
            (1, 8, 16, 32), ("small", "block", "odd", None), (None,) + SINK_KINDS, ("decode", "prefill"),
            ((None, None), (10, None), (None, 5.0), (10, 5.0))):
        if chunk is None and sinks is None:
            continue  # the main sweep's ground
        c = {"small": 3, "block": bs, "odd": bs + bs // 2 + 1, None: None}[chunk]
        rng = np.random.default_rng(zlib.crc32(repr((bs, chunk, sinks, kind, window, cap)).encode()))
        hd = int(rng.choice([64, 128]))
        hkv, group = ((2, 1), (2, 4), (1, 8))[int(rng.integers(3))]
        batch = int(rng.choice([1, 5, 17]))
        longest = 3 * max(bs, c or 1) + 2
        lens = tuple(int(n) for n in rng.integers(1, longest + 1, batch))
        qlens = None if kind == "decode" else tuple(int(rng.integers(1, n + 1)) for n in lens)
        name = f"features-{kind}-bs{bs}-chunk{c}-sinks{sinks}-w{window}-cap{cap}"
        cases.append(AttentionCase(name, lens, qlens, bs, hkv, group, hd, window, cap, 1.0 if cap else None,
                                   chunk_size=c, sinks=sinks))
    return cases
