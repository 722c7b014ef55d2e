"""The ``pagedkv`` command line.

The core's own commands live here; distributions above the core add theirs
(``pagedkv conformance`` from pagedkv-conformance) through the
``pagedkv_cli_commands`` hook and the ``pagedkv.cli`` entry points, so this
module imports none of them. A command this project ships elsewhere that is
not installed, and a plugin that failed to load, still get a subcommand that
says why and what to install.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import __version__
from ..contract.cli import CliCommand
from ..errors import PagedKvError
from ..plugins import BLOCK_ENV, CommandRegistry, default_registry

__all__ = ["main"]

BUILTIN_COMMANDS = ("backends", "demo", "bench")
"""The core's own commands: a plugin offering one of these names is refused."""


@dataclass(frozen=True, slots=True)
class _Shipped:
    """A command this project ships in another distribution: what it is and the line that installs it."""

    help: str
    what: str
    install: str


SHIPPED_COMMANDS: Mapping[str, _Shipped] = types.MappingProxyType({
    "conformance": _Shipped("run the conformance suite and print a per-area summary", "the conformance suite",
                            "pip install pagedkv-conformance"),
})
"""Commands of this project's other distributions; without their plugin ``pagedkv NAME`` says what to install."""

EXAMPLES = {
    "backends": "examples:\n  pagedkv backends\n  PAGEDKV_BLOCKED_PLUGINS=cupy pagedkv backends",
    "demo": ("examples:\n  pagedkv demo\n  pagedkv demo --requests 50 --plot blocks.png\n"
             "  pagedkv demo --backend torch --device cpu --seed 3\n"
             "  pagedkv demo --remote redis://127.0.0.1:6379/0"),
    "bench": ("examples (from a checkout):\n  pagedkv bench --backend numpy\n"
              "  pagedkv bench --out results.md --plot results.png -- -k decode"),
}


def _cmd_backends(args: argparse.Namespace) -> int:
    """The table of backends, built-in ones not installed included; exit 1 when none is usable here."""
    registry = default_registry()
    statuses = registry.available_backends()
    rows = [("backend", "available", "devices", "version / reason")]
    for name, status in statuses.items():
        devices = ", ".join(f"{d}{'' if p.available else ' (no)'}" for d, p in status.devices) or "-"
        detail = status.version if status.available else status.reason
        rows.append((name, "yes" if status.available else "no", devices, detail))
    for name, line in registry.not_installed().items():
        rows.append((name, "no", "-", f"not installed: {line}"))
    for name, error in registry.plugin_errors.items():
        rows.append((name, "no", "-", f"plugin failed to load: {error}"))
    for name, why in registry.plugin_refusals.items():
        rows.append((name, "no", "-", f"plugin {why}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    for name, status in statuses.items():
        for device, probe in status.devices:
            if not probe.available:
                print(f"  {name}:{device}: {probe.reason}")
    if not any(status.available for status in statuses.values()):
        print("pagedkv: no usable backend here; install one of the above (pagedkv-numpy runs anywhere)",
              file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    report = run_demo(args.backend, args.device, args.requests, args.seed, args.plot, remote=args.remote)
    if not report.ok:
        print(f"pagedkv: error: self-check failed: verified {report.verified}/{report.checked}, "
              f"consistent: {report.consistent}", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import run_bench

    plot = None if args.plot == "" else Path(args.plot)
    result = run_bench(Path(args.root), args.backend, Path(args.out), plot, args.pytest_args)
    if result.written:
        print("wrote " + " and ".join(str(path) for path in result.written))
    for note in result.notes:
        print(f"pagedkv: {note}", file=sys.stderr)
    return result.exit_code


def _unavailable(message: str) -> Callable[[argparse.Namespace], int]:
    """The run function of a command that cannot work here: one ``pagedkv: error:`` line, exit 2."""
    def run(args: argparse.Namespace) -> int:
        raise PagedKvError(message)
    return run


def _missing_commands(registry: CommandRegistry, present: Mapping[str, CliCommand]) -> dict[str, tuple[str, str]]:
    """Subcommands that stand in for commands no plugin provides here: name -> (help, error message).

    A command this project ships in another distribution says what to install;
    a plugin that failed to load is listed under its entry-point name (name it
    after its command) with the error, so ``pagedkv NAME`` explains itself.
    """
    missing: dict[str, tuple[str, str]] = {}
    for name, shipped in SHIPPED_COMMANDS.items():
        if name in present:
            continue
        if name in registry.plugin_errors:
            message = f"{shipped.what} failed to load ({registry.plugin_errors[name]}); reinstall it: {shipped.install}"
        elif registry.plugin_manager.is_blocked(name):
            message = f"{shipped.what} is switched off: {BLOCK_ENV} names {name!r}"
        else:
            message = f"{shipped.what} is not installed; {shipped.install}"
        missing[name] = (f"{shipped.help} (unavailable here: run it for the reason)", message)
    for name, error in registry.plugin_errors.items():
        if name not in present and name not in missing and name not in BUILTIN_COMMANDS:
            missing[name] = (f"unavailable here: plugin {name!r} failed to load (run it for the reason)",
                             f"command {name!r} is unavailable: plugin {name!r} failed to load: {error}")
    return missing


def _plugin_problems(registry: CommandRegistry) -> str:
    """The ``pagedkv --help`` lines for command plugins that failed to load or were refused."""
    lines = [f"  {name}: failed to load: {error}" for name, error in registry.plugin_errors.items()]
    lines += [f"  {name}: {why}" for name, why in registry.plugin_refusals.items()]
    return "\n\ncommand plugins not loaded:\n" + "\n".join(lines) if lines else ""


def _add_plugin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], registry: CommandRegistry) -> None:
    """One subparser per plugin command, then stand-ins that explain the commands missing here.

    Stand-ins and commands whose ``configure`` raised accept any arguments, so
    ``pagedkv conformance --backend numpy`` without the suite prints what to
    install instead of an argparse complaint about ``--backend``.
    """
    commands = registry.commands()
    for name, command in sorted(commands.items()):
        p = sub.add_parser(name, help=command.help, epilog=command.epilog or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        try:
            command.configure(p)
        except Exception as exc:  # a third party's bug must not take the other commands down
            p.set_defaults(func=_unavailable(f"command {name!r} is unavailable: its plugin could not set up its "
                                             f"arguments: {type(exc).__name__}: {exc}"), any_arguments=True)
            continue
        p.set_defaults(func=command.run)
    for name, (help_line, message) in sorted(_missing_commands(registry, commands).items()):
        p = sub.add_parser(name, help=help_line, description=message)
        p.set_defaults(func=_unavailable(message), any_arguments=True)  # whatever it is given: say why it cannot run


def build_parser(registry: CommandRegistry | None = None) -> argparse.ArgumentParser:
    """The ``pagedkv`` parser: the core's commands, then those plugins add (``registry``: found if not given)."""
    if registry is None:
        registry = CommandRegistry(reserved=BUILTIN_COMMANDS)
    parser = argparse.ArgumentParser(
        prog="pagedkv", description="Paged KV-cache layer: inspect backends, run the demo and the conformance suite.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pagedkv backends\n  pagedkv demo\n  pagedkv conformance --backend numpy\n  pagedkv --version"
               + _plugin_problems(registry),
    )
    parser.add_argument("--version", action="version", version=f"pagedkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list backends, their devices and why any is unavailable",
                       epilog=EXAMPLES["backends"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("demo", help="a continuous-batching serving run that checks itself and reports",
                       epilog=EXAMPLES["demo"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="numpy", help="backend to serve on (default: numpy)")
    p.add_argument("--device", default="cpu", help="device of that backend (default: cpu)")
    p.add_argument("--requests", type=int, default=200, help="synthetic requests to serve (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and the workload")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of block use and pressure over time")
    p.add_argument("--remote", default=None, metavar="URL",
                   help="share prefix blocks through a Redis/Valkey server, e.g. redis://127.0.0.1:6379/0 "
                        "(pip install 'pagedkv[redis]'); run twice to see the second run load them")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("bench", help="run the benchmark suites; write a markdown table and a PNG",
                       epilog=EXAMPLES["bench"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", action="append", default=[], help="only this backend's benchmarks (repeatable)")
    p.add_argument("--root", default=".", help="the pagedkv checkout (default: the current folder)")
    p.add_argument("--out", default="bench.md", help="markdown table to write")
    p.add_argument("--plot", default="bench.png", help="PNG chart to write ('' for none)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    p.set_defaults(func=_cmd_bench)
    _add_plugin_commands(sub, registry)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a pagedkv error is one line on stderr (exit 2), Ctrl-C one line (exit 130)."""
    parser = build_parser()
    # parse_args is parse_known_args plus this error; a command that cannot run here takes any arguments
    # (``pagedkv conformance --backend numpy`` without the suite installed), so it can say why instead
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command: Callable[[argparse.Namespace], int] = args.func  # set by every subparser (set_defaults)
    try:
        return command(args)
    except PagedKvError as exc:
        print(f"pagedkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pagedkv: {args.command} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
