"""Several pools behind one manager: placement, bit-exact moves, rebalancing, per-device stats."""

import numpy as np
import pytest

from kvhelpers import fill, kv_of, make_config, request
from pagedkv_core import InvalidArgument, MultiDeviceManager, OutOfBlocks, PagedKvCacheManager, SequenceExists
from pagedkv_numpy.storage import NumpyStorage


@pytest.fixture
def multi():
    managers = {name: PagedKvCacheManager(NumpyStorage(make_config())) for name in ("dev0", "dev1")}
    return MultiDeviceManager(managers)


def test_allocation_follows_preference_then_spills(multi):
    multi.allocate(request("a", n=60))
    assert multi.get_cache_device("a") == "dev0"
    multi.allocate(request("b", n=20))
    assert multi.get_cache_device("b") == "dev1"
    multi.set_device_preference(["dev1"])
    multi.allocate(request("c", n=4))
    assert multi.get_cache_device("c") == "dev1"
    with pytest.raises(OutOfBlocks):
        multi.allocate(request("d", n=60))
    with pytest.raises(SequenceExists):
        multi.allocate(request("a", n=1))
    with pytest.raises(InvalidArgument):
        multi.set_device_preference(["tpu"])


def test_move_cache_is_bit_exact_and_keeps_prefix_hashes(multi):
    multi.allocate(request("a", tokens=range(10)))
    source = multi.managers["dev0"]
    fill(source, ["a"], [10])
    before = kv_of(source, "a")
    multi.move_cache("a", "dev1")
    target = multi.managers["dev1"]
    assert multi.get_cache_device("a") == "dev1" and not source.has_sequence("a")
    for got, want in zip(kv_of(target, "a"), before):
        np.testing.assert_array_equal(got, want)
    assert target.allocate(request("b", tokens=range(9))).num_cached_tokens == 8
    source.check_invariants()
    target.check_invariants()


def test_extend_and_deallocate_route_to_the_right_device(multi):
    multi.allocate(request("a", n=4))
    multi.move_cache("a", "dev1")
    multi.extend("a", 3)
    assert multi.get_handle("a").num_tokens == 7
    multi.deallocate("a")
    assert multi.get_handle("a") is None and multi.get_cache_device("a") is None


def test_rebalance_moves_from_full_to_empty(multi):
    for i in range(6):
        multi.allocate(request(f"s{i}", n=8))
    assert multi.device_stats()["dev0"].used_blocks == 12
    moves = multi.rebalance_devices()
    used = {d: s.used_blocks for d, s in multi.device_stats().items()}
    assert moves >= 2 and abs(used["dev0"] - used["dev1"]) <= 2
    total = multi.stats()
    assert total.used_blocks == 12 and total.total_blocks == 32


def test_move_to_a_full_device_changes_nothing(multi):
    multi.allocate(request("a", n=8))
    multi.set_device_preference(["dev1"])
    multi.allocate(request("filler", n=64))
    with pytest.raises(OutOfBlocks):
        multi.move_cache("a", "dev1")
    assert multi.get_cache_device("a") == "dev0"
    multi.managers["dev0"].check_invariants()


def test_move_between_backends_on_one_host_is_bit_exact():
    from pagedkv_core.plugins import default_registry

    status = default_registry().available_backends().get("torch")
    if status is None or not status.available:
        pytest.skip("the torch backend is not available here")
    torch_backend = default_registry().get("torch")
    managers = {"numpy": PagedKvCacheManager(NumpyStorage(make_config())),
                "torch": PagedKvCacheManager(torch_backend.create_storage(make_config(), "cpu"))}
    multi = MultiDeviceManager(managers)
    multi.allocate(request("a", tokens=range(10)))
    fill(managers["numpy"], ["a"], [10])
    before = kv_of(managers["numpy"], "a")
    multi.move_cache("a", "torch")
    table = managers["torch"].get_handle("a").block_table
    for layer in range(2):
        k, v = managers["torch"].storage.gather(layer, np.asarray(table.block_ids), table.num_tokens)
        np.testing.assert_array_equal(torch_backend.to_numpy(k), before[2 * layer])
        np.testing.assert_array_equal(torch_backend.to_numpy(v), before[2 * layer + 1])
    multi.move_cache("a", "numpy")
    for got, want in zip(kv_of(managers["numpy"], "a"), before):
        np.testing.assert_array_equal(got, want)
