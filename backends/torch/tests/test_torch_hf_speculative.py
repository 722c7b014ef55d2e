"""Speculative decoding through PagedCache: assisted and prompt-lookup decoding, against DynamicCache.

Both feed the main model a verify step of several positions (the last token
and the drafts), then ``crop`` the rejected drafts, so the next verify step
brings again positions the cache once held. The first verify step comes right
after ``begin`` and brings the prompt and the first drafts in one forward
pass. Every comparison is greedy and demands identical token ids (and
float32-close logits, which a degenerate tiny model could not hide behind).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_torch_hf_cache import COMMON, assert_same_generation, paged, tiny  # noqa: E402
from torch_helpers import verify_steps  # noqa: E402

from pagedkv_core.errors import InvalidArgument  # noqa: E402

KINDS = ["llama-gqa", "mistral-sliding", "gemma2-alternating-eager", "gemma4-global-head-dim"]
DRAFTS = dict(num_assistant_tokens=4, num_assistant_tokens_schedule="constant")  # the same drafts in every run


def model_of(kind: str):
    if kind.startswith("gemma4"):
        pytest.importorskip("transformers.models.gemma4", reason="this transformers has no Gemma 4")
        from test_torch_hf_gemma4 import tiny_gemma4

        return tiny_gemma4()
    return tiny(kind)


_assistant: list[object] = []


def assistant():
    """A one-layer Llama over the same 128-token vocabulary: its drafts are sometimes right, mostly not."""
    if not _assistant:
        torch.manual_seed(3)
        config = transformers.LlamaConfig(num_key_value_heads=2, **{**COMMON, "num_hidden_layers": 1})
        _assistant.append(transformers.LlamaForCausalLM(config).eval())
    return _assistant[0]


def lookup_prompt(length: int = 29) -> torch.Tensor:
    """One row that ends with a 3-gram seen earlier: prompt lookup drafts at the very first step."""
    ids = torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(5))
    ids[0, -3:] = ids[0, 4:7]
    ids[0, 12:15] = ids[0, 4:7]  # and a second earlier match, so later steps find drafts too
    return ids


class Recorder:
    """Counts what the verify steps did to a cache: crops, and updates of several positions after one."""

    def __init__(self, cache) -> None:
        self.crops, self.multi_after_crop, cropped = 0, 0, [False]
        crop, update = cache.crop, cache.update

        def recording_crop(n: int) -> None:
            self.crops += n < 0
            cropped[0] = cropped[0] or n < 0
            crop(n)

        def recording_update(k, v, layer_idx, *args, **kwargs):
            if layer_idx == 0 and cropped[0] and k.shape[2] > 1:
                self.multi_after_crop += 1
            return update(k, v, layer_idx, *args, **kwargs)

        cache.crop, cache.update = recording_crop, recording_update


def run(model, ids, cache, **options):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                              do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                              **options)


@pytest.mark.parametrize("begin", [True, False], ids=["begin", "no-begin"])
@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_matches_dynamic_cache(kind, begin):
    model = model_of(kind)
    ids = lookup_prompt()
    options = dict(assistant_model=assistant(), **DRAFTS)
    expected = run(model, ids, transformers.DynamicCache(config=model.config), **options)
    cache = paged(model)
    if begin:
        cache.begin(ids)
    seen = Recorder(cache)
    assert_same_generation(expected, run(model, ids, cache, **options))
    assert seen.crops and seen.multi_after_crop, "the run should crop drafts and verify several again"
    assert cache.get_seq_length() == expected.sequences.shape[1] - 1
    cache.manager.check_invariants()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lookup_drafting_at_the_first_step(kind):
    model = model_of(kind)
    ids = lookup_prompt()
    options = dict(prompt_lookup_num_tokens=3)
    expected = run(model, ids, transformers.DynamicCache(config=model.config), **options)
    cache = paged(model)
    cache.begin(ids)
    assert_same_generation(expected, run(model, ids, cache, **options))
    cache.manager.check_invariants()


def test_speculation_after_a_prefix_cache_hit():
    """transformers feeds the whole prompt at the first verify step: cached positions must be recomputed, not skipped."""
    model = tiny("llama-gqa")
    ids = lookup_prompt(40)
    cache = paged(model)
    cache.begin(ids[:, :34])
    with torch.no_grad():
        model(input_ids=ids[:, :34], past_key_values=cache)  # leaves 32 tokens (two blocks) in the prefix cache
    shared = cache.block_ids(0)[:2]
    for options in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=assistant(), **DRAFTS)):
        expected = run(model, ids, transformers.DynamicCache(config=model.config), **options)
        assert cache.begin(ids, skip_cached=False) == [32] and cache.get_seq_length() == 0
        assert cache.block_ids(0)[:2] == shared
        assert_same_generation(expected, run(model, ids, cache, **options))
    assert cache.begin(ids) == [32] and cache.get_seq_length() == 32
    with pytest.raises(InvalidArgument, match="skip_cached=False"):  # not a silently wrong generation
        run(model, ids, cache, **options)
    assert cache.stats().prefix_hit_tokens == 3 * 32
    cache.manager.check_invariants()


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-sliding"])
def test_verify_steps_by_hand(kind):
    """begin, then the prompt and two drafts at once; crop one; three positions again: logits as DynamicCache's."""
    model = model_of(kind)
    ids = lookup_prompt(20)
    drafts = torch.tensor([[7, 8]])
    caches = [transformers.DynamicCache(config=model.config), paged(model)]
    caches[0].activate_past_recording()  # lets a sliding DynamicCache layer crop past its window
    caches[1].begin(ids)
    logits = verify_steps(model, caches, ids, drafts)
    assert all(cache.get_seq_length() == 20 + 2 - 1 + 3 - 2 + 2 for cache in caches)
    for ours, theirs in zip(logits[1], logits[0], strict=True):
        torch.testing.assert_close(ours, theirs)
    paged_cache = caches[1]
    assert paged_cache.stats().stored_tokens == paged_cache.get_seq_length()
    assert paged_cache.begin(ids) == [16]  # the first block is in the prefix cache now
    with torch.no_grad(), pytest.raises(InvalidArgument, match="expects 4 at 16"):  # less than the prompt's rest
        model(input_ids=ids[:, 17:], past_key_values=paged_cache)
