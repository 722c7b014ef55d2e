"""Fixtures of the cupy backend tests.

``cupy_target`` runs a test twice: on ``emu`` (the real storage/attention code
with kernels.cu executed by the CPU emulator, needs a host C++ compiler) and
on ``cuda:0`` (needs a GPU; skipped with the backend probe's reason here).
(Not named ``target``: the conformance plugin parametrizes that name.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which puts no test folder on sys.path;
# the helper modules here (cupy_*.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

from cupy_emulator import EmuKernels, host_compiler  # noqa: E402
from cupy_targets import CudaTarget, EmuTarget  # noqa: E402

from pagedkv_cupy.kernels import ModuleKey  # noqa: E402

# Emulator modules the default tests use, compiled up front on every core (others build on first use).
PAIRS = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "int8")]
PREBUILT = [ModuleKey("write"), ModuleKey("decode", "float16", "float16", 128), ModuleKey("decode", "float32", "int8", 16),
            *(ModuleKey(kind, q, kv, 16) for kind in ("decode", "prefill") for q, kv in PAIRS)]


def cuda_backend_or_skip(device: str = "cuda:0"):
    """The cupy backend with ``device`` usable, else skip with the reason it is not."""
    try:
        from pagedkv_cupy.backend import CupyBackend

        backend = CupyBackend()
    except ImportError as exc:
        pytest.skip(f"cupy backend cannot load: {exc}")
    probe = backend.probe(device)
    if not probe.available:
        pytest.skip(f"no CUDA device: {probe.reason}")
    return backend


@pytest.fixture(scope="session")
def emu_kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EmuKernels:
    if host_compiler() is None:
        pytest.skip("the emulated kernel tests need a host C++ compiler (g++), none found")
    cache = getattr(request.config, "cache", None)
    directory = Path(cache.mkdir("pagedkv_cupy_emu")) if cache is not None else tmp_path_factory.mktemp("emu")
    kernels = EmuKernels(directory)
    kernels.prebuild(PREBUILT)
    return kernels


@pytest.fixture(params=["emu", "cuda:0"])
def cupy_target(request: pytest.FixtureRequest):
    if request.param == "emu":
        built = EmuTarget(request.getfixturevalue("emu_kernels"))
    else:
        built = CudaTarget(cuda_backend_or_skip(request.param), request.param)
    yield built
    built.finish()


@pytest.fixture
def cuda_backend():
    return cuda_backend_or_skip()


FULL_ENV = "PAGEDKV_CUPY_FULL"


@pytest.fixture
def full_run() -> None:
    """Skip unless the long checks were asked for (they take minutes, even under ``make test-all``)."""
    if os.environ.get(FULL_ENV) != "1":
        pytest.skip(f"takes minutes; set {FULL_ENV}=1 to run it")
