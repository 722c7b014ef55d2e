"""Sizes are checked before anything is allocated: a typed error naming the bytes, never an OOM kill."""

from types import SimpleNamespace

import pytest

from pagedkv_core import CacheConfig, InsufficientMemory, InvalidArgument, PagedKvCacheManager
from pagedkv_core.memory import MEMORY_LIMIT_ENV, check_pools, format_bytes, host_memory_available, memory_limit
from pagedkv_numpy.storage import NumpyStorage


@pytest.mark.parametrize(("text", "value"), [
    ("1073741824", 1 << 30), ("8G", 8 << 30), ("512MiB", 512 << 20), ("1.5k", 1536), ("2TB", 2 << 40)])
def test_the_memory_limit_reads_sizes(monkeypatch, text, value):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
    assert memory_limit() == value


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "nan", "inf", "G"])
def test_a_bad_memory_limit_is_a_typed_error(monkeypatch, text):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
    with pytest.raises(InvalidArgument, match=MEMORY_LIMIT_ENV):
        memory_limit()


def test_config_states_its_bytes():
    config = CacheConfig(num_layers=2, num_kv_heads=4, head_dim=64, num_blocks=100, block_size=16,
                         num_host_blocks=10, dtype="int8")
    per_block = 2 * 2 * (16 * 4 * 64 * 1 + 4 * 4)  # K and V, layers, values + float32 scales per head
    assert config.bytes_per_block == per_block
    assert config.device_bytes == 100 * per_block and config.host_tier_bytes == 10 * per_block


def test_the_host_reports_its_available_memory():
    available = host_memory_available()
    assert available is None or available > 0


def test_a_pool_beyond_the_cap_is_refused_with_its_numbers(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1M")
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=1024, num_host_blocks=16)
    with pytest.raises(InsufficientMemory) as err:
        NumpyStorage(config)
    e = err.value
    assert e.needed == config.device_bytes + config.host_tier_bytes and e.available == 1 << 20
    assert isinstance(e, MemoryError) and "PAGEDKV_MEMORY_LIMIT" in str(e) and "1,024 blocks" in str(e)
    assert format_bytes(e.needed) in str(e)


def test_a_pool_beyond_any_machine_is_refused_without_a_cap():
    with pytest.raises(InsufficientMemory, match="TiB"):
        NumpyStorage(CacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=10**12))


def test_a_device_pool_is_checked_against_the_device_and_its_host_tier_against_the_host(monkeypatch):
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=1000, num_host_blocks=2000)
    check_pools(config, "cuda:0", device_free=config.device_bytes, unified=False)  # exactly fits
    with pytest.raises(InsufficientMemory) as err:
        check_pools(config, "cuda:0", device_free=config.device_bytes - 1, unified=False)
    assert err.value.device == "cuda:0"
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(config.device_bytes))
    with pytest.raises(InsufficientMemory) as err:  # the host tier alone is over the cap
        check_pools(config, "cuda:0", device_free=10 * config.device_bytes, unified=False)
    assert err.value.device == "host" and "host tier" in err.value.what


def test_the_manager_refuses_bookkeeping_beyond_the_host():
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=10**12)
    storage = SimpleNamespace(config=config, device="accel:0")  # a third-party storage that checked nothing
    with pytest.raises(InsufficientMemory, match="bookkeeping"):
        PagedKvCacheManager(storage)


@pytest.mark.parametrize("field", ["num_blocks", "num_host_blocks", "max_seq_len", "head_dim"])
@pytest.mark.parametrize("value", [True, 2.5, "8", -1], ids=["bool", "float", "str", "negative"])
def test_config_fields_are_typed(field, value):
    values = dict(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8)
    values[field] = value
    with pytest.raises(InvalidArgument, match=field):
        CacheConfig(**values)
