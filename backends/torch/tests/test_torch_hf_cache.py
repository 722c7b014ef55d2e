"""The Hugging Face adapter against transformers' own DynamicCache, on tiny models built from configs.

Every model is built from a config with seeded random weights (no hub
access); each comparison runs the same model twice, once with
``DynamicCache(config=...)`` (what ``generate`` builds by itself) and once
with ``PagedCache``, and demands identical token ids and float32-close logits.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagedkv_core.errors import InvalidArgument, OutOfBlocks, ShapeMismatch, UnsupportedOperation  # noqa: E402
from pagedkv_torch.hf_cache import PagedCache  # noqa: E402
from pagedkv_torch.hf_compat import UnsupportedTransformersVersion, check_transformers_version  # noqa: E402
from pagedkv_torch.hf_layers import _layer_types, layer_windows  # noqa: E402

DynamicCache = transformers.DynamicCache
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama-mha": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, **COMMON)),
    "llama-gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **COMMON)),
    "mistral-sliding": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, **COMMON)),
    "qwen2-hybrid": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON)),
    "gemma2-alternating-eager": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        num_key_value_heads=2, head_dim=16, sliding_window=8, **COMMON)),  # soft-capping: eager attention
}
_built: dict[str, object] = {}


def tiny(kind: str):
    if kind not in _built:
        torch.manual_seed(0)
        _built[kind] = MODELS[kind]().eval()
    return _built[kind]


def prompts(lengths=(20, 15, 9), seed=1, shared=0):
    """Left-padded prompts of different lengths; rows longer than ``shared`` start with the same ``shared`` tokens."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    common = torch.randint(3, 128, (shared,), generator=g)
    for row, n in enumerate(lengths):
        head = common if n > shared else common[:0]
        ids[row, width - n:] = torch.cat([head, torch.randint(3, 128, (n - len(head),), generator=g)])
        mask[row, width - n:] = 1
    return ids, mask


def generate(model, ids, mask, cache, **options):
    kw = dict(attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, **{**kw, **options})


def assert_same_generation(ref, out):
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits or ref.scores, out.logits or out.scores, strict=True):
        torch.testing.assert_close(b, a)  # float32 tolerances


def paged(model, num_blocks=64, **options):
    return PagedCache.from_model_config(model.config, num_blocks=num_blocks, **options)


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_matches_dynamic_cache(kind):
    model = tiny(kind)
    ids, mask = prompts()
    cache = paged(model)
    assert cache.is_sliding == DynamicCache(config=model.config).is_sliding
    cache.begin(ids, mask)
    assert_same_generation(generate(model, ids, mask, DynamicCache(config=model.config)),
                           generate(model, ids, mask, cache))
    stats = cache.stats()
    assert (stats.sequences, stats.seq_length, stats.padding_skipped) == (3, 20 + 63, 5 + 11)
    assert stats.stored_tokens == (20 + 15 + 9) + 3 * 63  # padding is not stored
    cache.manager.check_invariants()


def test_generate_without_begin_stores_the_padded_rows():
    model = tiny("llama-gqa")
    ids, mask = prompts()
    cache = paged(model)
    assert_same_generation(generate(model, ids, mask, DynamicCache(config=model.config)),
                           generate(model, ids, mask, cache))
    assert cache.stats().stored_tokens == 3 * (20 + 63)


@pytest.mark.parametrize("shared", [0, 16], ids=["distinct", "cached-prefix"])
def test_manual_forward_loop_matches_dynamic_cache(shared):
    model = tiny("qwen2-hybrid")
    ids, mask = prompts(lengths=(20, 18, 17), shared=shared)
    caches = [DynamicCache(config=model.config), paged(model)]
    if shared:  # an earlier request left the common prefix in the manager's prefix cache
        caches[1].begin(ids[:1], mask[:1])
        with torch.no_grad():
            model(input_ids=ids[:1], past_key_values=caches[1])
    caches[1].begin(ids, mask)
    assert caches[1].get_seq_length() == shared  # already there for every row: not fed again
    logits = []
    with torch.no_grad():
        for cache in caches:
            done = cache.get_seq_length()
            tokens, attn, steps = ids[:, done:], mask, []
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, done:]
            for _ in range(24):
                out = model(input_ids=tokens, attention_mask=attn, position_ids=positions, past_key_values=cache)
                steps.append(out.logits[:, -1])
                tokens = out.logits[:, -1:].argmax(-1)
                attn = torch.cat([attn, torch.ones_like(tokens)], dim=1)
                positions = positions[:, -1:] + 1
            logits.append(steps)
    for a, b in zip(*logits, strict=True):
        torch.testing.assert_close(b, a)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == 20 + 23
    assert caches[1].stats().prefix_hit_tokens == 3 * shared


def test_prompts_that_start_alike_share_blocks():
    model = tiny("llama-gqa")
    ids, mask = prompts(lengths=(40, 37, 9), shared=32)  # the third row shares nothing
    cache = paged(model)
    assert cache.begin(ids, mask) == [0, 32, 0]
    assert cache.block_ids(0)[:2] == cache.block_ids(1)[:2]
    assert not set(cache.block_ids(0)) & set(cache.block_ids(2))
    assert_same_generation(generate(model, ids, mask, DynamicCache(config=model.config)),
                           generate(model, ids, mask, cache))
    stats = cache.stats()
    assert (stats.prefix_hit_tokens, stats.shared_blocks) == (32, 2)
    assert cache.manager.stats().prefix_hits == 32
    # a later batch finds the prefix in the manager's cache after the rows are gone
    cache.release()
    assert cache.manager.stats().active_caches == 0
    later, later_mask = prompts(lengths=(35,), shared=32)
    assert cache.begin(later, later_mask) == [32]
    assert cache.get_seq_length() == 32  # generate feeds only the 3 new positions through the model
    assert_same_generation(generate(model, later, later_mask, DynamicCache(config=model.config)),
                           generate(model, later, later_mask, cache))


def test_positions_from_padding_are_refused_when_sharing():
    model = tiny("llama-gqa")
    ids, mask = prompts(lengths=(40, 37), shared=32)
    cache = paged(model)
    cache.begin(ids, mask)
    with torch.no_grad(), pytest.raises(InvalidArgument, match="position ids"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)  # positions count padding
    assert cache.stats().sequences == 0 and cache.manager.stats().used_blocks == 0
    cache.manager.check_invariants()


def test_beam_search_and_return_sequences_fork_rows():
    model = tiny("mistral-sliding")
    ids, mask = prompts()
    cache = paged(model, num_blocks=128)
    cache.begin(ids, mask)
    options = dict(max_new_tokens=16, num_beams=3, num_return_sequences=2, output_logits=False, output_scores=True)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **options)
    out = generate(model, ids, mask, cache, **options)
    assert torch.equal(ref.sequences, out.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores)
    assert cache.stats().sequences == 9 and cache.manager.counters["cow_copies"] > 0
    cache.manager.check_invariants()


def test_crop_through_prompt_lookup_decoding():
    model = tiny("llama-gqa")
    ids, _ = prompts(lengths=(30,))
    ids[0, 15:25] = ids[0, :10]
    cache = paged(model)
    cache.begin(ids)
    options = dict(attention_mask=None, prompt_lookup_num_tokens=3, output_logits=False)
    ref = generate(model, ids, None, DynamicCache(config=model.config), **options)
    assert torch.equal(ref.sequences, generate(model, ids, None, cache, **options).sequences)
    assert cache.get_seq_length() == ref.past_key_values.get_seq_length()
    cache.crop(-10)
    assert cache.get_seq_length() == ref.past_key_values.get_seq_length() - 10
    assert cache.stats().stored_tokens == cache.get_seq_length()


def test_generate_continues_a_conversation():
    model = tiny("llama-gqa")
    ids, mask = prompts()
    caches = [DynamicCache(config=model.config), paged(model)]
    caches[1].begin(ids, mask)
    first = [generate(model, ids, mask, c, max_new_tokens=8) for c in caches]
    turn = torch.cat([first[0].sequences, torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(7))], 1)
    turn_mask = torch.cat([mask, torch.ones((3, turn.shape[1] - mask.shape[1]), dtype=mask.dtype)], 1)
    assert_same_generation(*[generate(model, turn, turn_mask, c, max_new_tokens=8) for c in caches])


def test_int8_pool_stays_close():
    model = tiny("llama-gqa")
    ids, mask = prompts()
    cache = paged(model, dtype="int8")
    cache.begin(ids, mask)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), max_new_tokens=4)
    out = generate(model, ids, mask, cache, max_new_tokens=4)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=0, atol=2e-2)


def test_bad_use_fails_clearly_and_leaks_nothing():
    model = tiny("llama-gqa")
    ids, mask = prompts()
    cache = paged(model)
    with pytest.raises(InvalidArgument, match="attend to no token"):
        cache.begin(ids, torch.zeros_like(mask))
    cache.begin(ids, mask)
    with torch.no_grad(), pytest.raises(InvalidArgument, match="expects 20 at 0"):
        model(input_ids=ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache)
    with pytest.raises(ShapeMismatch, match="KV heads"):
        cache.update(torch.zeros(3, 4, 20, 16), torch.zeros(3, 4, 20, 16), 0)
    with pytest.raises(UnsupportedOperation, match="whole sequences"):
        cache.layers[0].crop(-1)
    with pytest.raises(ValueError, match="positive"):
        cache.crop(3)
    small = paged(model, num_blocks=3)
    with pytest.raises(OutOfBlocks):
        small.begin(ids, mask)
    assert small.manager.stats().used_blocks == 0 and small.stats().sequences == 0
    small.manager.check_invariants()
    cache.release()
    assert cache.manager.stats().used_blocks == 0


@pytest.mark.parametrize("kind", list(MODELS))
def test_layer_kinds_follow_dynamic_cache(kind):
    config = tiny(kind).config
    expected = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=config).layers]
    assert layer_windows(config) == expected
    types, kwargs = _layer_types(config)  # the fallback for releases without get_layer_types_and_kwargs
    assert [kw.get("sliding_window") for kw in kwargs] == expected
    unusual = transformers.LlamaConfig(**COMMON)
    unusual.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedOperation, match="linear_attention"):
        layer_windows(unusual)


def test_version_range():
    for good in ("5.0.0", "5.23.0", "5.99.1.dev0"):
        check_transformers_version(good)
    for bad in ("4.57.1", "6.0.0", "unknown"):
        with pytest.raises(UnsupportedTransformersVersion, match="transformers") as info:
            check_transformers_version(bad)
        assert isinstance(info.value, ImportError)


def test_importing_the_backend_does_not_import_transformers():
    code = "import sys, pagedkv_torch, pagedkv_torch.plugin, pagedkv_torch.hf_compat; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
