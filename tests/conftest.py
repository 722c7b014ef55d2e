"""Shared fixtures: a controllable clock and managers on small NumPy storage."""

from __future__ import annotations

import pytest

from kvhelpers import make_config
from pagedkv_core import PagedKvCacheManager
from pagedkv_numpy.storage import NumpyStorage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_manager(clock):
    def build(policy=None, **overrides) -> PagedKvCacheManager:
        return PagedKvCacheManager(NumpyStorage(make_config(**overrides)), eviction_policy=policy, clock=clock)
    return build


@pytest.fixture
def manager(make_manager) -> PagedKvCacheManager:
    return make_manager()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free loopback port (``.url``, ``.stop()``); skips outside CI where none is installed."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path)
    yield server
    server.stop()
