"""The Gemma-3-like memory figure at a small scale: layer groups hold what the model needs, no more.

Block counts, not timings (those are in ``benchmarks/test_bench_hybrid.py``).
"""

from hybrid_memory import measure


def test_gemma_like_cache_holds_the_floor_at_the_end_and_window_plus_chunk_at_the_peak():
    figures = measure(num_seqs=4, context=4096, window=512, decode_steps=64, prefill_chunk=512)
    # the full layer keeps 4,096 tokens, each sliding layer 512 (+ at most one block): (1 + 5 * 512 / 4096) / 6
    assert abs(figures.floor - 0.2708) < 1e-3
    assert figures.floor <= figures.ratio_end <= figures.floor + 5 * 16 / 4096 / 6
    # while prefilling, a sliding layer holds its window plus the chunk being computed
    assert figures.ratio_peak <= (1 + 5 * (512 + 512 + 16) / 4096) / 6
    assert figures.ratio_end < 0.28 < 1.0


def test_the_full_size_run_reaches_the_floor():
    figures = measure(num_seqs=32, context=8192, window=1024, decode_steps=128, prefill_chunk=1024)
    assert round(figures.ratio_end, 4) == round(figures.floor, 4) == 0.2708
