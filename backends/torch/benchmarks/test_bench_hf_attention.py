"""``generate`` with the "pagedkv" attention against ``DynamicCache``, the gather and ``generate_batch``, on the CPU.

Why these peers: ``DynamicCache`` + SDPA is what a transformers user runs by
default; ``PagedCache`` + SDPA (``gather``) is pagedkv without its kernels
(every layer gathers its whole context each step); transformers' own
continuous batching (``generate_batch``, its paged cache, SDPA over
index-gathered K/V, the only paged attention it has on a CPU) is the other
paged design. The ``pagedkv`` mode is ``PagedCache`` +
``attn_implementation="pagedkv"``: decode reads the pool in place.

Cases (``CASES``; one test id each, e.g. ``-k issue-bfloat16``), seeded random
Llamas, greedy, one torch thread:

* ``small-float32``: 55M parameters (hidden 512, 8 layers, 8 query / 4 KV
  heads of 64, MLP 1,376), 4 left-padded prompts of 512 to 416 tokens, 32 new
  tokens: the quick check (about 3 minutes on 2 cores).
* ``issue-*``: the issue's size: 99.5M parameters (hidden 768, 8 layers, 12
  query / 4 KV heads of 64, MLP 2,048, vocabulary 32,000), 8 prompts of 2,048
  tokens, 128 new tokens, float32 and bfloat16; 2 rounds (12 minutes for both
  on 2 cores; 3 would take 18).
* ``short-*``: the same model, 8 prompts of 128 tokens, 128 new tokens: paging
  must not cost where contexts are short.

The modes alternate round by round (rotating which goes first) after a
warm-up on short prompts; ratios are medians of per-round ratios. Prefill
runs from the call to the first logits (for ``generate_batch``: to the last
request's first token, since it interleaves prefill chunks with decode);
decode from there to the last token, counting the tokens produced in that
span. Tokens/s of the whole call count ``batch x new``. The K/V pools and
``generate_batch``'s persistent manager are built before the timer;
``DynamicCache`` grows inside it, as it does in use. In float32 ``pagedkv``
and ``gather`` must produce DynamicCache's tokens exactly; otherwise the
agreement is reported.

``test_decode_step_breakdown`` times where a decode step goes, per mode, by
wrapping transformers' entry points (see ``Breakdown``).

Run: ``python -m pytest backends/torch/benchmarks/test_bench_hf_attention.py -m benchmark --benchmark-only -s
-p no:cacheprovider`` (add ``-k small`` for the quick case).
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from pagedkv_torch import hf_attention  # noqa: E402
from pagedkv_torch.hf_cache import PagedCache  # noqa: E402
from pagedkv_torch.native_decode import NativeDecodePlan  # noqa: E402

pytestmark = pytest.mark.benchmark

PAGED, GATHER, DYNAMIC, BATCHED = "pagedkv", "gather", "dynamic", "generate_batch"
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
ISSUE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4)
BLOCK, CB_PAGE, CB_BATCH_TOKENS = 16, 256, 2048


@dataclass(frozen=True)
class Case:
    model: dict
    lengths: tuple[int, ...]  # prompt lengths, left padded to the longest
    new: int
    dtype: str
    modes: tuple[str, ...]
    rounds: int = 3


_PEERS = (PAGED, DYNAMIC, BATCHED)
CASES = {
    "small-float32": Case(SMALL, (512, 480, 448, 416), 32, "float32", (PAGED, GATHER, DYNAMIC)),
    "issue-float32": Case(ISSUE, (2048,) * 8, 128, "float32", _PEERS, rounds=2),
    "issue-bfloat16": Case(ISSUE, (2048,) * 8, 128, "bfloat16", _PEERS, rounds=2),
    "short-float32": Case(ISSUE, (128,) * 8, 128, "float32", _PEERS),
    "short-bfloat16": Case(ISSUE, (128,) * 8, 128, "bfloat16", _PEERS),
}


@dataclass(slots=True)
class Run:
    """One call: seconds of the whole call, of prefill and of decode, tokens made in decode, the new tokens,
    and the ``perf_counter`` time the decode began."""

    total: float
    prefill: float
    decode: float
    decode_tokens: int
    tokens: torch.Tensor = field(repr=False)
    decode_start: float = 0.0
    full_until: float = 0.0  # the end of the decode span in which every row still decodes


class _Clock(transformers.LogitsProcessor):
    """Notes when the first logits (those of the prefill) arrive."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


class Bench:
    """One seeded model and batch of a case, and one call per mode."""

    def __init__(self, case: Case) -> None:
        hf_attention.register_attention()
        self.case = case
        config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=None, **case.model)
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=getattr(torch, case.dtype)).eval()
        g = torch.Generator().manual_seed(1)
        width = max(case.lengths)
        self.ids = torch.zeros(len(case.lengths), width, dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for row, n in enumerate(case.lengths):
            self.ids[row, width - n:] = torch.randint(3, 32000, (n,), generator=g)
            self.mask[row, width - n:] = 1
        # twice the pages the batch needs: with too few free pages (its safety margin) the scheduler admits no
        # prefill and decodes the rows one after the other; no block sharing: the same prompts come back every
        # round; no flash (not on a CPU)
        pages = 2 * len(case.lengths) * -(-(width + case.new) // CB_PAGE)
        self.cb_config = ContinuousBatchingConfig(page_size=CB_PAGE, num_blocks=pages, max_batch_tokens=CB_BATCH_TOKENS,
                                                  allow_block_sharing=False, auto_switch_to_flash=False)

    def run(self, mode: str, new: int | None = None, width: int | None = None) -> Run:
        """One call of ``mode`` on the last ``width`` positions of the prompts (default: all)."""
        new = self.case.new if new is None else new
        ids, mask = (self.ids, self.mask) if width is None else (self.ids[:, -width:], self.mask[:, -width:])
        if mode == BATCHED:
            return self._batched(ids, mask, new)
        model = self.model
        model.set_attn_implementation(PAGED if mode == PAGED else "sdpa")
        if mode == DYNAMIC:
            cache = transformers.DynamicCache(config=model.config)
        else:
            blocks = len(ids) * (-(-(ids.shape[1] + new) // BLOCK) + 1)
            cache = PagedCache.from_model_config(model.config, num_blocks=blocks, block_size=BLOCK)
        clock = _Clock()
        start = time.perf_counter()
        if mode != DYNAMIC:
            cache.begin(ids, mask)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new,
                                 do_sample=False, pad_token_id=0,
                                 logits_processor=transformers.LogitsProcessorList([clock]))
        end = time.perf_counter()
        return Run(end - start, clock.first - start, end - clock.first, len(ids) * (new - 1), out[:, ids.shape[1]:],
                   clock.first, end)

    def _batched(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> Run:
        self.model.set_attn_implementation("sdpa")
        prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        start = time.perf_counter()
        out = self.model.generate_batch(prompts, generation_config=config, continuous_batching_config=self.cb_config,
                                        record_timestamps=True, persistent_manager=True, warmup=False)
        end = time.perf_counter()
        results = list(out.values())
        if len(results) != len(prompts) or any(r.error or len(r.generated_tokens) != new for r in results):
            raise AssertionError(f"generate_batch failed: {[(r.request_id, r.error) for r in results]}")
        decode_from = max(r.timestamps[0] for r in results)  # every request has its first token
        last = max(r.timestamps[-1] for r in results)
        made = sum(sum(t > decode_from for t in r.timestamps) for r in results)
        return Run(end - start, decode_from - start, last - decode_from, made,
                   torch.tensor([r.generated_tokens for r in results]), decode_from,
                   min(r.timestamps[-1] for r in results))

    def close(self) -> None:
        self.model.destroy_cached_continuous_batching_manager()


def _median_range(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def agreement(got: torch.Tensor, want: torch.Tensor) -> str:
    """Share of equal tokens, and the first step where a row differs."""
    same = got == want
    if bool(same.all()):
        return "identical"
    first = int((~same).any(0).nonzero()[0])
    return f"{same.float().mean():.0%} of tokens equal, first difference at new token {first}"


def report(name: str, case: Case, runs: dict[str, list[Run]]) -> list[str]:
    batch = len(case.lengths)
    lines = [f"hf attention [{name}] ({torch.get_num_threads()} torch thread): batch {batch}, prompts "
             f"{sorted(set(case.lengths), reverse=True)}, {case.new} new tokens, {case.dtype}, {case.rounds} rounds; "
             "median [min-max]"]
    for mode, rs in runs.items():
        lines.append(f"  {mode:15s} generate {_median_range([batch * case.new / r.total for r in rs], '7.1f')} tok/s"
                     f"   prefill {_median_range([r.prefill for r in rs], '6.2f')} s"
                     f"   decode {_median_range([r.decode_tokens / r.decode for r in rs], '7.1f')} tok/s")
    for a in runs:
        for b in runs:
            if a != b and (a == PAGED or (a == GATHER and b == DYNAMIC)):
                whole = [y.total / x.total for x, y in zip(runs[a], runs[b])]
                dec = [(x.decode_tokens / x.decode) / (y.decode_tokens / y.decode) for x, y in zip(runs[a], runs[b])]
                lines.append(f"  {a} / {b}: generate {_median_range(whole, '.2f')}x   decode "
                             f"{_median_range(dec, '.2f')}x (tokens/s)")
    for mode in runs:
        if mode != DYNAMIC and DYNAMIC in runs:
            lines.append(f"  tokens {mode} vs dynamic: {agreement(runs[mode][-1].tokens, runs[DYNAMIC][-1].tokens)}")
    return lines


@pytest.mark.parametrize("name", list(CASES))
def test_generate_pagedkv_attention(benchmark, name):
    case = CASES[name]
    bench = Bench(case)
    runs: dict[str, list[Run]] = {mode: [] for mode in case.modes}

    def rounds() -> None:
        for mode in case.modes:  # warm-up: kernels, allocator, plans, generate_batch's manager
            bench.run(mode, new=2, width=64)
        for r in range(case.rounds):
            for mode in case.modes[r % len(case.modes):] + case.modes[:r % len(case.modes)]:
                runs[mode].append(bench.run(mode))

    try:
        benchmark.group = "hf attention"
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        bench.close()
    print("\n" + "\n".join(report(name, case, runs)))
    benchmark.extra_info.update({mode: [(r.total, r.prefill, r.decode, r.decode_tokens) for r in rs]
                                 for mode, rs in runs.items()})
    if case.dtype == "float32":
        for mode in (PAGED, GATHER):
            if mode in runs:
                assert torch.equal(runs[mode][-1].tokens, runs[DYNAMIC][-1].tokens), f"{mode} differs from dynamic"


class Breakdown:
    """Wall time of a decode step by where it goes, from wrappers around the entry points every mode calls.

    Categories (exclusive, per call of the wrapped function): ``matmul``
    (``F.linear``: projections, MLP, LM head), ``attention`` (the attention
    function the layer calls, minus any cache read inside it), ``cache``
    (``Cache.update`` of either kind, ``generate_batch``'s cache update, a
    pagedkv layer's fallback gather), ``mask`` (``create_causal_mask``); the
    rest of the step (norms, rotary, embedding, sampling, generate's and the
    batch scheduler's Python) is ``other``. Nested in ``attention``:
    ``kernel`` (the SDPA call or pagedkv's compiled decode) and ``plan``
    (pagedkv's per-step plan inputs, kernel plan and mask check). A wrapper
    costs about a microsecond, under 0.5 % of a step here. Only calls that
    start after the decode began count (``generate_batch`` overlaps them).
    """

    OUTER = ("matmul", "attention", "cache", "mask")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, float, float]] = []
        self._depth = collections.Counter()
        f, llama = torch.nn.functional, transformers.models.llama.modeling_llama
        cb_cache = transformers.generation.continuous_batching.cache.PagedAttentionCache
        targets = [(f, "linear", "matmul"), (f, "scaled_dot_product_attention", "kernel"),
                   (NativeDecodePlan, "run", "kernel"), (transformers.DynamicCache, "update", "cache"),
                   (PagedCache, "update", "cache"), (PagedCache, "gather_layer", "gather"), (cb_cache, "update", "cache"),
                   (PagedCache, "_new_step", "steps"), (PagedCache, "_make_plans", "steps"),
                   (llama, "create_causal_mask", "mask"), (llama.LlamaModel, "forward", "forward"),
                   (hf_attention, "_step", "plan"),
                   (hf_attention._Step, "kernel_plan", "plan"), (hf_attention._Step, "mask_matches", "plan")]
        for owner, attr, label in targets:
            monkeypatch.setattr(owner, attr, self._wrap(getattr(owner, attr), label))
        interface = transformers.AttentionInterface._global_mapping
        for key in ("sdpa", PAGED):
            monkeypatch.setitem(interface, key, self._wrap(interface[key], "attention"))

    def _wrap(self, fn, label):
        def timed(*args, **kwargs):
            self._depth[label] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[label] -= 1
                if not self._depth[label]:  # DynamicCache.update calls its layer's update: count the outer call
                    self.events.append((label, start, time.perf_counter() - start))
        return timed

    def per_step(self, since: float, until: float) -> dict[str, float]:
        """Milliseconds per decode step in each category, for calls that started in ``[since, until)``."""
        seen = [(label, seconds) for label, start, seconds in self.events if since <= start < until]
        steps = sum(label == "forward" for label, _ in seen)
        if not steps:  # generate_batch finished a row before it prefilled the last one: ask for more tokens
            raise AssertionError(f"no decode step in which every row decodes, in [{since}, {until})")
        ms = collections.Counter()
        for label, seconds in seen:
            ms[label] += 1e3 * seconds / steps
        ms["attention"] -= ms["gather"]
        ms["cache"] += ms.pop("gather", 0.0)
        ms["other"] = 1e3 * (until - since) / steps - sum(ms[k] for k in self.OUTER)
        ms["step"] = 1e3 * (until - since) / steps
        return dict(ms)


@pytest.mark.parametrize("name", ["issue-float32", "issue-bfloat16"])
def test_decode_step_breakdown(benchmark, monkeypatch, name, new=65):
    """Where one decode step's time goes at the issue's size, per mode (mean over the steps of all 8 rows)."""
    case = CASES[name]
    bench = Bench(case)
    lines = [f"decode step breakdown [{name}], ms per step of all {len(case.lengths)} rows (mean over the decode "
             f"steps of {new} new tokens in which every row still decodes):"]

    def measure() -> None:
        for mode in case.modes:
            bench.run(mode, new=2, width=64)
        for mode in case.modes:
            with monkeypatch.context() as patch:
                breakdown = Breakdown(patch)
                run = bench.run(mode, new=new)
            ms = breakdown.per_step(run.decode_start, run.full_until)
            parts = "  ".join(f"{k} {ms.get(k, 0.0):6.1f}" for k in (*Breakdown.OUTER, "other"))
            lines.append(f"  {mode:15s} step {ms['step']:6.1f}:  {parts}   (of attention: kernel "
                         f"{ms.get('kernel', 0.0):.1f}, plan {ms.get('plan', 0.0):.1f}; of cache: step bookkeeping "
                         f"{ms.get('steps', 0.0):.1f})")

    try:
        benchmark.group = "hf attention breakdown"
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        bench.close()
    print("\n" + "\n".join(lines))
