"""``pagedkv conformance``: run the suite's checks with pytest and end with the per-area table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["CHECKS_DIR", "run_conformance"]

CHECKS_DIR = Path(__file__).resolve().parent / "checks"


def run_conformance(backend: str | None = None, device: str | None = None, dtypes: Sequence[str] = (),
                    full: bool = False, pytest_args: Sequence[str] = ()) -> int:
    """Run every check (``full``: the slow sweeps too) and return pytest's exit code."""
    import pytest

    args = [str(CHECKS_DIR), "-q", "-rs", "--import-mode=importlib", "-p", "no:cacheprovider",
            "-o", "addopts=", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if not full:
        args += ["-m", "not slow"]
    if backend:
        args += ["--pagedkv-backend", backend]
    if device:
        args += ["--pagedkv-device", device]
    for dtype in dtypes:
        args += ["--pagedkv-dtype", dtype]
    return int(pytest.main([*args, *pytest_args]))
