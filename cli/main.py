"""The ``twinloop`` command line: one registry of commands, one map of errors to exit codes.

Each command lives in a module of this package whose ``add_parser(sub)`` adds its sub-parser
and sets its ``handler``; :data:`COMMANDS` lists those modules. Every handler returns an exit
code; an error of the user's input or a refusal of the system raises, and :func:`main` prints it
as one line (:mod:`twinloop.cli.errors`) — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from twinloop.cli.errors import EXIT_INTERRUPTED, fail, missing_extra, user_errors
from twinloop.cli.examples import add_examples

#: Exit code when standard output was closed by its reader (Python's convention).
EXIT_BROKEN_PIPE = 1

#: The modules of the commands, in the order of ``twinloop --help``.
COMMANDS = (
    "twinloop.cli.run",
    "twinloop.cli.report",
    "twinloop.cli.simulate",
    "twinloop.cli.hil",
    "twinloop.cli.evaluate",
    "twinloop.cli.train",
    "twinloop.cli.campaign",
    "twinloop.cli.export",
    "twinloop.cli.population",
    "twinloop.cli.twin",
    "twinloop.cli.therapies",
    "twinloop.cli.pendulum",
)


def _parser() -> argparse.ArgumentParser:
    import twinloop

    parser = argparse.ArgumentParser(
        prog="twinloop", description="Closed-loop therapy around a human digital twin."
    )
    parser.add_argument("--version", action="version", version=f"twinloop {twinloop.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    add_examples(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (errors print one line, never a traceback)."""
    args = _parser().parse_args(argv)
    if getattr(args, "verbose", None):  # --verbose: Ray's own messages on the console
        from twinloop.agents import ray_log

        ray_log.set_verbose(True)
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # the reader went away (``twinloop campaign --faults | head``)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error while Python flushes stdout
        return EXIT_BROKEN_PIPE
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        return fail(args.command, missing)
    except user_errors() as exc:
        return fail(args.command, exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
