"""Launch geometry: split counts the device can recompute, tiles that cover every query once."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_cupy.kernels import group_tile
from pagedkv_cupy.launch import MIN_SPLIT_LEN, SPLIT_ALIGN, decode_geometry, decode_visible, prefill_geometry


def test_benchmark_decode_geometry_fills_an_h100():
    geo = decode_geometry(np.full(32, 4096), 0, num_kv_heads=8, num_q_heads=32, num_sms=132)
    assert (geo.group_tile, geo.chunks) == (4, 1)
    assert geo.split_len % SPLIT_ALIGN == 0 and geo.split_len >= MIN_SPLIT_LEN
    assert geo.max_splits * geo.split_len >= 4096 > (geo.max_splits - 1) * geo.split_len
    assert geo.grid == (32 * geo.max_splits, 8) and geo.reduce_grid == (32, 32)
    assert geo.grid[0] * geo.grid[1] >= 8 * 132  # enough blocks to keep every SM busy


@pytest.mark.parametrize("window", [0, 1, 100, 5000])
def test_every_sequence_fits_the_grid(window):
    rng = np.random.default_rng(window)
    lens = rng.integers(1, 9000, size=17)
    geo = decode_geometry(lens, window, num_kv_heads=4, num_q_heads=12, num_sms=108)
    visible = decode_visible(lens, window)
    assert visible.max() <= geo.max_splits * geo.split_len
    np.testing.assert_array_equal(visible, np.minimum(lens, window) if window else lens)


def test_short_contexts_are_not_split():
    geo = decode_geometry(np.array([1, 200, 37]), 0, num_kv_heads=2, num_q_heads=2, num_sms=132)
    assert geo.max_splits == 1 and geo.grid == (3, 2)


@pytest.mark.parametrize("group,tile,chunks", [(1, 1, 1), (2, 2, 1), (3, 4, 1), (4, 4, 1), (8, 8, 1), (12, 8, 2),
                                               (32, 8, 4)])
def test_group_tiles(group, tile, chunks):
    assert group_tile(group) == tile
    geo = decode_geometry(np.array([10]), 0, num_kv_heads=2, num_q_heads=2 * group, num_sms=4)
    assert (geo.group_tile, geo.chunks, geo.grid[1]) == (tile, chunks, 2 * chunks)


@pytest.mark.parametrize("group", [1, 3, 4, 8, 32, 64])
def test_prefill_tiles_cover_every_query_once(group):
    query_lens = np.array([5, 0, 33, 1, 0, 70])
    geo = prefill_geometry(query_lens, num_kv_heads=2, num_q_heads=2 * group)
    assert geo.heads_per_block == min(group, 32)
    assert geo.tokens_per_tile == 32 // geo.heads_per_block
    assert geo.chunks * geo.heads_per_block >= group
    covered = [(int(s), q) for s, q0 in zip(geo.tile_seq, geo.tile_q0)
               for q in range(q0, min(q0 + geo.tokens_per_tile, query_lens[s]))]
    expected = [(s, q) for s, n in enumerate(query_lens) for q in range(n)]
    assert sorted(covered) == expected and len(covered) == len(set(covered))
    assert geo.grid == (geo.tile_seq.size, 2 * geo.chunks)
    assert geo.tile_seq.dtype == geo.tile_q0.dtype == np.int32


@pytest.mark.parametrize("window", [0, 1, 7, 100])
@pytest.mark.parametrize("chunk", [0, 1, 5, 16, 64])
def test_decode_visible_counts_the_window_and_chunk(window, chunk):
    """What ``decode_range`` in kernels.cu reads: positions p <= t of the query's window and chunk."""
    lens = np.array([1, 2, 5, 16, 17, 63, 64, 65, 200])
    want = [sum(1 for p in range(n) if (not window or p > n - 1 - window) and (not chunk or p // chunk == (n - 1) // chunk))
            for n in lens]
    np.testing.assert_array_equal(decode_visible(lens, window, chunk), want)
    geo = decode_geometry(lens, window, num_kv_heads=2, num_q_heads=4, num_sms=8, chunk=chunk)
    assert max(want) <= geo.max_splits * geo.split_len
