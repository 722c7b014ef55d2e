"""``pagedkv conformance``: the suite's subcommand of the ``pagedkv`` command.

The core's command line never imports this package; it finds this module
through the ``pagedkv.cli`` entry point and asks it for its command with the
``pagedkv_cli_commands`` hook. The module is imported every time ``pagedkv``
builds its parser, so pytest and the checks are imported only when the
command runs.
"""

from __future__ import annotations

import argparse

from pagedkv_core.contract.cli import CliCommand
from pagedkv_core.contract.hookspecs import hookimpl

__all__ = ["COMMAND", "EXAMPLES", "configure", "run", "pagedkv_cli_commands"]

EXAMPLES = ("examples:\n  pagedkv conformance --backend numpy --device cpu\n"
            "  pagedkv conformance --backend torch --dtype float16,bfloat16\n"
            "  pagedkv conformance --full -- -x -k attention")


def configure(parser: argparse.ArgumentParser) -> None:
    """The subcommand's arguments; anything after ``--`` goes to pytest."""
    parser.add_argument("--backend", help="backend to check (default: every available one)")
    parser.add_argument("--device", help="device to check (default: every device of the backend)")
    parser.add_argument("--dtype", action="append", default=[], help="storage dtype(s), repeatable or comma-separated")
    parser.add_argument("--full", action="store_true", help="include the slow full attention sweep")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")


def run(args: argparse.Namespace) -> int:
    """Refuse a typo in one line before pytest starts (``PagedKvError``), then run the suite; pytest's exit code."""
    from pagedkv_core.plugins import default_registry

    from .runner import run_conformance
    from .targets import check_request

    dtypes = [d.strip() for opt in args.dtype for d in opt.split(",") if d.strip()]
    check_request(default_registry(), args.backend, args.device, dtypes)
    return run_conformance(args.backend, args.device, dtypes, args.full, args.pytest_args)


COMMAND = CliCommand(name="conformance", help="run the conformance suite and print a per-area summary",
                     configure=configure, run=run, epilog=EXAMPLES)


@hookimpl
def pagedkv_cli_commands() -> list[CliCommand]:
    return [COMMAND]
