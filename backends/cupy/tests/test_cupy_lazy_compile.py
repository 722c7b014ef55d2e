"""Kernels compile lazily: a ``cupy.RawModule`` is built on a module's first launch, once, never at import.

A fake ``cupy`` module records what the backend asks of it, so this runs
without a GPU; the last test builds a real ``cupy.RawModule`` object from the
shipped source (CuPy defers NVRTC to the first function fetched).
"""

from __future__ import annotations

import sys
import types

import pytest

from pagedkv_cupy.kernels import COMPILE_OPTIONS, KernelCache, ModuleKey, kernel_source, module_names
from pagedkv_cupy.runtime import CudaRuntime

DECODE = ModuleKey("decode", "float16", "float16", 128)
PREFILL = ModuleKey("prefill", "float16", "int8", 64)


class FakeCupy(types.ModuleType):
    """Records RawModule constructions and kernel fetches and launches."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.__version__ = "14.0.0"
        self.modules: list[dict] = []
        self.fetched: list[str] = []
        self.launched: list[tuple] = []
        fake = self

        class RawModule:
            def __init__(self, *, code, options, name_expressions):
                fake.modules.append({"code": code, "options": options, "names": list(name_expressions)})

            def get_function(self, name):
                fake.fetched.append(name)
                return lambda grid, block, args: fake.launched.append((name, grid, block, args))

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.RawModule = RawModule
        props = {"multiProcessorCount": 132, "name": b"Fake GPU"}
        self.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1, getDeviceProperties=lambda index: props))


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def test_a_new_cache_builds_nothing(fake_cupy):
    KernelCache()
    assert fake_cupy.modules == []


def test_first_use_builds_the_module_once(fake_cupy):
    cache = KernelCache()
    name = module_names(DECODE)[2]
    first = cache.function(DECODE, name)
    again = cache.function(DECODE, name)
    assert again is first
    assert len(fake_cupy.modules) == 1
    built = fake_cupy.modules[0]
    assert built["code"] == kernel_source()
    assert built["names"] == list(module_names(DECODE))
    assert tuple(built["options"]) == COMPILE_OPTIONS
    assert fake_cupy.fetched == [name]


def test_other_kernels_of_a_module_reuse_it_and_other_modules_build_their_own(fake_cupy):
    cache = KernelCache()
    for name in module_names(DECODE):
        cache.function(DECODE, name)
    assert len(fake_cupy.modules) == 1
    cache.function(PREFILL, module_names(PREFILL)[0])
    assert len(fake_cupy.modules) == 2 and len(cache) == 2
    assert fake_cupy.modules[1]["names"] == ["pagedkv_prefill<pkv_f16, signed char, 64>"]


def test_an_unknown_kernel_builds_nothing(fake_cupy):
    with pytest.raises(ValueError):
        KernelCache().function(DECODE, "pagedkv_decode<float, float, 128, 4>")
    assert fake_cupy.modules == []


def test_runtime_launch_compiles_on_first_launch_only(fake_cupy, monkeypatch):
    monkeypatch.setattr(CudaRuntime, "kernels", KernelCache())
    runtime = CudaRuntime(0)
    assert fake_cupy.modules == [] and runtime.num_sms == 132
    name = module_names(PREFILL)[0]
    runtime.launch(PREFILL, name, (3, 2), (128,), ("args",))
    runtime.launch(PREFILL, name, (5, 2), (128,), ("args",))
    assert len(fake_cupy.modules) == 1
    assert [launch[:3] for launch in fake_cupy.launched] == [(name, (3, 2), (128,)), (name, (5, 2), (128,))]


def test_every_name_expression_is_a_template_of_the_source():
    source = kernel_source()
    for kind in ("decode", "prefill", "write"):
        for name in module_names(ModuleKey(kind, "bfloat16", "int8", 96)):
            assert f"void __launch_bounds__(128) {name.split('<')[0]}(" in source


def test_real_cupy_builds_a_module_object_without_compiling():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    module = KernelCache().module(DECODE)
    assert isinstance(module, cupy.RawModule)
