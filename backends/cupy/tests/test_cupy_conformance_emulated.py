"""The pagedkv conformance suite against this backend, its kernels run by the CPU emulator.

All areas, every dtype the backend declares; slow (minutes cold), so it
runs only with ``PAGEDKV_CUPY_FULL=1``. On a GPU machine, ``pagedkv conformance
--backend cupy --device cuda:0`` runs the same checks on the device.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from cupy_emu_backend import EmuBackend
from cupy_emulator import EmuKernels
from pagedkv_conformance.runner import run_conformance
from pagedkv_core.plugins import register_backend
register_backend(EmuBackend(EmuKernels(Path({cache!r}))))
sys.exit(run_conformance("cupy-emu", "cuda:0", dtypes={dtypes!r}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtypes", [["float32", "float16"], ["bfloat16", "int8"]], ids="-".join)
def test_conformance_suite_passes_on_the_emulator(emu_kernels, dtypes, full_run):
    script = SCRIPT.format(tests=str(Path(__file__).parent), cache=str(emu_kernels.cache_dir), dtypes=dtypes)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "pagedkv conformance summary" in result.stdout
