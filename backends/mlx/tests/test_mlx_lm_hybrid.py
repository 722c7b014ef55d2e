"""The mlx-lm adapter on hybrid models, against mlx-lm's own ``RotatingKVCache`` / ``ChunkedKVCache``.

Tiny seeded models built from each module's ``ModelArgs`` (no downloads):
Gemma 3 and Cohere 2 (sliding windows every few layers), gpt-oss (sliding
and full layers alternating, learned attention sinks), Llama 4 (chunked-local
attention) and Llama with ``layer_types``. Windows and chunks are 8 tokens
over blocks of 4, and every prompt is longer, so blocks really leave the
sliding and chunked groups. The manager's null block, where released table
entries point, is filled with NaN first: a layer that read a released
position would turn the logits into NaN.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from mlx_helpers import import_mlx

from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation
from pagedkv_core.layers import LayerGroup

mx = import_mlx()
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx-lm)", exc_type=ImportError)

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cohere2, gemma3_text, gpt_oss, llama, llama4  # noqa: E402
from mlx_lm.models.cache import ArraysCache, KVCache, save_prompt_cache, trim_prompt_cache  # noqa: E402

from pagedkv_mlx.mlx_lm_cache import (  # noqa: E402
    PagedChunkedKVCache,
    PagedKVCache,
    PagedSlidingKVCache,
    load_paged_prompt_cache,
    make_paged_prompt_cache,
)
from pagedkv_mlx.mlx_lm_groups import model_layer_groups  # noqa: E402

VOCAB = 128
BLOCK = 4
WINDOW = 8  # sliding window and Llama 4 chunk, in tokens


def seeded(net, seed: int = 7):
    """Seeded weights (gain 3) so greedy decoding varies; gpt-oss's attention sinks get random values too."""
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(net.parameters()):
        if p.ndim >= 2:
            p = mx.array((rng.standard_normal(p.shape) * 3 / np.sqrt(p.shape[-1])).astype(np.float32))
        elif name.endswith("sinks"):
            p = mx.array(rng.standard_normal(p.shape).astype(np.float32))
        params.append((name, p))
    net.update(tree_unflatten(params))
    mx.eval(net.parameters())
    return net


def build(arch: str):
    common = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=VOCAB)
    if arch == "gemma3_text":  # 6 layers: sliding, sliding, full, ...: cache groups of 2 layers
        args = gemma3_text.ModelArgs(model_type=arch, num_hidden_layers=6, sliding_window=WINDOW,
                                     sliding_window_pattern=3, query_pre_attn_scalar=16, **common)
        return gemma3_text.Model(args)
    if arch == "cohere2":  # 3 sliding layers, then a full one
        return cohere2.Model(cohere2.ModelArgs(model_type=arch, num_hidden_layers=4, sliding_window=WINDOW,
                                               sliding_window_pattern=4, **common))
    if arch == "gpt_oss":
        return gpt_oss.Model(gpt_oss.ModelArgs(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
                                               sliding_window=WINDOW, **common))
    if arch == "llama4":  # 3 chunked layers, then a full one without RoPE
        text = dict(attention_bias=False, attention_chunk_size=WINDOW, interleave_moe_layer_step=2,
                    intermediate_size_mlp=128, max_position_embeddings=512, model_type="llama4_text",
                    num_experts_per_tok=1, num_hidden_layers=4, num_local_experts=2, rms_norm_eps=1e-5,
                    rope_scaling=None, rope_theta=10000.0, use_qk_norm=True, **common)
        return llama4.Model(llama4.ModelArgs(model_type=arch, text_config=text))
    return llama.Model(llama.ModelArgs(  # "llama": layer_types with one sliding and one full layer
        model_type="llama", num_hidden_layers=2, rms_norm_eps=1e-5, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], **common))


ARCHS = ("gemma3_text", "cohere2", "gpt_oss", "llama4", "llama")
_MODELS: dict[str, object] = {}


def model_of(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = seeded(build(arch))
    return _MODELS[arch]


def argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate(model, prompt, cache, n: int, **options) -> tuple[list[int], np.ndarray]:
    steps = list(generate_step(mx.array(np.asarray(prompt, np.int32)), model, max_tokens=n, sampler=argmax, prompt_cache=cache,
                               **options))
    return [t for t, _ in steps], np.stack([np.array(lp) for _, lp in steps])


def reference(model, tokens, n: int) -> list[int]:
    """Greedy tokens after ``tokens`` with mlx-lm's own cache, from scratch."""
    return generate(model, tokens, model.make_cache(), n)[0]


def poison_null_block(cache) -> None:
    """Fill the null block of every storage layer with NaN: reading a released position then shows."""
    sequences = cache[0].sequences
    storage, null = sequences.storage, sequences.manager.null_block
    c = storage.config
    nan = mx.full((c.block_size, c.num_kv_heads, c.head_dim), float("nan"))
    for layer in range(c.num_layers):
        storage.write(layer, np.arange(null * c.block_size, (null + 1) * c.block_size), nan, nan)


def paged(model, num_blocks: int = 96):
    cache = make_paged_prompt_cache(model, num_blocks=num_blocks, block_size=BLOCK)
    poison_null_block(cache)
    return cache


def prompt_of(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


# -- parity and released blocks ----------------------------------------------------------


@pytest.mark.parametrize("prefill_step", [2048, 5], ids=["one-prefill", "prefill-by-5"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_and_released_blocks(arch, prefill_step):
    model, prompt = model_of(arch), prompt_of(11, 30)
    ref_tokens, ref_logprobs = generate(model, prompt, model.make_cache(), 40, prefill_step_size=prefill_step)
    cache = paged(model)
    tokens, logprobs = generate(model, prompt, cache, 40, prefill_step_size=prefill_step)
    assert len(set(ref_tokens)) > 10, "the model should not collapse onto a few tokens"
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-4, atol=1e-4)

    manager = cache[0].sequences.manager
    manager.check_invariants()
    total = 30 + 40  # generate_step has fed the last token too (it computes one step ahead)
    assert {c.offset for c in cache} == {total}
    held = [manager.blocks_held(g) for g in range(len(manager.groups))]
    for group, count in zip(manager.layout.cache_groups, held):
        # a window of 8 spans at most 3 blocks of 4; a chunk of 8 at most 2 (plus the block being filled)
        assert count == (blocks(total) if not group.drops_blocks else 3 if group.kind == "sliding" else 2)
    uniform = len(held) * blocks(total)  # a uniform cache keeps every position of every group
    assert manager.num_used_blocks == sum(held) < uniform


def test_batch_rows_through_the_model(arch="gemma3_text"):
    model = model_of(arch)
    inputs = mx.array(np.random.default_rng(3).integers(0, VOCAB, (2, 21)))
    outputs = []
    for cache in (model.make_cache(), paged(model)):
        out, x = [], inputs
        for _ in range(24):
            y = mx.argmax(model(x, cache=cache)[:, -1, :], axis=-1)
            out.append(y)
            x = y[:, None]
        outputs.append(np.array(mx.stack(out, axis=1)))
    np.testing.assert_array_equal(outputs[1], outputs[0])
    assert len(cache[0].sequences.request_ids) == 2
    cache[0].sequences.manager.check_invariants()


# -- layer groups ---------------------------------------------------------------------------


def test_layer_groups_mirror_make_cache():
    assert model_layer_groups(model_of("gemma3_text")) == (
        LayerGroup.sliding(WINDOW, [0, 1, 3, 4]), LayerGroup.full([2, 5]))
    assert model_layer_groups(model_of("llama4")) == (
        LayerGroup.chunked_local(WINDOW, [0, 1, 2]), LayerGroup.full([3]))
    cache = make_paged_prompt_cache(model_of("gemma3_text"), num_blocks=16, block_size=BLOCK)
    assert [type(c) for c in cache] == [PagedSlidingKVCache, PagedSlidingKVCache, PagedKVCache] * 2
    layout = cache[0].sequences.manager.layout
    assert layout.slots == 2 and len(layout.cache_groups) == 3  # 4 sliding layers in 2 groups, 2 full in 1
    assert cache[0].max_size == WINDOW and cache[0].keep == 0
    chunked = make_paged_prompt_cache(model_of("llama4"), num_blocks=16, block_size=BLOCK)
    assert [type(c) for c in chunked] == [PagedChunkedKVCache] * 3 + [PagedKVCache]
    assert chunked[0].chunk_size == WINDOW


def test_refusals():
    class Recurrent(llama.Model):
        def make_cache(self):
            return [ArraysCache(2), KVCache()]

    model = model_of("llama")
    with pytest.raises(UnsupportedOperation, match="ArraysCache"):
        make_paged_prompt_cache(Recurrent(model.args), num_blocks=16)
    uniform = make_paged_prompt_cache(llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, vocab_size=VOCAB)), num_blocks=16)
    with pytest.raises(InvalidArgument, match="layer groups"):  # a uniform manager for a sliding model
        make_paged_prompt_cache(model, manager=uniform[0].sequences.manager)
    with pytest.raises(ShapeMismatch):
        make_paged_prompt_cache(model_of("cohere2"), manager=paged(model)[0].sequences.manager)


# -- masks ------------------------------------------------------------------------------------


def test_masks_match_the_keys_returned():
    cache = paged(model_of("llama4"))
    generate(model_of("llama4"), prompt_of(1, 12), cache, 1)  # 12 + 1 tokens: the chunk [8, 16)
    view = cache[0]
    assert view.offset == 13 and view.start_position == 8 and view.size() == 5
    mask = np.array(view.make_mask(3))  # queries 13, 14, 15 over keys 8..15
    expected = np.arange(8, 16)[None, :] <= np.arange(13, 16)[:, None]
    np.testing.assert_array_equal(mask, expected)
    keys, _ = view.update_and_fetch(mx.zeros((1, 2, 3, 16)), mx.zeros((1, 2, 3, 16)))
    assert keys.shape[2] == mask.shape[1]
    sliding = paged(model_of("gemma3_text"))
    generate(model_of("gemma3_text"), prompt_of(1, 12), sliding, 1)
    assert sliding[0].make_mask(1, window_size=WINDOW) is None  # decode: the 8 keys returned are the window
    narrow = np.array(sliding[0].make_mask(1, window_size=3))
    np.testing.assert_array_equal(narrow, np.arange(8) >= 5)  # temporal order: the newest 3 of 8
    assert sliding[0].size() == WINDOW


# -- rollback, forks, prefixes ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma3_text", "llama4"])
def test_trim_stops_where_a_window_let_go(arch):
    model, prompt = model_of(arch), prompt_of(2, 6)
    cache = paged(model)
    history = list(prompt) + generate(model, prompt, cache, 2)[0]  # 8 tokens: nothing released yet
    assert all(c.is_trimmable() for c in cache)
    assert trim_prompt_cache(cache, 3) == 3
    history = history[:-3]
    assert generate(model, [5], cache, 6)[0] == reference(model, history + [5], 6)

    cache = paged(model)
    history = list(prompt_of(4, 30)) + generate(model, prompt_of(4, 30), cache, 10)[0]
    assert not any(c.is_trimmable() for c in cache)
    assert trim_prompt_cache(cache, 1) == 0  # mlx-lm's own helper leaves a cache that cannot trim alone
    lowest = cache[0].sequences.shortest_length()
    assert 0 < lowest < len(history)
    assert [c.trim(100) for c in cache] == [len(history) - lowest] * len(cache)  # every layer stops there
    assert {c.offset for c in cache} == {lowest} == {cache[0].sequences.reserved}
    cache[0].sequences.manager.check_invariants()
    assert generate(model, [7, 9], cache, 8)[0] == reference(model, history[:lowest] + [7, 9], 8)


@pytest.mark.parametrize("arch", ["cohere2", "llama4"])
def test_deepcopy_forks_copy_on_write(arch):
    model, prompt = model_of(arch), prompt_of(6, 26)
    cache = paged(model)
    history = list(prompt) + generate(model, prompt, cache, 5)[0]
    manager = cache[0].sequences.manager
    used = manager.num_used_blocks
    twin = copy.deepcopy(cache)
    assert [type(c) for c in twin] == [type(c) for c in cache]
    assert manager.num_used_blocks == used  # shared, not copied
    assert generate(model, [1], twin, 12)[0] == reference(model, history + [1], 12)
    assert generate(model, [2], cache, 12)[0] == reference(model, history + [2], 12)
    manager.check_invariants()


def test_prompts_that_start_alike_share_prefix_blocks(arch="gpt_oss"):
    model = model_of(arch)
    prompt_a = prompt_of(5, 40)
    prompt_b = np.concatenate([prompt_a[:33], prompt_of(8, 6)])
    cache_a = paged(model)
    assert cache_a[0].sequences.admit(prompt_a) == 0
    assert generate(model, prompt_a, cache_a, 8)[0] == reference(model, prompt_a, 8)
    cache_b = make_paged_prompt_cache(model, manager=cache_a[0].sequences.manager)
    cached = cache_b[0].sequences.admit(prompt_b)
    assert cached == 32  # 8 full blocks; the sliding layers only needed the last window of them
    assert generate(model, prompt_b[cached:], cache_b, 16)[0] == reference(model, prompt_b, 16)
    cache_a[0].sequences.manager.check_invariants()


# -- states and files ---------------------------------------------------------------------------


def test_states_hold_what_a_future_query_reads(tmp_path):
    model, prompt = model_of("gemma3_text"), prompt_of(9, 25)
    cache = paged(model)
    history = list(prompt) + generate(model, prompt, cache, 5)[0]  # 30 tokens
    for layer in cache:
        keys, values, offset = layer.state
        assert offset == 30 and keys.shape == values.shape
        assert keys.shape[2] == (WINDOW - 1 if isinstance(layer, PagedSlidingKVCache) else 30)
    save_prompt_cache(str(tmp_path / "paged.safetensors"), cache)
    loaded = load_paged_prompt_cache(str(tmp_path / "paged.safetensors"), model, num_blocks=64, block_size=8)
    poison_null_block(loaded)
    assert [type(c) for c in loaded] == [type(c) for c in cache] and {c.offset for c in loaded} == {30}
    assert not loaded[0].is_trimmable()  # the sliding layers hold only the window's tail
    expected = reference(model, history + [3], 10)
    assert generate(model, [3], loaded, 10)[0] == expected

    full_history = [KVCache() for _ in model.layers]  # every position of every layer, masks by window
    generate(model, prompt, full_history, 5)
    from_kv = paged(model)
    for dst, src in zip(from_kv, full_history):
        dst.state = src.state
    assert from_kv[0].is_trimmable() and from_kv[0].state[0].shape[2] == WINDOW - 1
    assert generate(model, [3], from_kv, 10)[0] == expected
    with pytest.raises(ShapeMismatch):  # a window's tail cannot fill a full layer
        paged(model)[2].state = cache[0].state


def test_chunked_state_at_a_chunk_boundary(tmp_path):
    model, prompt = model_of("llama4"), prompt_of(3, 28)
    cache = paged(model)
    history = list(prompt) + generate(model, prompt, cache, 4)[0]  # 32 tokens: a new chunk starts
    assert [c.state[0].shape[2] for c in cache] == [0, 0, 0, 32]  # no chunked query reads an older token
    save_prompt_cache(str(tmp_path / "chunked.safetensors"), cache)
    loaded = load_paged_prompt_cache(str(tmp_path / "chunked.safetensors"), model, num_blocks=64, block_size=BLOCK)
    poison_null_block(loaded)
    assert {c.offset for c in loaded} == {32} and loaded[0].start_position == 32
    assert loaded[0].sequences.shortest_length() == 32  # nothing before the chunk was saved: no rollback
    assert generate(model, [3], loaded, 10)[0] == reference(model, history + [3], 10)
