"""The ``"pagedkv"`` attention implementation (:mod:`pagedkv_torch.hf_attention`) against transformers' own.

Every model is a tiny one built from a config with seeded random weights.
Each comparison generates greedily twice with the same weights: once with
``DynamicCache`` and transformers' SDPA (eager where the model soft-caps),
once with a :class:`PagedCache` and ``attn_implementation="pagedkv"``; token
ids must be identical and the logits float32-close. Left-padded batches of
prompts of different lengths, admitted with ``begin``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagedkv_torch import hf_attention  # noqa: E402
from pagedkv_torch.hf_attention import register_attention  # noqa: E402
from pagedkv_torch.hf_cache import PagedCache  # noqa: E402
from pagedkv_torch.hf_pool import LayerPools  # noqa: E402

register_attention()

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {  # name -> (config, reference attention)
    "llama-gqa": (lambda: transformers.LlamaConfig(num_key_value_heads=2, **COMMON), "sdpa"),
    "mistral-sliding": (lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, **COMMON),
                        "sdpa"),
    "gemma3-hybrid": (lambda: transformers.Gemma3TextConfig(
        num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], **COMMON), "sdpa"),
    "gemma2-softcap": (lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                         **COMMON), "eager"),
    "gpt-oss-sinks": (lambda: transformers.GptOssConfig(
        num_key_value_heads=2, head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], **COMMON), "eager"),
    "llama4-chunked": (lambda: transformers.Llama4TextConfig(
        num_key_value_heads=2, head_dim=16, attention_chunk_size=8, num_local_experts=2, interleave_moe_layer_step=2,
        intermediate_size_mlp=128, **dict(COMMON, num_hidden_layers=4)), "sdpa"),
}
CHUNKED_LAYERS = {"llama4-chunked": 3}  # layers that gather (chunks count in padded positions), per step
NEW_TOKENS = 12


def build(name: str):
    make, reference = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="pagedkv").eval()
    for layer in model.model.layers:
        sinks = getattr(layer.self_attn, "sinks", None)
        if sinks is not None:  # learned sinks large enough to matter
            with torch.no_grad():
                sinks.normal_(0.0, 2.0)
    return model, reference


def prompts(lengths=(14, 9, 5), width=14, seed=1):
    """Left-padded ``[rows, width]`` prompts of the given lengths, and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def generate(model, cache, ids, mask, **options):
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                         **options)
    return out.sequences, torch.stack(out.logits, 1)


def reference(model, implementation, ids, mask, **options):
    model.set_attn_implementation(implementation)
    try:
        return generate(model, transformers.DynamicCache(config=model.config), ids, mask, **options)
    finally:
        model.set_attn_implementation("pagedkv")


def paged(model, ids, mask, *, dtype=None, implementation=None, **options):
    """Generate through a fresh ``PagedCache`` (pool ``dtype``: the model's when ``None``), optionally switching
    the model's attention ``implementation`` first."""
    if implementation is not None:
        model.set_attn_implementation(implementation)
    cache = PagedCache.from_model_config(model.config, num_blocks=128, block_size=4, dtype=dtype)
    cache.begin(ids, mask)
    return generate(model, cache, ids, mask, **options)


@pytest.fixture
def gathers(monkeypatch):
    """Counts ``LayerPools.gather`` calls (the per-layer gather the "pagedkv" attention avoids)."""
    count = [0]
    original = LayerPools.gather

    def counted(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LayerPools, "gather", counted)
    return count


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_dynamic_cache(name, gathers):
    model, implementation = build(name)
    ids, mask = prompts()
    want_ids, want_logits = reference(model, implementation, ids, mask)
    gathers[0] = 0
    got_ids, got_logits = paged(model, ids, mask)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert gathers[0] == CHUNKED_LAYERS.get(name, 0) * NEW_TOKENS  # the others read the pool, prefill and decode


@pytest.mark.parametrize("lengths", [(14, 9, 5), (14, 14, 14)], ids=["left-padded", "no-padding"])
def test_decode_never_gathers(monkeypatch, lengths):
    """Neither prefill nor decode gathers (without padding transformers passes no mask: SDPA's is_causal)."""
    model, _ = build("llama-gqa")
    ids, mask = prompts(lengths)
    want, _ = reference(model, "sdpa", ids, mask)

    def refuse(*args, **kwargs):
        raise AssertionError("gathered K/V in pagedkv attention mode")

    monkeypatch.setattr(LayerPools, "gather", refuse)
    got, _ = paged(model, ids, mask)
    assert torch.equal(got, want)


def test_shared_prefix_and_beams_match(gathers):
    model, _ = build("llama-gqa")
    ids, mask = prompts((14, 14, 9), seed=3)
    ids[1] = ids[0]  # row 1 shares row 0's blocks
    want, _ = reference(model, "sdpa", ids, mask, num_beams=2)
    got, _ = paged(model, ids, mask, num_beams=2)
    assert torch.equal(got, want)


def test_mask_with_a_hole_falls_back_to_the_gather(gathers):
    """A row whose mask hides a stored token: the kernel cannot mask it, so decode layers gather, exactly as before.

    (The prefill attends to the K/V in hand with transformers' mask, holes included.)"""
    model, _ = build("llama-gqa")
    ids, mask = prompts()
    mask[0, 6] = 0  # a hole after row 0's first token: stored, and masked by transformers only
    want_ids, want_logits = reference(model, "sdpa", ids, mask)
    gathers[0] = 0
    got_ids, got_logits = paged(model, ids, mask)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert gathers[0] == 2 * (NEW_TOKENS - 1)  # every layer of every decode step


def test_switching_back_to_sdpa_gathers_again(gathers):
    model, _ = build("llama-gqa")
    ids, mask = prompts()
    want, _ = reference(model, "sdpa", ids, mask)
    model.set_attn_implementation("sdpa")
    gathers[0] = 0
    got, _ = paged(model, ids, mask)
    assert torch.equal(got, want)
    assert gathers[0] == 2 * NEW_TOKENS


def test_dynamic_cache_under_pagedkv_is_sdpa():
    model, _ = build("llama-gqa")
    ids, mask = prompts()
    want, _ = reference(model, "sdpa", ids, mask)
    got, _ = generate(model, transformers.DynamicCache(config=model.config), ids, mask)
    assert torch.equal(got, want)


def test_a_layer_that_was_not_deferred_takes_what_it_is_given():
    """Keys that no PagedCache deferred (another tensor, another layer) are attended as given: plain SDPA."""
    model, _ = build("llama-gqa")
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    want, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=0.25)
    got, weights = hf_attention.paged_attention_forward(attn, q, k, v, None, scaling=0.25)
    assert weights is None
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-hybrid"])
def test_int8_pool_matches_its_gather(name, gathers):
    """A quantized pool: the kernel dequantizes as the gather does (DynamicCache holds other values)."""
    model, _ = build(name)
    ids, mask = prompts()
    results = {"sdpa": paged(model, ids, mask, dtype="int8", implementation="sdpa")}
    gathers[0] = 0
    results["pagedkv"] = paged(model, ids, mask, dtype="int8", implementation="pagedkv")
    assert gathers[0] == 0
    assert torch.equal(results["pagedkv"][0], results["sdpa"][0])
    torch.testing.assert_close(results["pagedkv"][1], results["sdpa"][1], rtol=1e-4, atol=1e-4)


@pytest.fixture
def prefill_plans(monkeypatch):
    """Counts the kernel plans of steps of several positions (prefills) that the "pagedkv" attention builds."""
    count = [0]
    original = hf_attention._ATTENTION.plan

    def counted(storage, block_tables, seq_lens, query_start_loc=None, **kwargs):
        count[0] += query_start_loc is not None
        return original(storage, block_tables, seq_lens, query_start_loc, **kwargs)

    monkeypatch.setattr(hf_attention._ATTENTION, "plan", counted)
    return count


@pytest.mark.parametrize("lengths", [(14, 9, 5), (14, 14, 14)], ids=["left-padded", "no-padding"])
def test_prefill_with_nothing_cached_attends_to_the_new_kv(prefill_plans, gathers, lengths):
    """Nothing to read back from the pool: the prefill attends to the K/V in hand, as DynamicCache's does."""
    model, _ = build("llama-gqa")
    ids, mask = prompts(lengths)
    want_ids, want_logits = reference(model, "sdpa", ids, mask)
    gathers[0] = 0
    got_ids, got_logits = paged(model, ids, mask)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits[:, 0], want_logits[:, 0], rtol=0, atol=0)  # DynamicCache's very call
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert (prefill_plans[0], gathers[0]) == (0, 0)


def test_a_pool_of_another_dtype_prefills_from_the_pool(prefill_plans):
    """A bfloat16 pool under a float32 model holds rounded K/V: the prefill reads them, as the gather would."""
    model, _ = build("llama-gqa")
    ids, mask = prompts()
    results = {implementation: paged(model, ids, mask, dtype="bfloat16", implementation=implementation)
               for implementation in ("sdpa", "pagedkv")}
    assert prefill_plans[0] == 1  # one cache group, one step
    assert torch.equal(results["pagedkv"][0], results["sdpa"][0])


def test_a_cached_prefix_prefills_from_the_pool(prefill_plans):
    """A prompt whose first blocks are cached brings only its tail: that step reads the prefix from the pool."""
    model, _ = build("llama-gqa")
    ids, mask = prompts((14, 14, 14))
    want, _ = reference(model, "sdpa", ids, mask)
    cache = PagedCache.from_model_config(model.config, num_blocks=128, block_size=4)
    cache.begin(ids, mask)
    generate(model, cache, ids, mask)
    assert prefill_plans[0] == 0
    assert min(cache.begin(ids, mask)) > 0  # the prompts' full blocks are in the prefix cache now
    got, _ = generate(model, cache, ids, mask)
    assert prefill_plans[0] == 1
    assert torch.equal(got, want)
