"""A tiny decoder-only transformer with seeded random weights: the host half of the demo's model.

Embeddings, projections, RoPE, RMSNorm, the SwiGLU MLP and the logits are
plain NumPy. Attention is *injected* (``attend(layer, q, k, v)``), so one
implementation of the model serves both the paged run, where K/V go into a
backend's block pool and attention reads them back through block tables,
and the cache-free float64 reference that checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ModelConfig", "TinyDecoder", "AttendFn"]

AttendFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``attend(layer, q [n, q_heads, d], k [n, kv_heads, d], v [n, kv_heads, d]) -> [n, q_heads, d]``.

``k`` and ``v`` are the new tokens' keys (RoPE applied) and values; the
function owns where they are kept and which earlier tokens each query sees.
"""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of the demo model (Llama-like: pre-norm, RoPE, grouped-query attention, SwiGLU)."""

    vocab_size: int = 512
    hidden_size: int = 512
    num_layers: int = 4
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    normed: np.ndarray = x / np.sqrt(ms + eps) * weight
    return normed


def _silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x) through tanh: no overflow warning for large negative x in float32
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


@dataclass(frozen=True, slots=True)
class _Layer:
    attn_norm: np.ndarray  # [hidden]
    wqkv: np.ndarray  # [hidden, (q_heads + 2 * kv_heads) * head_dim]
    wo: np.ndarray  # [q_heads * head_dim, hidden]
    mlp_norm: np.ndarray  # [hidden]
    w_gate_up: np.ndarray  # [hidden, 2 * intermediate]
    w_down: np.ndarray  # [intermediate, hidden]


class TinyDecoder:
    """The weights and every non-attention computation of the demo model, in one dtype.

    ``create(config, seed)`` builds float32 weights; ``astype(np.float64)``
    gives the same values in float64 for the reference.
    """

    def __init__(self, config: ModelConfig, embedding: np.ndarray, layers: tuple[_Layer, ...],
                 final_norm: np.ndarray, w_out: np.ndarray) -> None:
        self.config = config
        self.embedding = embedding
        self.layers = layers
        self.final_norm = final_norm
        self.w_out = w_out
        self.dtype = embedding.dtype
        half = config.head_dim // 2
        self._inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)

    @classmethod
    def create(cls, config: ModelConfig | None = None, seed: int = 0) -> TinyDecoder:
        """Random weights from ``seed``, scaled so activations stay O(1) through the layers.

        Queries are doubled so attention scores spread (std about 2) and each
        query leans on a few keys: a wrong or stale block then changes the
        output, which is what the self-check must notice. Logits come out
        with a spread of about 1 (see ``selfcheck`` on why scaling them would
        not make float32 and float64 agree more often).
        """
        c = config or ModelConfig()
        rng = np.random.default_rng(seed)
        h, d = c.hidden_size, c.head_dim
        qd, kvd = c.num_q_heads * d, c.num_kv_heads * d

        def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
            return (rng.standard_normal(shape) * std).astype(np.float32)

        layers = []
        depth = 1.0 / np.sqrt(2 * c.num_layers)
        for _ in range(c.num_layers):
            wqkv = normal((h, qd + 2 * kvd), h ** -0.5)
            wqkv[:, :qd] *= 2.0
            layers.append(_Layer(
                attn_norm=1.0 + normal((h,), 0.1),
                wqkv=wqkv,
                wo=normal((qd, h), qd ** -0.5 * depth),
                mlp_norm=1.0 + normal((h,), 0.1),
                w_gate_up=normal((h, 2 * c.intermediate_size), h ** -0.5),
                w_down=normal((c.intermediate_size, h), c.intermediate_size ** -0.5 * depth),
            ))
        return cls(c, normal((c.vocab_size, h), 1.0), tuple(layers), 1.0 + normal((h,), 0.1),
                   normal((h, c.vocab_size), h ** -0.5))

    def astype(self, dtype: np.dtype | type) -> TinyDecoder:
        """The same weights in another float dtype (float64 for the reference)."""
        layers = tuple(_Layer(*(getattr(layer, f).astype(dtype) for f in _Layer.__dataclass_fields__))
                       for layer in self.layers)
        return TinyDecoder(self.config, self.embedding.astype(dtype), layers, self.final_norm.astype(dtype),
                           self.w_out.astype(dtype))

    # -- pieces ---------------------------------------------------------------------------

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate ``x [n, heads, head_dim]`` by its tokens' absolute ``positions [n]`` (rotate-half form).

        Angles are computed in float64 whatever the model dtype, so positions
        in the hundreds lose no precision.
        """
        angles = np.asarray(positions, np.float64)[:, None] * self._inv_freq[None, :]
        cos = np.cos(angles).astype(self.dtype)[:, None, :]
        sin = np.sin(angles).astype(self.dtype)[:, None, :]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """``hidden [n, hidden_size]`` (the last layer's residual stream) -> ``[n, vocab]``."""
        logits: np.ndarray = _rms_norm(hidden, self.final_norm, self.config.rms_eps) @ self.w_out
        return logits

    def forward(self, tokens: np.ndarray, positions: np.ndarray, attend: AttendFn) -> np.ndarray:
        """Run every layer over ``tokens [n]`` at ``positions [n]``; returns the residual stream ``[n, hidden]``.

        The tokens may belong to several sequences: only ``attend`` knows
        which keys each query sees.
        """
        c = self.config
        n, d = len(tokens), c.head_dim
        qd, kvd = c.num_q_heads * d, c.num_kv_heads * d
        x = self.embedding[np.asarray(tokens, np.int64)]
        for i, layer in enumerate(self.layers):
            qkv = _rms_norm(x, layer.attn_norm, c.rms_eps) @ layer.wqkv
            q = self.rope(qkv[:, :qd].reshape(n, c.num_q_heads, d), positions)
            k = self.rope(qkv[:, qd:qd + kvd].reshape(n, c.num_kv_heads, d), positions)
            v = np.ascontiguousarray(qkv[:, qd + kvd:].reshape(n, c.num_kv_heads, d))
            out = attend(i, q, k, v)
            x = x + out.reshape(n, qd).astype(self.dtype, copy=False) @ layer.wo
            gate, up = np.split(_rms_norm(x, layer.mlp_norm, c.rms_eps) @ layer.w_gate_up, 2, axis=-1)
            x = x + (_silu(gate) * up) @ layer.w_down
        return x
