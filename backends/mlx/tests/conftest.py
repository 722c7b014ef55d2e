"""Fixtures of the MLX backend tests; MLX is imported only inside them, so a missing MLX skips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# The suite runs with --import-mode=importlib, which puts no test folder on sys.path;
# this one holds mlx_helpers, the plain functions the test modules share.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def backend():
    pytest.importorskip("mlx.core", reason="MLX is not importable", exc_type=ImportError)
    from pagedkv_mlx.backend import MlxBackend

    return MlxBackend()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240605)
