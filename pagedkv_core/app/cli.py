"""The ``pagedkv`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .. import __version__
from ..errors import PagedKvError

__all__ = ["main"]

EXAMPLES = {
    "backends": "examples:\n  pagedkv backends\n  PAGEDKV_BLOCKED_PLUGINS=cupy pagedkv backends",
    "demo": ("examples:\n  pagedkv demo\n  pagedkv demo --requests 50 --plot blocks.png\n"
             "  pagedkv demo --backend torch --device cpu --seed 3\n"
             "  pagedkv demo --remote redis://127.0.0.1:6379/0"),
    "conformance": ("examples:\n  pagedkv conformance --backend numpy --device cpu\n"
                    "  pagedkv conformance --backend torch --dtype float16,bfloat16\n"
                    "  pagedkv conformance --full -- -x -k attention"),
    "bench": ("examples (from a checkout):\n  pagedkv bench --backend numpy\n"
              "  pagedkv bench --out results.md --plot results.png -- -k decode"),
}


def _cmd_backends(args: argparse.Namespace) -> int:
    """The table of backends, built-in ones not installed included; exit 1 when none is usable here."""
    from ..plugins import default_registry

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


def _cmd_conformance(args: argparse.Namespace) -> int:
    try:
        from pagedkv_conformance.runner import run_conformance
    except ImportError as exc:
        raise PagedKvError(f"the conformance suite is not installed ({exc}); pip install pagedkv-conformance") from exc
    from pagedkv_conformance.targets import check_request

    from ..plugins import default_registry

    dtypes = [d.strip() for opt in args.dtype for d in opt.split(",") if d.strip()]
    check_request(default_registry(), args.backend, args.device, dtypes)  # typos: one line, before pytest
    exit_code: int = run_conformance(args.backend, args.device, dtypes, args.full, args.pytest_args)
    return exit_code


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedkv", description="Paged KV-cache layer: inspect backends, run the demo and the conformance suite.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pagedkv backends\n  pagedkv demo\n  pagedkv conformance --backend numpy\n  pagedkv --version",
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
    p = sub.add_parser("conformance", help="run the conformance suite and print a per-area summary",
                       epilog=EXAMPLES["conformance"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", help="backend to check (default: every available one)")
    p.add_argument("--device", help="device to check (default: every device of the backend)")
    p.add_argument("--dtype", action="append", default=[], help="storage dtype(s), repeatable or comma-separated")
    p.add_argument("--full", action="store_true", help="include the slow full attention sweep")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    p.set_defaults(func=_cmd_conformance)
    p = sub.add_parser("bench", help="run the benchmark suites; write a markdown table and a PNG",
                       epilog=EXAMPLES["bench"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", action="append", default=[], help="only this backend's benchmarks (repeatable)")
    p.add_argument("--root", default=".", help="the pagedkv checkout (default: the current folder)")
    p.add_argument("--out", default="bench.md", help="markdown table to write")
    p.add_argument("--plot", default="bench.png", help="PNG chart to write ('' for none)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a pagedkv error is one line on stderr (exit 2), Ctrl-C one line (exit 130)."""
    args = build_parser().parse_args(argv)
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
