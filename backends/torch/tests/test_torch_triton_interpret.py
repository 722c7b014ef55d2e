"""Run the Triton kernels under Triton's interpreter, in a subprocess.

``TRITON_INTERPRET`` must be set before triton is imported and it switches
every kernel of the process to the interpreter, so the cases
(``triton_interpret_cases.py``) run in a child pytest with the variable set;
this session keeps its own settings. The child's failures are shown here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("torch")

CASES = Path(__file__).with_name("triton_interpret_cases.py")


def test_triton_kernels_match_the_oracle_under_the_interpreter(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install pagedkv-torch[triton])")
    report = tmp_path / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = (done.stdout + done.stderr)[-8000:]
    assert report.exists(), output
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert done.returncode == 0, output
    assert counts["tests"] >= 20 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, output)
