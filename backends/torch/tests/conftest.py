"""Fixtures of the torch backend's tests (plain helpers live in ``torch_helpers``).

The folder collects without torch installed: every test module starts with
``pytest.importorskip("torch")`` and nothing here imports torch at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which puts no test folder on sys.path;
# this one holds torch_helpers, the plain functions the test modules share.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def backend():
    pytest.importorskip("torch")
    from pagedkv_torch.backend import TorchBackend

    return TorchBackend()
