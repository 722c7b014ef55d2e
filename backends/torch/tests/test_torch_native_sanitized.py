"""The compiled decode kernel's tests again, on a build with AddressSanitizer and UBSan.

The kernel is C over raw pointers: a read past a row, a block or a scratch
buffer would not fail a numeric test if the bytes beyond happened to be
harmless. Here the module is rebuilt from ``csrc/`` with
``-fsanitize=address,undefined`` into a temporary folder, and the whole of
``test_torch_native_decode.py`` and ``test_torch_native_bounds.py`` (hand-made
indexes with block ids and lengths out of range, which the kernel must refuse
before reading) run in a child process that loads that build
in place of the installed one (with the ASan runtime preloaded, as it must
come first, and pytest's output capture off, so a sanitizer's report reaches
the parent). Any invalid access or undefined behaviour ends the child.
Skipped where GCC or its sanitizer runtimes are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("torch")

CSRC = Path(__file__).resolve().parents[1] / "csrc"
LOADER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pagedkv_torch._cpu_decode", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["pagedkv_torch._cpu_decode"] = module
import pytest
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", *sys.argv[2:]]))  # -s: a report must reach stderr
"""


def _runtime(compiler: str, name: str) -> str | None:
    found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    gcc = shutil.which("gcc")
    if sys.platform != "linux" or gcc is None:
        pytest.skip("needs GCC on Linux")
    asan, ubsan = _runtime(gcc, "libasan.so"), _runtime(gcc, "libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("GCC's sanitizer runtimes (libasan, libubsan) are not installed")
    module = tmp_path / f"_cpu_decode{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-Wno-psabi",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    f"-I{sysconfig.get_paths()['include']}", str(CSRC / "cpu_decode.c"), "-o", str(module)],
                   check=True, capture_output=True, text=True)
    tests = [str(Path(__file__).with_name(name)) for name in ("test_torch_native_decode.py",
                                                              "test_torch_native_bounds.py",
                                                              "test_torch_native_lse.py")]
    env = dict(os.environ, LD_PRELOAD=f"{asan} {ubsan}", ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    child = subprocess.run([sys.executable, "-c", LOADER, str(module), *tests], env=env, cwd=Path.cwd(),
                           capture_output=True, text=True, timeout=600)
    output = child.stdout + child.stderr
    first = min((i for i in (output.find("ERROR: AddressSanitizer"), output.find("runtime error:")) if i >= 0),
                default=max(0, len(output) - 4000))
    report = output[first:first + 4000]
    assert child.returncode == 0, f"sanitized run failed:\n{report}"
    assert "passed" in child.stdout and "Sanitizer" not in child.stderr, report
