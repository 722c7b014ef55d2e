"""The mlx-lm adapter against mlx-lm's own KVCache, on a tiny seeded Llama built from ``ModelArgs`` (no downloads).

Every comparison runs the same model twice, once with ``make_prompt_cache``'s
``KVCache`` layers and once with a paged prompt cache, and asks for identical
greedy tokens (and logits within float32 noise).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
from mlx_helpers import import_mlx

from pagedkv_core.errors import InvalidArgument, ShapeMismatch, UnsupportedOperation

mx = import_mlx()
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx-lm)", exc_type=ImportError)

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import gpt2, llama  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    RotatingKVCache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from pagedkv_mlx.mlx_lm_cache import PagedKVCache, load_paged_prompt_cache, make_paged_prompt_cache  # noqa: E402

VOCAB = 128
BLOCK = 16


def tiny_args(**changes) -> llama.ModelArgs:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (head dim 16), vocabulary 128."""
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB)
    return llama.ModelArgs(**{**args, **changes})


def seeded(net, seed: int = 7):
    """Seeded weights with a gain of 3: greedy decoding then varies and depends on the whole context."""
    rng = np.random.default_rng(seed)
    params = [(name, mx.array((rng.standard_normal(p.shape) * 3 / np.sqrt(p.shape[-1])).astype(np.float32)))
              if p.ndim == 2 else (name, p) for name, p in tree_flatten(net.parameters())]
    net.update(tree_unflatten(params))
    mx.eval(net.parameters())
    return net


@pytest.fixture(scope="module")
def model() -> llama.Model:
    return seeded(llama.Model(tiny_args()))


@pytest.fixture(scope="module")
def prompt() -> mx.array:
    return mx.array(np.random.default_rng(11).integers(0, VOCAB, 20))


def argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate(model, prompt, cache, n: int = 64) -> tuple[list[int], np.ndarray]:
    """mlx-lm's own ``generate_step`` loop, greedy: the tokens and their log-probabilities."""
    steps = list(generate_step(prompt, model, max_tokens=n, sampler=argmax, prompt_cache=cache))
    return [t for t, _ in steps], np.stack([np.array(lp) for _, lp in steps])


def greedy(model, cache, inputs: mx.array, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """A hand-written loop over ``model(inputs, cache=...)``: ``[batch, steps]`` tokens and the last logits."""
    out, x, logits = [], inputs, None
    for _ in range(steps):
        logits = model(x, cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        out.append(y)
        x = y[:, None]
    return np.array(mx.stack(out, axis=1)), np.array(logits)


def paged(model, num_blocks: int = 64, **options) -> list[PagedKVCache]:
    return make_paged_prompt_cache(model, num_blocks=num_blocks, block_size=options.pop("block_size", BLOCK),
                                   **options)


def assert_same_logits(ours, theirs) -> None:
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# -- generation ------------------------------------------------------------------------


def test_generate_step_matches_kvcache(model, prompt):
    ref_tokens, ref_logprobs = generate(model, prompt, make_prompt_cache(model))
    cache = paged(model)
    tokens, logprobs = generate(model, prompt, cache)
    assert len(set(ref_tokens)) > 10, "the model should not collapse onto a few tokens"
    assert tokens == ref_tokens
    assert_same_logits(logprobs, ref_logprobs)
    assert [c.offset for c in cache] == [20 + 64] * 2
    assert cache[0].sequences.reserved == 84


def test_trim_then_continue_matches_kvcache(model, prompt):
    ref, cache = make_prompt_cache(model), paged(model)
    assert generate(model, prompt, ref)[0] == generate(model, prompt, cache)[0]
    held = cache[0].nbytes
    assert trim_prompt_cache(cache, 8) == trim_prompt_cache(ref, 8) == 8
    assert [c.offset for c in cache] == [c.offset for c in ref] == [76, 76]
    manager = cache[0].sequences.manager
    assert manager.get_handle(cache[0].sequences.request_ids[0]).num_tokens == 76
    assert cache[0].nbytes == held * 5 // 6  # 84 tokens in 6 blocks, 76 in 5
    manager.check_invariants()
    restart = mx.array([[3, 1, 4]])  # continue from another token than the rolled-back one
    ours, our_logits = greedy(model, cache, restart, 24)
    theirs, their_logits = greedy(model, ref, restart, 24)
    np.testing.assert_array_equal(ours, theirs)
    assert_same_logits(our_logits, their_logits)
    # and through generate_step again, after a rollback across a block boundary
    assert trim_prompt_cache(cache, 20) == trim_prompt_cache(ref, 20) == 20
    assert generate(model, mx.array([9, 9]), cache, 16)[0] == generate(model, mx.array([9, 9]), ref, 16)[0]


def test_batch_rows_are_sequences(model):
    inputs = mx.array(np.random.default_rng(3).integers(0, VOCAB, (2, 23)))
    cache = paged(model, block_size=8)
    ours, our_logits = greedy(model, cache, inputs, 40)
    theirs, their_logits = greedy(model, make_prompt_cache(model), inputs, 40)
    np.testing.assert_array_equal(ours, theirs)
    assert_same_logits(our_logits, their_logits)
    assert len(cache[0].sequences.request_ids) == 2
    with pytest.raises(ShapeMismatch):
        model(inputs[:1, :1], cache=cache)
    assert [c.offset for c in cache] == [62, 62]  # the refused call changed nothing


# -- state, files, bytes --------------------------------------------------------------


def test_state_round_trip(model, prompt):
    ref, cache = make_prompt_cache(model), paged(model)
    generate(model, prompt, ref, 10)
    generate(model, prompt, cache, 10)
    for ours, theirs in zip(cache, ref):
        keys, values, offset = ours.state
        assert offset == theirs.offset == 30
        np.testing.assert_array_equal(np.array(keys), np.array(theirs.state[0][..., :offset, :]))
        np.testing.assert_array_equal(np.array(values), np.array(theirs.state[1][..., :offset, :]))
        assert ours.meta_state == ""
        ours.meta_state = ours.meta_state
        with pytest.raises(InvalidArgument):
            ours.meta_state = ("1",)
    copied = paged(model, block_size=8)  # another block size: the state carries no layout
    for dst, src in zip(copied, cache):
        dst.state = src.state
    from_kv = paged(model)
    for dst, src in zip(from_kv, ref):
        dst.state = src.state  # KVCache's padded buffer and offset
    restart = mx.array([[5]])
    expected = greedy(model, ref, restart, 20)[0]
    np.testing.assert_array_equal(greedy(model, copied, restart, 20)[0], expected)
    np.testing.assert_array_equal(greedy(model, from_kv, restart, 20)[0], expected)
    for layer in copied:  # assigning states again replaces the tokens, it does not append
        layer.state = cache[layer.layer].state
    assert [c.offset for c in copied] == [30, 30]
    assert copied[0].sequences.reserved == 30
    assert paged(model)[0].state == (None, None, 0)


def test_save_and_load_prompt_cache(model, prompt, tmp_path):
    cache, ref = paged(model), make_prompt_cache(model)
    generate(model, prompt, cache, 12)
    generate(model, prompt, ref, 12)
    save_prompt_cache(str(tmp_path / "paged.safetensors"), cache, {"who": "paged"})
    save_prompt_cache(str(tmp_path / "kv.safetensors"), ref)
    loaded, meta = load_paged_prompt_cache(str(tmp_path / "paged.safetensors"), model, num_blocks=32,
                                           block_size=8, return_metadata=True)
    from_kv = load_paged_prompt_cache(str(tmp_path / "kv.safetensors"), model, num_blocks=32)
    assert meta == {"who": "paged"}
    assert [c.offset for c in loaded] == [c.offset for c in from_kv] == [32, 32]
    restart = mx.array([[7, 7]])
    expected = greedy(model, ref, restart, 16)[0]
    np.testing.assert_array_equal(greedy(model, loaded, restart, 16)[0], expected)
    np.testing.assert_array_equal(greedy(model, from_kv, restart, 16)[0], expected)
    rotating = [RotatingKVCache(max_size=8) for _ in model.layers]
    generate(model, prompt, rotating, 2)
    save_prompt_cache(str(tmp_path / "rotating.safetensors"), rotating)
    with pytest.raises(UnsupportedOperation, match="RotatingKVCache"):
        load_paged_prompt_cache(str(tmp_path / "rotating.safetensors"), model, num_blocks=8)


def test_quantized_pool_returns_the_model_dtype(model, prompt):
    cache = paged(model, dtype="int8")
    assert cache[0].sequences.storage.quantized
    tokens, _ = generate(model, prompt, cache, 8)
    assert len(tokens) == 8
    keys, values, offset = cache[0].state
    assert keys.dtype == values.dtype == mx.float32 and keys.shape == (1, 2, offset, 16)
    exact = make_prompt_cache(model)
    generate(model, prompt, exact, 8)
    np.testing.assert_allclose(np.array(keys), np.array(exact[0].state[0][..., :offset, :]), atol=0.05, rtol=0.05)


def test_nbytes_trimmable_and_release(model, prompt):
    cache = paged(model, num_blocks=40)
    sequences = cache[0].sequences
    manager = sequences.manager
    assert all(c.is_trimmable() and c.empty() and c.nbytes == 0 for c in cache)
    generate(model, prompt, cache, 30)  # 50 tokens: 4 blocks of 16
    per_block = manager.config.bytes_per_block
    assert per_block == 2 * 2 * BLOCK * 2 * 16 * 4  # layers * (K, V) * block * kv heads * head dim * float32
    assert [c.nbytes for c in cache] == [4 * per_block // 2] * 2
    assert sum(c.nbytes for c in cache) == 4 * per_block == manager.stats().used_memory_bytes
    assert not cache[0].empty() and cache[0].size() == 50
    assert trim_prompt_cache(cache, 100) == 50  # as KVCache: no more than it holds
    assert all(c.empty() for c in cache) and sum(c.nbytes for c in cache) == 0
    generate(model, prompt, cache, 4)
    sequences.release()
    assert manager.stats().used_blocks == 0 and all(c.offset == 0 for c in cache)
    generate(model, prompt, cache, 4)  # a released cache opens new rows on the next forward
    assert len(manager) == 1
    del cache, sequences
    assert len(manager) == 0, "dropping the layer views frees their sequences"


# -- sharing ----------------------------------------------------------------------------


def test_prompts_that_start_alike_share_prefix_blocks(model):
    rng = np.random.default_rng(5)
    prompt_a = rng.integers(0, VOCAB, 48)
    prompt_b = np.concatenate([prompt_a[:40], rng.integers(0, VOCAB, 5)])
    cache_a = paged(model)
    manager = cache_a[0].sequences.manager
    assert cache_a[0].sequences.admit(prompt_a) == 0
    tokens_a = generate(model, mx.array(prompt_a), cache_a, 16)[0]
    keys_a = [np.array(c.state[0]) for c in cache_a]
    used = manager.stats().used_blocks

    cache_b = make_paged_prompt_cache(model, manager=manager)
    cached = cache_b[0].sequences.admit(prompt_b)
    assert cached == 32  # two full blocks of the 40 shared tokens
    assert [c.offset for c in cache_b] == [32, 32]
    table_a, table_b = cache_a[0].sequences.block_tables()[0], cache_b[0].sequences.block_tables()[0]
    np.testing.assert_array_equal(table_b[:2], table_a[:2])
    assert manager.stats().used_blocks == used + 1  # only prompt_b's third block is new
    tokens_b = generate(model, mx.array(prompt_b[cached:]), cache_b, 32)[0]
    assert tokens_b == generate(model, mx.array(prompt_b), make_prompt_cache(model), 32)[0]
    assert tokens_a == generate(model, mx.array(prompt_a), make_prompt_cache(model), 16)[0]
    for layer, keys in zip(cache_a, keys_a):  # b wrote nothing into a's blocks
        np.testing.assert_array_equal(np.array(layer.state[0]), keys)
    manager.check_invariants()


def test_deepcopy_forks_copy_on_write(model, prompt):
    ref, cache = make_prompt_cache(model), paged(model)
    generate(model, prompt, ref, 4)
    generate(model, prompt, cache, 4)  # 24 tokens: the second block is partly filled
    manager = cache[0].sequences.manager
    used = manager.stats().used_blocks
    twin, ref_twin = copy.deepcopy(cache), copy.deepcopy(ref)
    assert twin[0].sequences is twin[1].sequences is not cache[0].sequences
    assert manager.stats().used_blocks == used  # shared, not copied
    a = greedy(model, twin, mx.array([[1]]), 12)[0]
    b = greedy(model, cache, mx.array([[2]]), 12)[0]
    np.testing.assert_array_equal(a, greedy(model, ref_twin, mx.array([[1]]), 12)[0])
    np.testing.assert_array_equal(b, greedy(model, ref, mx.array([[2]]), 12)[0])
    assert manager.stats().cow_copies == 1  # the first writer copies the shared partial block, the other keeps it
    assert manager.stats().used_blocks == 5  # block 0 shared, then two blocks each
    manager.check_invariants()


def test_deepcopy_of_an_admitted_prompt_keeps_unwritten_slots_apart(model, prompt):
    cache = paged(model)
    assert cache[0].sequences.admit(prompt) == 0  # 20 slots reserved, nothing written yet
    twin = copy.deepcopy(cache)
    assert twin[0].sequences.reserved == 0 and cache[0].sequences.reserved == 20
    other = mx.array(np.random.default_rng(2).integers(0, VOCAB, 20))
    assert generate(model, other, twin, 8)[0] == generate(model, other, make_prompt_cache(model), 8)[0]
    assert generate(model, prompt, cache, 8)[0] == generate(model, prompt, make_prompt_cache(model), 8)[0]


# -- refusals and imports ---------------------------------------------------------------


def test_refusals(model, prompt):
    cache = paged(model)
    generate(model, prompt, cache, 2)
    with pytest.raises(InvalidArgument):
        cache[0].sequences.admit([1, 2, 3])
    with pytest.raises(ShapeMismatch):
        cache[0].update_and_fetch(mx.zeros((1, 3, 1, 16)), mx.zeros((1, 3, 1, 16)))
    with pytest.raises(InvalidArgument):
        make_paged_prompt_cache(model)

    class KeepsFirstTokens(llama.Model):  # tokens that never leave the window: no layer group says that
        def make_cache(self):
            return [RotatingKVCache(max_size=8, keep=4) for _ in self.layers]

    with pytest.raises(UnsupportedOperation, match=r"RotatingKVCache\(keep=4\)"):
        make_paged_prompt_cache(KeepsFirstTokens(tiny_args()), num_blocks=8)
    with pytest.raises(ShapeMismatch):
        make_paged_prompt_cache(llama.Model(tiny_args(num_key_value_heads=4)), manager=cache[0].sequences.manager)


def test_shape_overrides_for_a_model_named_otherwise(prompt):
    """mlx-lm's gpt2 names its heads ``n_head`` under ``attn``: the shapes cannot be read, the overrides say them."""
    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_positions=128,
                          layer_norm_epsilon=1e-5, vocab_size=VOCAB, num_key_value_heads=None)
    net = seeded(gpt2.Model(args))
    with pytest.raises(InvalidArgument, match="num_kv_heads= and head_dim="):
        make_paged_prompt_cache(net, num_blocks=16)
    cache = make_paged_prompt_cache(net, num_blocks=16, num_kv_heads=4, head_dim=16)
    assert (cache[0].sequences.config.num_kv_heads, cache[0].sequences.config.head_dim) == (4, 16)
    tokens, logprobs = generate(net, prompt, cache, 24)
    ref_tokens, ref_logprobs = generate(net, prompt, make_prompt_cache(net), 24)
    assert len(set(ref_tokens)) > 5 and tokens == ref_tokens
    assert_same_logits(logprobs, ref_logprobs)
    with pytest.raises(ShapeMismatch):  # an override that does not match the model fails at the first write
        generate(net, prompt, make_paged_prompt_cache(net, num_blocks=16, num_kv_heads=4, head_dim=8), 1)


def test_importing_the_backend_does_not_import_mlx_lm():
    code = ("import sys, pagedkv_mlx, pagedkv_mlx.mlx_lm_cache, pagedkv_mlx.backend; "
            "assert 'mlx_lm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('mlx_lm'))")
    subprocess.run([sys.executable, "-c", code], check=True)
