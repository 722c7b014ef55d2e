"""The command line: backends table, demo, conformance, bench, version and errors."""

import subprocess
import sys

from pagedkv_core.cli import main


def test_backends_lists_numpy(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["backend", "available", "devices"]
    assert any(line.startswith("numpy") and " yes " in line for line in out.splitlines())


def test_demo_command_checks_itself(capsys):
    assert main(["demo", "--requests", "12", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "pagedkv demo report" in out and "verified" in out


def test_unknown_backend_is_a_one_line_error(capsys):
    assert main(["demo", "--backend", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown backend 'tpu'" in err and "known:" in err


def test_version_from_the_console_script():
    out = subprocess.run([sys.executable, "-m", "pagedkv_core.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("pagedkv ")


def test_bench_writes_a_table_and_a_plot(tmp_path, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    code = main(["bench", "--root", str(root), "--backend", "numpy", "--out", str(out), "--plot", str(plot),
                 "--", "-k", "decode_plan", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01"])
    assert code == 0
    table = out.read_text()
    assert "| benchmark |" in table and "decode_plan" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_an_unknown_backend(capsys):
    assert main(["bench", "--backend", "tpu"]) == 2
    assert "no benchmarks for backend" in capsys.readouterr().err
