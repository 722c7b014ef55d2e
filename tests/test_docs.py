"""Keep the docs true: run every code block marked runnable, and name every public symbol."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pagedkv_core

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(bash|python) runnable\n(.*?)```", re.S)


def runnable_blocks():
    for path in DOCS:
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            yield pytest.param(match.group(1), match.group(2), id=f"{path.name}-{i}")


@pytest.mark.parametrize("kind, code", list(runnable_blocks()))
def test_runnable_blocks(kind, code, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if kind == "python":
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return
    for line in code.strip().splitlines():
        result = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 0, f"{line!r} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_there_are_runnable_blocks():
    assert len(list(runnable_blocks())) >= 3


def test_api_reference_names_every_public_symbol():
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in pagedkv_core.__all__ if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert missing == []
