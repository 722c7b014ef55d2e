"""kernels.cu compiles with nvcc for Ampere (sm_80) and Hopper (sm_90), every template instance included.

The instances are listed by the same ``module_names`` the backend hands to
``cupy.RawModule``; ptxas runs too (``-cubin``), so register allocation and
shared-memory limits are checked, not just the C++. The default run compiles
the instances the benchmark and the int8/bfloat16 paths use; the full matrix
(every dtype pair x a spread of head dims) is slow and runs with
``PAGEDKV_CUPY_FULL=1``. Skips with the reason when nvcc is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from pagedkv_cupy.kernels import COMPILE_OPTIONS, ModuleKey, kernel_source, module_names

ARCHS = ("sm_80", "sm_90")
PAIRS = [("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32"),
         ("float16", "int8"), ("bfloat16", "int8"), ("float32", "int8")]
FULL_HEAD_DIMS = (1, 5, 8, 16, 24, 32, 64, 80, 96, 112, 128, 160, 192, 256)
DEFAULT_NAMES = (
    "pagedkv_decode<pkv_f16, pkv_f16, 128, 4>",
    "pagedkv_decode_reduce<pkv_f16, 128>",
    "pagedkv_prefill<pkv_f16, pkv_f16, 128>",
    "pagedkv_decode<pkv_bf16, signed char, 80, 2>",
    *module_names(ModuleKey("write")),
)


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


def compile_instances(names: Sequence[str], archs: Sequence[str], directory: Path) -> dict[str, str]:
    """Compile kernels.cu with ``names`` instantiated to one cubin per arch, concurrently; return ptxas' reports."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA compile check needs it")
    (directory / "kernels.cu").write_text(kernel_source())
    entries = ",\n".join(f"    (void*)&{name}" for name in names)
    unit = directory / "instances.cu"
    unit.write_text(f'#include "kernels.cu"\nvoid* pkv_instances[] = {{\n{entries}\n}};\n')
    running = {}
    for arch in archs:
        command = [compiler, *COMPILE_OPTIONS, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-Werror", "all-warnings",
                   "-o", str(directory / f"kernels_{arch}.cubin"), str(unit)]
        running[arch] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = {}
    for arch, process in running.items():
        _, stderr = process.communicate()
        assert process.returncode == 0, f"nvcc failed for {arch}:\n{stderr[-4000:]}"
        assert (directory / f"kernels_{arch}.cubin").stat().st_size > 0
        reports[arch] = stderr
    return reports


def compiled_entries(report: str) -> int:
    return len(re.findall(r"Compiling entry function", report))


def test_kernels_compile_for_ampere_and_hopper(tmp_path):
    for arch, report in compile_instances(DEFAULT_NAMES, ARCHS, tmp_path).items():
        assert compiled_entries(report) == len(DEFAULT_NAMES), arch
        assert "error" not in report.lower()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_instance_compiles_for(arch, tmp_path, full_run):
    keys = [ModuleKey(kind, q, kv, d) for kind in ("decode", "prefill") for q, kv in PAIRS for d in FULL_HEAD_DIMS]
    names = sorted({name for key in keys + [ModuleKey("write")] for name in module_names(key)})
    report = compile_instances(names, [arch], tmp_path)[arch]
    assert compiled_entries(report) == len(names)
