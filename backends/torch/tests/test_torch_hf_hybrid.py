"""Hybrid models through PagedCache: sliding and chunked layers on a HybridCacheManager, against DynamicCache.

Gemma 3 (text and multimodal), Cohere 2 and gpt-oss mix sliding-window and
full-attention layers; Llama 4 mixes chunked-local and full ones. Each tiny
model is built from a config with seeded random weights, run once with
``DynamicCache(config=...)`` and once with ``PagedCache`` (blocks of 4 tokens,
windows and chunks of 8), and must give identical tokens and float32-close
logits while its sliding and chunked layers hold only a few blocks per row.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_torch_hf_cache import assert_same_generation, generate, prompts  # noqa: E402
from torch_helpers import verify_steps  # noqa: E402

from pagedkv_core.config import CacheConfig  # noqa: E402
from pagedkv_core.errors import InvalidArgument, PagedKvError  # noqa: E402
from pagedkv_core.layers import LayerGroup  # noqa: E402
from pagedkv_core.manager.facade import PagedKvCacheManager  # noqa: E402
from pagedkv_core.manager.hybrid import HybridCacheManager  # noqa: E402
from pagedkv_torch.hf_cache import CropPastWindow, PagedCache  # noqa: E402
from pagedkv_torch.hf_layers import layer_groups, layer_specs  # noqa: E402
from pagedkv_torch.storage import TorchStorage  # noqa: E402

DynamicCache = transformers.DynamicCache
WINDOW, BLOCK = 8, 4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING_3_FULL_1 = ["sliding_attention"] * 3 + ["full_attention"]


def _gemma3_text():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_3_FULL_1, **COMMON))


def _gemma3():
    """The multimodal Gemma 3 (a tiny SigLIP tower) run on text: the adapter reads its text config's layers."""
    text = transformers.Gemma3TextConfig(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW,
                                         layer_types=["sliding_attention", "full_attention"], **COMMON)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127, boi_token_index=125,
        eoi_token_index=126))


def _cohere2():
    return transformers.Cohere2ForCausalLM(transformers.Cohere2Config(
        num_hidden_layers=4, sliding_window=WINDOW, logit_scale=1.0, layer_types=SLIDING_3_FULL_1, **COMMON))


def _gpt_oss():
    """gpt-oss under eager attention, with learned sinks made large enough to matter."""
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], **COMMON))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def _llama4():
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        num_hidden_layers=4, head_dim=16, attention_chunk_size=WINDOW, num_local_experts=2,
        interleave_moe_layer_step=2, intermediate_size_mlp=128, **COMMON))


MODELS = {"gemma3_text": _gemma3_text, "gemma3": _gemma3, "cohere2": _cohere2, "gpt_oss": _gpt_oss,
          "llama4": _llama4}
_built: dict[str, object] = {}


def tiny(kind: str):
    if kind not in _built:
        torch.manual_seed(0)
        _built[kind] = MODELS[kind]().eval()
    return _built[kind]


def paged(model, num_blocks: int = 256, **options) -> PagedCache:
    return PagedCache.from_model_config(model.config, num_blocks=num_blocks, block_size=BLOCK, **options)


def blocks_for(tokens: list[int]) -> int:
    return sum(-(-n // BLOCK) for n in tokens)


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_matches_dynamic_cache_and_frees_out_of_window_blocks(kind):
    model = tiny(kind)
    ids, mask = prompts(lengths=(30, 21, 9))
    cache = paged(model)
    assert isinstance(cache.manager, HybridCacheManager)
    cache.begin(ids, mask)
    assert_same_generation(generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=24),
                           generate(model, ids, mask, cache, max_new_tokens=24))
    manager = cache.manager
    full = blocks_for([30 + 23, 21 + 23, 9 + 23])  # the 24th token is sampled, never fed back
    per_row = -(-WINDOW // BLOCK) + 1  # the window's blocks and the one being filled
    for group in manager.layout.cache_groups:
        held = manager.blocks_held(group.index)
        assert held <= 3 * per_row if group.drops_blocks else held == full
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    windowed = sum(len(g.layers) for g in manager.layout.cache_groups if g.drops_blocks)
    used = manager.num_used_blocks * manager.layout.slots  # blocks of one layer each
    assert used <= full * (layers - windowed) + 3 * per_row * windowed < full * layers  # one table: full x layers
    manager.check_invariants()


def test_one_table_for_every_layer_on_request():
    """hybrid=False keeps the uniform manager (every token stored); the same tokens, over twice the memory."""
    model = tiny("gemma3_text")
    ids, mask = prompts(lengths=(30, 21, 9))
    expected = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=24)
    caches = [paged(model), paged(model, hybrid=False)]
    for cache in caches:
        cache.begin(ids, mask)
        assert_same_generation(expected, generate(model, ids, mask, cache, max_new_tokens=24))
    hybrid, uniform = (c.manager for c in caches)
    assert isinstance(uniform, PagedKvCacheManager) and uniform.stats().used_blocks == blocks_for([53, 44, 32])
    held = [hybrid.num_used_blocks * hybrid.config.bytes_per_block, uniform.stats().used_blocks
            * uniform.config.bytes_per_block]
    assert held[0] * 2 < held[1]  # 54 blocks of one layer against 33 of four
    full_only = transformers.LlamaConfig(num_hidden_layers=2, **COMMON)
    assert isinstance(PagedCache.from_model_config(full_only, num_blocks=8).manager, PagedKvCacheManager)


def poison_free_blocks(cache: PagedCache) -> tuple[set[int], set[int]]:
    """NaN into every block no row holds (released, never used, the null block); returns (held, poisoned)."""
    rows = list(cache.request_ids)
    held = set()
    for meta in cache.manager.batch_metadata(rows, [0] * len(rows)).groups:
        held.update(meta.block_tables[meta.block_tables >= 0].tolist())
    held.discard(cache.manager.null_block)
    free = sorted(set(range(cache.storage.config.num_blocks)) - held)
    cache.storage.k[:, free] = float("nan")
    cache.storage.v[:, free] = float("nan")
    return held, set(free)


@pytest.mark.parametrize("kind", ["gemma3_text", "llama4"])
def test_gathers_never_read_released_blocks(kind):
    """Every block no row holds is NaN before each step: one read would turn the logits NaN."""
    model = tiny(kind)
    ids, mask = prompts(lengths=(26, 17))
    caches = [DynamicCache(config=model.config), paged(model, num_blocks=64)]
    caches[1].begin(ids, mask)
    logits, ever_held, poisoned = [], set(), set()
    with torch.no_grad():
        for cache in caches:
            tokens, attn, steps = ids, mask, []
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            for _ in range(20):
                if isinstance(cache, PagedCache):
                    held, poisoned = poison_free_blocks(cache)
                    ever_held |= held
                out = model(input_ids=tokens, attention_mask=attn, position_ids=positions, past_key_values=cache)
                steps.append(out.logits[:, -1])
                tokens = out.logits[:, -1:].argmax(-1)
                attn = torch.cat([attn, torch.ones_like(tokens)], dim=1)
                positions = positions[:, -1:] + 1
            logits.append(steps)
    for theirs, ours in zip(*logits, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert len(ever_held & poisoned) > 10  # blocks the rows held once, released and poisoned since
    assert caches[1].manager.blocks_held(0) <= 2 * (-(-WINDOW // BLOCK) + 1)  # group 0 is sliding / chunked here


def test_crop_rolls_back_the_last_step_and_refuses_released_positions():
    """Verify steps by hand (prompt and drafts at once, crop, again), then a crop that reaches released blocks."""
    model = tiny("gemma3_text")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    drafts = torch.tensor([[7, 8]])
    caches = [DynamicCache(config=model.config), paged(model)]
    caches[0].activate_past_recording()  # lets transformers' sliding layers crop past their window
    caches[1].begin(ids)
    logits = verify_steps(model, caches, ids, drafts)
    for ours, theirs in zip(logits[1], logits[0], strict=True):
        torch.testing.assert_close(ours, theirs)
    cache = caches[1]
    length, blocks = cache.get_seq_length(), cache.block_ids(0, group=0)
    assert length == 20 + 2 - 1 + 3 - 2 + 2 and blocks[0] == cache.manager.null_block  # released
    with pytest.raises(CropPastWindow, match="released") as info:
        cache.crop(-WINDOW)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, PagedKvError)
    assert (cache.get_seq_length(), cache.block_ids(0, group=0)) == (length, blocks)  # nothing changed
    cache.manager.check_invariants()
    not_recording = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=not_recording)
    with pytest.raises(RuntimeError):  # transformers' own sliding layer refuses too
        not_recording.crop(-WINDOW)


def test_prompt_lookup_decoding_on_chunked_layers():
    """Verify steps across chunk boundaries: crops, several positions again, chunks' blocks released meanwhile."""
    model = tiny("llama4")
    ids = torch.randint(3, 128, (1, 29), generator=torch.Generator().manual_seed(5))
    ids[0, -3:] = ids[0, 4:7]
    ids[0, 12:15] = ids[0, 4:7]
    options = dict(attention_mask=torch.ones_like(ids), prompt_lookup_num_tokens=3, max_new_tokens=24)
    expected = generate(model, ids, None, DynamicCache(config=model.config), **options)
    cache = paged(model)
    cache.begin(ids)
    crops, crop = [], cache.crop
    cache.crop = lambda n: (crops.append(n), crop(n))[1]
    assert_same_generation(expected, generate(model, ids, None, cache, **options))
    assert any(n < 0 for n in crops), "rejected drafts should have been cropped"
    assert cache.get_seq_length() == expected.sequences.shape[1] - 1
    assert cache.manager.blocks_held(0) <= -(-WINDOW // BLOCK) + 2  # the chunk, the last step's drafts
    cache.manager.check_invariants()


def test_prefix_sharing_and_beams_with_released_blocks():
    model = tiny("gemma3_text")
    ids, mask = prompts(lengths=(40, 37, 9), shared=32)
    cache = paged(model)
    assert cache.begin(ids, mask) == [0, 32, 0]
    null = cache.manager.null_block
    # the second row's sliding layers never hold the shared prefix's out-of-window blocks
    assert cache.block_ids(1, group=0)[:6] == [null] * 6 and cache.block_ids(1, group=3)[:8] == cache.block_ids(
        0, group=3)[:8]
    assert_same_generation(generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=16),
                           generate(model, ids, mask, cache, max_new_tokens=16))
    cache.release()
    later, later_mask = prompts(lengths=(35,), shared=32)
    assert cache.begin(later, later_mask) == [32] and cache.get_seq_length() == 32
    options = dict(max_new_tokens=12, num_beams=2, num_return_sequences=2, output_logits=False, output_scores=True)
    ref = generate(model, later, later_mask, DynamicCache(config=model.config), **options)
    out = generate(model, later, later_mask, cache, **options)
    assert torch.equal(ref.sequences, out.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores)
    assert cache.manager.counters["cow_copies"] > 0 and cache.stats().sequences == 2
    cache.manager.check_invariants()


def test_layer_groups_come_from_the_model_config():
    config = tiny("llama4").config
    specs = layer_specs(config)
    assert specs == [("chunked_local", WINDOW)] * 3 + [("full", None)]
    groups = layer_groups(specs)
    assert groups == (LayerGroup.chunked_local(WINDOW, [0, 1, 2]), LayerGroup.full([3]))
    hybrid = CacheConfig(num_layers=4, num_kv_heads=2, head_dim=16, num_blocks=32, block_size=BLOCK,
                         layer_groups=groups)
    manager = HybridCacheManager(TorchStorage(hybrid.storage_config()), hybrid)
    bare = PagedCache(manager)  # no model config: the layout says what each layer is
    assert [layer.sliding_window for layer in bare.layers] == [WINDOW] * 3 + [None]
    assert bare.is_sliding == DynamicCache(config=config).is_sliding
    wrong = CacheConfig(num_layers=4, num_kv_heads=2, head_dim=16, num_blocks=32, block_size=BLOCK,
                        layer_groups=(LayerGroup.sliding(WINDOW, [0, 1, 2]), LayerGroup.full([3])))
    with pytest.raises(InvalidArgument, match="layer 0 is chunked_local"):
        PagedCache(HybridCacheManager(TorchStorage(wrong.storage_config()), wrong), config)
