"""Gemma 4's layers of two K/V shapes (``global_head_dim``) in one PagedCache, against DynamicCache.

The full-attention layers of a Gemma 4 config have ``global_head_dim`` (and,
with ``attention_k_eq_v``, ``num_global_key_value_heads``) where the sliding
ones have ``head_dim``; reading ``config.head_dim`` then raises transformers'
``RuntimeError``. The adapter reads shapes per layer and packs the wider or
narrower layers into one pool (:mod:`pagedkv_torch.hf_pool`).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gemma4 = pytest.importorskip("transformers.models.gemma4", reason="this transformers has no Gemma 4")

from test_torch_hf_cache import assert_same_generation, generate, paged, prompts  # noqa: E402

from pagedkv_core.config import CacheConfig  # noqa: E402
from pagedkv_core.errors import ShapeMismatch, UnsupportedOperation  # noqa: E402
from pagedkv_core.manager.facade import PagedKvCacheManager  # noqa: E402
from pagedkv_torch.hf_cache import PagedCache  # noqa: E402
from pagedkv_torch.hf_pool import layer_kv_shapes, pack, pool_shape, unpack  # noqa: E402
from pagedkv_torch.storage import TorchStorage  # noqa: E402

GLOBAL_KV = {"global-head-dim": {}, "k-eq-v-one-global-head": dict(attention_k_eq_v=True, num_global_key_value_heads=1)}


def gemma4_config(**changes):
    """3 layers (sliding, sliding, full); sliding layers 2 KV heads of 16, the full one ``global_head_dim`` 32."""
    options = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, max_position_embeddings=256,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return gemma4.Gemma4TextConfig(**{**options, **changes})


_built: dict[str, object] = {}


def tiny_gemma4(variant: str = "global-head-dim"):
    if variant not in _built:
        torch.manual_seed(0)
        _built[variant] = gemma4.Gemma4ForCausalLM(gemma4_config(**GLOBAL_KV[variant])).eval()
    return _built[variant]


@pytest.mark.parametrize("variant", list(GLOBAL_KV))
def test_layers_of_two_head_dims_match_dynamic_cache(variant):
    model = tiny_gemma4(variant)
    with pytest.raises(RuntimeError):  # what from_model_config used to run into
        model.config.head_dim  # noqa: B018
    shapes = layer_kv_shapes(model.config)
    assert shapes[:2] == [(2, 16)] * 2 and shapes[2] == ((1, 32) if "k-eq-v" in variant else (2, 32))
    ids, mask = prompts()
    cache = paged(model)
    assert (cache.storage.config.num_kv_heads, cache.storage.config.head_dim) == pool_shape(shapes)
    cache.begin(ids, mask)
    assert_same_generation(generate(model, ids, mask, transformers.DynamicCache(config=model.config),
                                    max_new_tokens=24),
                           generate(model, ids, mask, cache, max_new_tokens=24))
    cache.manager.check_invariants()


def test_prefix_sharing_and_beams_across_head_dims():
    model = tiny_gemma4()
    ids, mask = prompts(lengths=(40, 37), shared=32)
    cache = paged(model, num_blocks=96)
    assert cache.begin(ids, mask) == [0, 32]
    options = dict(max_new_tokens=8, num_beams=2, output_logits=False, output_scores=True)
    ref = generate(model, ids, mask, transformers.DynamicCache(config=model.config), **options)
    assert torch.equal(ref.sequences, generate(model, ids, mask, cache, **options).sequences)


def test_packing_round_trips():
    x = torch.randn(5, 2, 16)
    packed = pack(x, (4, 16))
    assert packed.shape == (5, 4, 16) and not packed[:, 2:].any()
    assert torch.equal(unpack(packed[None], (2, 16))[0], x)
    assert torch.equal(unpack(pack(torch.ones(3, 1, 32), (2, 16)), (1, 32)), torch.ones(3, 1, 32))
    assert pool_shape([(16, 256)] * 5 + [(4, 512)]) == (16, 256)  # wide sliding layers: only the global one padded
    assert pool_shape([(2, 16), (2, 16)]) == (2, 16)


def test_a_pool_too_narrow_or_shared_kv_layers_are_refused():
    model = tiny_gemma4()
    narrow = CacheConfig(num_layers=3, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=16)
    with pytest.raises(ShapeMismatch, match="layers \\[2\\]"):
        PagedCache(PagedKvCacheManager(TorchStorage(narrow)), model.config)
    with pytest.raises(UnsupportedOperation, match="num_kv_shared_layers"):
        PagedCache.from_model_config(gemma4_config(num_hidden_layers=4, num_kv_shared_layers=2,
                                                   layer_types=["sliding_attention", "full_attention"] * 2),
                                     num_blocks=8)


def test_int8_pool_with_packed_layers_stays_close():
    model = tiny_gemma4()
    ids, mask = prompts()
    cache = paged(model, dtype="int8")
    cache.begin(ids, mask)
    ref = generate(model, ids, mask, transformers.DynamicCache(config=model.config), max_new_tokens=4)
    out = generate(model, ids, mask, cache, max_new_tokens=4)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=0, atol=5e-2)
