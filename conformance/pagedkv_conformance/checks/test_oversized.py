"""Pools too big for the device are refused before allocation, with the bytes named, never an OOM kill."""

from __future__ import annotations

import pytest

from pagedkv_core import CacheConfig
from pagedkv_core.errors import InsufficientMemory
from pagedkv_core.memory import MEMORY_LIMIT_ENV

pytestmark = pytest.mark.pagedkv_area("bad_input")


def _dtype(target) -> str:
    caps = target.capabilities
    return (caps.dtypes or caps.quantized)[0]


def test_a_pool_beyond_any_device_is_refused(target):
    config = CacheConfig(num_layers=80, num_kv_heads=8, head_dim=128, num_blocks=10**11, dtype=_dtype(target))
    with pytest.raises(InsufficientMemory) as err:
        target.backend.create_storage(config, target.device)
    assert err.value.needed >= config.device_bytes and err.value.available < err.value.needed


def test_the_memory_cap_is_honoured(target, monkeypatch):
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256, dtype=_dtype(target))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(config.device_bytes - 1))
    with pytest.raises(InsufficientMemory, match=MEMORY_LIMIT_ENV):
        target.backend.create_storage(config, target.device)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(config.device_bytes))
    assert target.backend.create_storage(config, target.device).config == config
