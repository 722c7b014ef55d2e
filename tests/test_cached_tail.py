"""A trim can leave a sequence's last block partly used but still named by its prefix hash.

While others share it, the next write copies it anyway; once they have left,
the sequence is its sole owner, and writing in place would change bytes the
prefix cache still promises to later prompts. Both growth paths (the decode
step and extend) must copy it first, and the cached original must still
serve a prompt that hits it.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager
from pagedkv_numpy.storage import NumpyStorage

BS = 4
PROMPT = tuple(range(200, 206))  # one full block and two tokens


def _manager_with_a_cached_tail():
    """``r3`` holds 3 tokens in the prompt's first block, alone, while the prefix cache still names all 4."""
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=8, block_size=BS)
    manager = PagedKvCacheManager(NumpyStorage(config))
    first = manager.allocate(AllocationRequest("r1", token_ids=PROMPT))
    table = first.block_table
    values = np.arange(len(PROMPT) * 2, dtype=np.float32).reshape(len(PROMPT), 1, 2)
    manager.storage.write(0, np.array([table.slot(p) for p in range(len(PROMPT))]), values, -values)
    manager.allocate(AllocationRequest("r2", token_ids=PROMPT))  # hits the first block
    manager.trim("r1", 3)
    manager.fork("r1", "r3")
    manager.deallocate("r1")
    manager.deallocate("r2")
    tail = manager.get_handle("r3").block_table.block_ids[-1]
    assert manager.pool.ref[tail] == 1 and manager.pool.block_hash[tail] is not None
    return manager, tail, values


@pytest.mark.parametrize("grow", ["append_slots", "extend"])
def test_writing_after_a_cached_tail_copies_it_and_the_cache_still_serves_it(grow):
    manager, tail, values = _manager_with_a_cached_tail()
    if grow == "append_slots":
        slot = int(manager.append_slots(["r3"], [0]).slot_mapping[0])
    else:
        manager.extend("r3", 1, [0])
        slot = manager.get_handle("r3").block_table.slot(3)
    assert slot // BS != tail and manager.stats().cow_copies == 1
    new = np.full((1, 1, 2), 99, np.float32)
    manager.storage.write(0, np.array([slot]), new, new)
    k, _ = manager.storage.gather(0, np.asarray(manager.get_handle("r3").block_table.block_ids), 4)
    np.testing.assert_array_equal(k[:3], values[:3])  # the copy took the first three tokens
    np.testing.assert_array_equal(k[3:], new)
    hit = manager.allocate(AllocationRequest("r4", token_ids=PROMPT))
    assert hit.num_cached_tokens == BS and hit.block_table.block_ids[0] == tail
    k, v = manager.storage.gather(0, np.asarray(hit.block_table.block_ids[:1]), BS)
    np.testing.assert_array_equal(k, values[:BS])
    np.testing.assert_array_equal(v, -values[:BS])
    manager.check_invariants()


def test_a_step_that_must_copy_a_cached_tail_counts_the_block_it_takes():
    manager, _, _ = _manager_with_a_cached_tail()
    assert manager.growth.append_need(manager.sequences.find_many(["r3"])) == 1
