"""The shared-prefix (cascade) layout of a decode batch, as the manager's tables give it."""

import numpy as np

from pagedkv_core import AllocationRequest, CacheConfig, PagedKvCacheManager, build_cascade
from pagedkv_core.contract.attention import check_batch
from pagedkv_numpy.storage import NumpyStorage


def _manager() -> PagedKvCacheManager:
    return PagedKvCacheManager(NumpyStorage(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=256,
                                                        block_size=4)))


def test_forks_and_prefix_hits_form_groups_of_whole_shared_blocks():
    m = _manager()
    system = tuple(range(100, 118))  # 18 tokens: 4 whole blocks and a partial one
    m.allocate(AllocationRequest("a", token_ids=system + (1, 2, 3)))
    m.allocate(AllocationRequest("b", token_ids=system + (7,)))  # a prefix hit of 4 blocks
    m.fork("a", "a2")
    m.allocate(AllocationRequest("solo", token_ids=tuple(range(9))))
    meta = m.append_slots(["a", "b", "a2", "solo"], [0, 0, 0, 0])
    layout = meta.cascade(min_group_size=2, min_shared_blocks=1)
    assert layout.num_groups == 1
    rows, blocks = layout.group(0)
    assert rows.tolist() == [0, 1, 2]
    # a and a2 share 5 whole blocks, b only the 4 of the prompt hit: the group shares what all three have
    assert blocks.tolist() == list(m.get_handle("b").block_table.block_ids[:4])
    assert layout.shared_tokens.tolist() == [16, 16, 16, 0]
    assert layout.shared_reads_saved == 2 * 4


def test_only_blocks_every_member_has_filled_are_shared():
    tables = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 9]])
    layout = build_cascade(tables, np.array([12, 9, 11]), 4, min_group_size=2, min_shared_blocks=1)
    rows, blocks = layout.group(0)
    assert rows.tolist() == [0, 1, 2] and blocks.tolist() == [5, 6]  # row 1 has filled 2 blocks
    assert build_cascade(tables, np.array([12, 3, 11]), 4, min_group_size=2, min_shared_blocks=1).group(0)[1].tolist() == [5, 6]


def test_thresholds_and_a_batch_without_sharing():
    tables = np.array([[1, 2], [1, 2], [3, 4]])
    lens = np.array([8, 8, 8])
    assert build_cascade(tables, lens, 4, min_group_size=3, min_shared_blocks=1).num_groups == 0
    assert build_cascade(tables, lens, 4, min_shared_blocks=3, min_group_size=2).num_groups == 0
    empty = build_cascade(np.array([[1], [2]]), np.array([3, 4]), 4, min_group_size=2, min_shared_blocks=1)
    assert empty.num_groups == 0 and empty.members.size == 0 and empty.shared_tokens.tolist() == [0, 0]


def test_the_defaults_keep_only_groups_that_pay_on_the_cpu_kernels():
    system = list(range(10))
    tables = np.full((12, 70), -1)
    for i in range(8):  # 8 forks of one long request under a short system prompt everyone shares
        tables[i, :66] = system + list(range(10, 65)) + [100 + i]
    for i in range(8, 12):
        tables[i, :11] = system + [200 + i]
    lens = np.array([66 * 4 - 1] * 8 + [42] * 4)
    layout = build_cascade(tables, lens, 4)
    assert layout.num_groups == 1 and layout.group(0)[0].tolist() == list(range(8))
    assert layout.group(0)[1].tolist() == list(range(65))
    assert build_cascade(tables[:7], lens[:7], 4).num_groups == 0  # 7 rows: below MIN_GROUP_SIZE
    # with small thresholds the short prefix everyone shares is a group of all 12 instead
    assert build_cascade(tables, lens, 4, min_group_size=2, min_shared_blocks=1).group(0)[0].size == 12


def test_groups_split_where_rows_differ():
    tables = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [1, 7, 8, 9], [1, 7, 8, 6], [1, 7, 8, 6]])
    layout = build_cascade(tables, np.full(5, 16), 4, min_group_size=2, min_shared_blocks=2)
    assert [layout.group(g)[0].tolist() for g in range(layout.num_groups)] == [[0, 1], [2, 3, 4]]
    assert [layout.group(g)[1].tolist() for g in range(layout.num_groups)] == [[1, 2, 3], [1, 7, 8]]


def test_rows_in_no_group_make_their_own_decode_batch():
    tables = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [6, 7, -1, -1], [1, 2, 3, 8]])
    lens = np.array([16, 15, 7, 14])
    layout = build_cascade(tables, lens, 4, min_group_size=2, min_shared_blocks=2)
    rest = layout.ungrouped_rows()
    assert rest.tolist() == [2]
    index = check_batch(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=16, block_size=4),
                        tables, lens)
    sub = index.decode_rows(rest)
    assert sub.is_decode and sub.block_tables.tolist() == [[6, 7, -1, -1]] and sub.seq_lens.tolist() == [7]
    assert sub.query_start_loc.tolist() == [0, 1] and sub.query_lens.tolist() == [1]
