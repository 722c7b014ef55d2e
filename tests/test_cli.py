"""The command line: backends table, demo, conformance, bench, version and errors."""

import signal
import subprocess
import sys

import pytest

from pagedkv_core.app.cli import main


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
    out = subprocess.run([sys.executable, "-m", "pagedkv_core.app.cli", "--version"], capture_output=True, text=True)
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


def test_backends_with_core_only_lists_what_to_install_and_fails(monkeypatch, capsys):
    from importlib import metadata

    from pagedkv_core import plugins

    monkeypatch.setattr(metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(plugins, "_default", None)  # a fresh registry that finds no plugin; restored after
    assert main(["backends"]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert set(rows) == {"numpy", "torch", "mlx", "cupy"}
    assert "not installed: pip install pagedkv-numpy" in rows["numpy"]
    assert "pip install ./backends/torch" in rows["torch"]
    assert "no usable backend here" in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--requests", "0"], "--requests must be an integer from 1 to 10,000, got 0"),
    (["--requests", str(10**9)], "--requests must be an integer from 1 to 10,000"),
    (["--remote", "foo://x"], "bad Redis/Valkey URL 'foo://x'"),
    (["--remote", "redis://127.0.0.1:notaport/0"], "bad Redis/Valkey URL"),
    (["--backend", "nmupy"], "did you mean 'numpy'?"),
], ids=["seed", "requests-0", "requests-huge", "remote-scheme", "remote-port", "backend-typo"])
def test_demo_bad_arguments_are_one_line_errors(capsys, args, message):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "pagedkv-nmupy" not in err


def test_ctrl_c_in_the_demo_is_one_line_and_exit_130():
    child = subprocess.Popen([sys.executable, "-m", "pagedkv_core.app.cli", "demo", "--requests", "5000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stdout.readline().startswith("pagedkv demo on numpy:cpu")  # serving has begun
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert err.strip() == "pagedkv: demo interrupted"


def test_bench_outside_a_checkout_says_so(tmp_path, capsys):
    assert main(["bench", "--root", str(tmp_path), "--out", str(tmp_path / "b.md")]) == 2
    assert "no benchmark suites under" in capsys.readouterr().err
    assert not (tmp_path / "b.md").exists()


def test_bench_without_pytest_benchmark_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else real(name, *a))
    assert main(["bench", "--backend", "numpy"]) == 2
    assert "pip install pytest-benchmark" in capsys.readouterr().err


def test_bench_claims_only_files_it_wrote(tmp_path, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    code = main(["bench", "--root", str(root), "--backend", "numpy", "--out", str(out), "--plot", str(plot),
                 "--", "-k", "no_such_benchmark"])
    captured = capsys.readouterr()
    assert code != 0 and "wrote nothing" in captured.err
    assert "wrote " not in captured.out and not out.exists() and not plot.exists()
    assert main(["bench", "--root", str(root), "--out", str(tmp_path / "missing" / "b.md")]) == 2
    assert "does not exist" in capsys.readouterr().err
