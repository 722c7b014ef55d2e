"""The command line: backends table, demo, bench, version, errors, and the subcommands plugins add."""

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


# --- subcommands added by plugins (the pagedkv_cli_commands hook, the pagedkv.cli entry points) ---

class FakeEntryPoint:
    """An installed plugin of the ``pagedkv.cli`` group: what ``importlib.metadata.entry_points`` hands over."""

    def __init__(self, name, load, dist="pagedkv-thirdparty"):
        self.name, self._load, self.dist = name, load, type("Dist", (), {"name": dist})()

    def load(self):
        return self._load()


def _cli_entry_points(monkeypatch, *fakes, keep_installed=True):
    """Replace the installed ``pagedkv.cli`` entry points (the backends group stays as installed)."""
    from importlib import metadata

    real = metadata.entry_points

    def entry_points(group):
        if group != "pagedkv.cli":
            return real(group=group)
        return [*fakes, *(real(group=group) if keep_installed else [])]

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def _greeting_plugin(name="greet", calls=None):
    from pagedkv_core import CliCommand
    from pagedkv_core.contract.hookspecs import hookimpl

    def configure(parser):
        parser.add_argument("--who", default="world")

    def run(args):
        if calls is not None:
            calls.append(args.who)
        print(f"hello {args.who}")
        return 0

    class Plugin:
        @hookimpl
        def pagedkv_cli_commands(self):
            return [CliCommand(name, "say hello", configure, run, epilog="examples:\n  pagedkv greet --who you")]

    return Plugin()


def _broken():
    raise ImportError("No module named 'pagedkv_broken_dependency'")


def test_a_plugin_adds_a_subcommand_through_the_hook(monkeypatch, capsys):
    calls = []
    plugin = _greeting_plugin(calls=calls)
    _cli_entry_points(monkeypatch, FakeEntryPoint("greet", lambda: plugin))
    assert main(["greet", "--who", "pagedkv"]) == 0
    assert calls == ["pagedkv"] and capsys.readouterr().out == "hello pagedkv\n"
    with pytest.raises(SystemExit):
        main(["greet", "--unknown"])  # a working command's arguments are checked as usual
    assert "unrecognized arguments: --unknown" in capsys.readouterr().err


def test_a_plugin_command_keeps_its_epilog_line_breaks(monkeypatch, capsys):
    plugin = _greeting_plugin()
    _cli_entry_points(monkeypatch, FakeEntryPoint("greet", lambda: plugin))
    with pytest.raises(SystemExit):
        main(["greet", "--help"])
    out = capsys.readouterr().out
    assert "--who WHO" in out and "examples:\n  pagedkv greet --who you\n" in out


def test_a_plugin_that_fails_to_import_leaves_the_rest_working_and_is_reported(monkeypatch, capsys):
    _cli_entry_points(monkeypatch, FakeEntryPoint("broken", _broken))
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "command plugins not loaded:" in out
    assert "broken: failed to load: ImportError: No module named 'pagedkv_broken_dependency'" in out
    assert "conformance" in out  # the installed plugins still add their commands
    assert main(["backends"]) == 0
    assert any(line.startswith("numpy") for line in capsys.readouterr().out.splitlines())
    assert main(["broken", "--any", "args"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pagedkv: error: command 'broken' is unavailable: plugin 'broken' failed to load: "
        "ImportError: No module named 'pagedkv_broken_dependency'")


def test_a_malformed_plugin_is_reported_not_fatal(monkeypatch):
    from pagedkv_core.contract.hookspecs import hookimpl
    from pagedkv_core.plugins import CommandRegistry

    class NotACommand:
        @hookimpl
        def pagedkv_cli_commands(self):
            return ["conformance"]

    class Unmarked:
        def pagedkv_cli_commands(self):  # no @hookimpl: pluggy would never call it
            return []

    class Raises:
        @hookimpl
        def pagedkv_cli_commands(self):
            raise RuntimeError("hook exploded")

    _cli_entry_points(monkeypatch, FakeEntryPoint("bad", NotACommand), FakeEntryPoint("unmarked", Unmarked),
                      FakeEntryPoint("raises", Raises), keep_installed=False)
    registry = CommandRegistry()
    assert registry.plugin_errors == {
        "bad": "TypeError: pagedkv_cli_commands returned 'conformance', not a CliCommand",
        "unmarked": "TypeError: it has no pagedkv_cli_commands function marked @hookimpl",
        "raises": "RuntimeError: hook exploded",
    }
    assert dict(registry.commands()) == {}


def test_a_plugin_cannot_take_a_core_command_or_another_plugins_name(monkeypatch, capsys):
    from pagedkv_core.plugins import BLOCK_ENV

    _cli_entry_points(monkeypatch, FakeEntryPoint("mydemo", lambda: _greeting_plugin("demo")),
                      FakeEntryPoint("second", lambda: _greeting_plugin("conformance")))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "mydemo: refused: it offers command 'demo', which is one of pagedkv's own commands" in out
    assert ("second: refused: it offers command 'conformance', which plugin 'conformance' (distribution "
            f"pagedkv-conformance) already provides; uninstall one of them, or switch this one off with "
            f"{BLOCK_ENV}=second") in out
    assert main(["demo", "--requests", "3"]) == 0  # still the core's demo
    assert "pagedkv demo report" in capsys.readouterr().out


def test_a_command_whose_configure_raises_says_so_and_the_rest_works(monkeypatch, capsys):
    from pagedkv_core import CliCommand
    from pagedkv_core.contract.hookspecs import hookimpl

    def configure(parser):
        parser.add_argument("--help")  # argparse refuses: -h/--help is already there

    class Plugin:
        @hookimpl
        def pagedkv_cli_commands(self):
            return [CliCommand("clash", "bad arguments", configure, lambda args: 0)]

    _cli_entry_points(monkeypatch, FakeEntryPoint("clash", Plugin))
    assert main(["clash", "--x"]) == 2
    assert "command 'clash' is unavailable: its plugin could not set up its arguments: ArgumentError" in \
        capsys.readouterr().err
    assert main(["backends"]) == 0


def test_direct_registration_checks_names():
    from pagedkv_core import InvalidArgument
    from pagedkv_core.app.cli import BUILTIN_COMMANDS
    from pagedkv_core.plugins import CommandRegistry

    registry = CommandRegistry(load_entry_points=False, reserved=BUILTIN_COMMANDS)
    registry.register(_greeting_plugin(), name="greet")
    assert list(registry.commands()) == ["greet"]
    with pytest.raises(InvalidArgument, match="'greet', which plugin 'greet' already provides"):
        registry.register(_greeting_plugin(), name="again")
    with pytest.raises(InvalidArgument, match="one of pagedkv's own commands"):
        registry.register(_greeting_plugin("bench"), name="bench-plugin")
    with pytest.raises(InvalidArgument, match="bad command name '--x'"):
        registry.register(_greeting_plugin("--x"), name="dashes")


def test_conformance_without_the_suite_says_what_to_install(monkeypatch, capsys):
    _cli_entry_points(monkeypatch, keep_installed=False)
    assert main(["conformance", "--backend", "numpy", "--device", "cpu", "--", "-x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pagedkv: error: the conformance suite is not installed; pip install pagedkv-conformance")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "conformance" in capsys.readouterr().out


def test_conformance_whose_plugin_fails_to_import_says_why(monkeypatch, capsys):
    _cli_entry_points(monkeypatch, FakeEntryPoint("conformance", _broken, "pagedkv-conformance"),
                      keep_installed=False)
    assert main(["conformance"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pagedkv: error: the conformance suite failed to load (ImportError: No module named "
        "'pagedkv_broken_dependency'); reinstall it: pip install pagedkv-conformance")


def test_conformance_switched_off_says_so(monkeypatch, capsys):
    from pagedkv_core.plugins import BLOCK_ENV

    monkeypatch.setenv(BLOCK_ENV, "conformance")
    assert main(["conformance", "--full"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pagedkv: error: the conformance suite is switched off: {BLOCK_ENV} names 'conformance'")
