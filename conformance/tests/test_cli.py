"""``pagedkv conformance`` comes from this distribution, through the ``pagedkv.cli`` entry point and the hook."""

import subprocess
import sys
from pathlib import Path

import pytest

from pagedkv_core.app.cli import main
from pagedkv_core.plugins import CLI_ENTRY_POINT_GROUP, CommandRegistry

tomllib = pytest.importorskip("tomllib")


def test_the_hook_registers_the_conformance_command():
    from pagedkv_conformance import cli

    registry = CommandRegistry(load_entry_points=False)
    registry.register(cli, name="conformance")
    assert dict(registry.commands()) == {"conformance": cli.COMMAND}


def test_the_installed_entry_point_provides_it():
    from pagedkv_conformance import cli

    registry = CommandRegistry()
    assert registry.commands()["conformance"] is cli.COMMAND
    assert "conformance" not in registry.plugin_errors and "conformance" not in registry.plugin_refusals


def test_pyproject_declares_the_entry_point():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][CLI_ENTRY_POINT_GROUP] == {"conformance": "pagedkv_conformance.cli"}


def test_help_keeps_the_arguments_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["conformance", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backend BACKEND", "--device DEVICE", "--dtype DTYPE", "--full", "pytest_args"):
        assert option in out
    assert ("examples:\n  pagedkv conformance --backend numpy --device cpu\n"
            "  pagedkv conformance --backend torch --dtype float16,bfloat16\n"
            "  pagedkv conformance --full -- -x -k attention\n") in out


def test_arguments_reach_the_runner(monkeypatch):
    from pagedkv_conformance import runner

    calls = []
    monkeypatch.setattr(runner, "run_conformance", lambda *args: calls.append(args) or 0)
    assert main(["conformance", "--backend", "numpy", "--device", "cpu", "--dtype", "float32,float16",
                 "--dtype", "bfloat16", "--full", "--", "-x", "-k", "allocator"]) == 0
    assert calls == [("numpy", "cpu", ["float32", "float16", "bfloat16"], True, ["-x", "-k", "allocator"])]


def test_a_run_through_the_command_passes():
    # a process of its own: a pytest run nested in this one would share its modules and plugins
    result = subprocess.run([sys.executable, "-m", "pagedkv_core.app.cli", "conformance", "--backend", "numpy",
                             "--device", "cpu", "--", "-q", "-k", "allocator"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pagedkv conformance summary" in result.stdout and "allocator" in result.stdout
