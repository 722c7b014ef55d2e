"""Concurrent callers never corrupt the manager: 8 threads x 2,000 mixed operations."""

import random
import threading

from kvhelpers import make_config
from pagedkv_core import PagedKvCacheManager, PagedKvError, SeqState, UnknownSequence
from pagedkv_core.config import AllocationRequest
from pagedkv_numpy.storage import NumpyStorage

THREADS, OPS = 8, 2000


def worker(manager: PagedKvCacheManager, seed: int, errors: list) -> None:
    rng = random.Random(seed)
    mine: list[str] = []
    try:
        for i in range(OPS):
            op = rng.random()
            try:
                if op < 0.25 or not mine:
                    rid = f"t{seed}-{i}"
                    prompt = tuple(rng.choice([range(16), range(8), [seed] * 5])) + (i % 3,)
                    manager.allocate(AllocationRequest(rid, token_ids=prompt))
                    mine.append(rid)
                elif op < 0.55:
                    manager.append_slots(mine[-4:], [rng.randrange(50) for _ in mine[-4:]])
                elif op < 0.62:
                    manager.trim(rng.choice(mine), 1)
                elif op < 0.7:
                    child = f"{mine[-1]}-f{i}"
                    manager.fork(mine[-1], child)
                    mine.append(child)
                elif op < 0.78:
                    rid = rng.choice(mine)
                    handle = manager.get_handle(rid)
                    if handle is None:  # another thread's eviction dropped it
                        mine.remove(rid)
                    elif handle.state is SeqState.RUNNING:
                        manager.swap_out(rid)
                    else:
                        manager.swap_in(rid)
                elif op < 0.8:
                    manager.defragment()
                elif op < 0.82:
                    manager.evict(2)
                    mine = [r for r in mine if manager.has_sequence(r)]
                else:
                    manager.deallocate(mine.pop(rng.randrange(len(mine))))
            except PagedKvError:
                pass  # out of blocks, swapped sequence, trimmed to zero...: legitimate refusals
        for rid in mine:
            try:
                manager.deallocate(rid)
            except UnknownSequence:
                pass  # another thread's eviction dropped it
    except Exception as exc:  # anything else is a bug
        errors.append(exc)


def test_eight_threads_of_mixed_operations_keep_invariants():
    manager = PagedKvCacheManager(NumpyStorage(make_config(num_blocks=128, num_host_blocks=32, head_dim=4)))
    errors: list = []
    threads = [threading.Thread(target=worker, args=(manager, s, errors)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manager.check_invariants()
    assert len(manager) == 0
    stats = manager.stats()
    assert stats.used_blocks == 0 and stats.host_blocks_used == 0
    # every kind of operation really ran, concurrently
    assert stats.allocation_count > 1000 and stats.cow_copies > 0 and stats.swap_out_count > 0
    assert stats.swap_in_count > 0 and stats.eviction_count > 0 and manager.counters["defragmentations"] > 0
