"""What a plugin hands the ``pagedkv`` command to add a subcommand of its own.

The core's command line never imports the distributions above it (the
conformance suite, a third party's tools); they offer a :class:`CliCommand`
through the ``pagedkv_cli_commands`` hook and the ``pagedkv.cli`` entry-point
group instead, so a missing or broken one costs its own subcommand only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CliCommand"]


@dataclass(frozen=True, slots=True)
class CliCommand:
    """One ``pagedkv NAME`` subcommand.

    ``configure`` adds the subcommand's arguments to the subparser the core
    made for it (named ``name``, with ``help`` in the command list and
    ``epilog`` printed verbatim under ``pagedkv NAME --help``, so examples keep
    their line breaks). ``run`` gets the parsed arguments and returns the exit
    status; a :class:`~pagedkv_core.errors.PagedKvError` it raises becomes one
    ``pagedkv: error: ...`` line on stderr and exit 2, like the built-in
    commands' errors. Import heavy modules inside ``run``, not at module level:
    every ``pagedkv`` invocation imports the plugin to build the parser.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""
