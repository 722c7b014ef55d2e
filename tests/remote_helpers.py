"""A toy serving step for remote-tier tests: deterministic K/V, one admission, attention over the result.

Used by the in-process tests, the two-process worker and the scale-out
benchmark, so all of them compute exactly the same thing.
"""

from __future__ import annotations

import numpy as np

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager
from pagedkv_core.plugins import default_registry
from pagedkv_core.remote import BlockTier, LayoutFingerprint

NUM_Q_HEADS = 4


def config(dtype: str = "float32", **overrides) -> CacheConfig:
    values = dict(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=64, block_size=4, dtype=dtype)
    values.update(overrides)
    return CacheConfig(**values)


def manager(cfg: CacheConfig, store=None, *, backend: str = "numpy", model_id: str = "toy",
            secret: bytes = b"test-secret", **options) -> PagedKvCacheManager:
    """A manager on ``backend`` with a remote tier over ``store`` attached (none if ``store`` is None)."""
    m = PagedKvCacheManager(default_registry().get(backend).create_storage(cfg, "cpu"))
    if store is not None:
        tier = BlockTier(store, LayoutFingerprint.for_manager(m, model_id), tenant_secret=secret)
        m.attach_remote(tier, **options)
    return m


class ToyModel:
    """K/V that depend only on (token, position, layer), as a real model's would on the prefix."""

    def __init__(self, cfg: CacheConfig, vocab: int = 5000, positions: int = 4096, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self.tokens = rng.standard_normal((vocab,) + shape).astype(np.float32)
        self.positions = 0.5 * rng.standard_normal((positions,) + shape).astype(np.float32)
        self.query = rng.standard_normal((cfg.num_layers, 1, NUM_Q_HEADS, cfg.head_dim)).astype(np.float32)

    def kv(self, tokens, start: int) -> tuple[np.ndarray, np.ndarray]:
        """``[num_layers, n, kv_heads, head_dim]`` K and V of ``tokens`` at positions ``start...``."""
        t = self.tokens[np.asarray(tokens)]
        p = self.positions[start:start + len(tokens)]
        return (t + p).swapaxes(0, 1), (0.5 * t - p).swapaxes(0, 1)


def serve(m: PagedKvCacheManager, model: ToyModel, request_id: str, tokens, *, salt: str | None = None,
          backend: str = "numpy") -> tuple[int, np.ndarray]:
    """Admit ``tokens``, compute only the tokens the caches lacked, commit; return (cached tokens, output).

    The output is a decode over the whole sequence in every layer
    (``[num_layers, num_q_heads, head_dim]``, float64).
    """
    impl = default_registry().get(backend)
    handle = m.allocate(AllocationRequest(request_id, token_ids=tuple(tokens), cache_salt=salt))
    cached = handle.num_cached_tokens
    meta = m.batch_metadata([request_id], [len(tokens) - cached])
    k, v = model.kv(tokens[cached:], cached)
    kind = "float32" if m.config.quantized else m.config.dtype
    for layer in range(m.config.num_layers):
        m.storage.write(layer, meta.slot_mapping, impl.asarray(k[layer], "cpu", kind),
                        impl.asarray(v[layer], "cpu", kind))
    if m.remote is not None:
        m.remote.commit()
    outputs = []
    for layer in range(m.config.num_layers):
        q = impl.asarray(model.query[layer], "cpu", kind)
        out = impl.attention.decode(q, m.storage, layer, meta.block_tables, meta.seq_lens)
        outputs.append(np.asarray(impl.to_numpy(out), np.float64)[0])
    return cached, np.stack(outputs)
