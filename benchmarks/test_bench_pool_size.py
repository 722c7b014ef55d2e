"""Admission and release cost against the pool's size: flat, because rows grow with the sequence.

Run: ``python -m pytest benchmarks/test_bench_pool_size.py -m benchmark --benchmark-only -s``.
One pool of 4,096 / 65,536 / 1,048,576 blocks (no ``max_seq_len``, so a
row may reach the whole pool), 32 live sequences of 1,024 tokens; each round
admits one more such sequence (64 blocks of 16 tokens) and frees it. The
figure is the ratio to the 4,096-block pool's time in the same run.
"""

import pytest

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager, PrefixCacheConfig
from pagedkv_numpy.storage import NumpyStorage

POOLS = [4_096, 65_536, 1_048_576]
TOKENS = 1_024
_times: dict[int, float] = {}


def _manager(num_blocks: int) -> PagedKvCacheManager:
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=num_blocks, block_size=16,
                         prefix_cache=PrefixCacheConfig(enabled=False))
    manager = PagedKvCacheManager(NumpyStorage(config))
    for i in range(32):
        manager.allocate(AllocationRequest(f"live-{i}", initial_tokens=TOKENS))
    return manager


@pytest.mark.benchmark
@pytest.mark.parametrize("num_blocks", POOLS, ids=[f"{n}-blocks" for n in POOLS])
def test_admit_and_free_against_pool_size(benchmark, num_blocks):
    manager = _manager(num_blocks)
    request = AllocationRequest("probe", initial_tokens=TOKENS)

    def admit_and_free():
        manager.allocate(request)
        manager.deallocate("probe")

    benchmark.pedantic(admit_and_free, rounds=200, iterations=5, warmup_rounds=5)
    _times[num_blocks] = benchmark.stats.stats.median
    base = _times.get(POOLS[0])
    table_bytes = manager.tables.tables.nbytes
    benchmark.extra_info.update(us_per_admit_and_free=round(1e6 * _times[num_blocks] / 5, 2),
                                table_bytes=table_bytes,
                                ratio_to_4096_blocks=None if base is None else round(_times[num_blocks] / base, 3))
    print(f"\n{num_blocks:>9,} blocks: {1e6 * _times[num_blocks] / 5:7.2f} us per admission + release "
          f"(64 blocks), tables {table_bytes:,} bytes"
          + ("" if base is None else f", {_times[num_blocks] / base:.2f}x the 4,096-block pool"))
    assert table_bytes <= 64 * 64 * 4  # 64 rows as wide as the longest sequence (64 blocks)
    manager.check_invariants()
