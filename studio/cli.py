"""The `studio` command: one entry point, a subcommand per job.

Each subcommand lives in the module that owns the job and registers itself here through a
``register(subparsers)`` function, so this file stays a thin dispatcher. Errors that are the
user's to fix (:class:`studio.errors.StudioError`) print as one line on stderr with exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from studio.logs import setup_logging

# modules that contribute subcommands, in the order `studio --help` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "studio.commands.info",
    "studio.commands.realsize",
    "studio.commands.generate",
    "studio.trainers.cli",
    "studio.micro.cli",
    "studio.evals.cli",
    "studio.formats.cli",
    "studio.text.cli",
    "studio.commands.library",
    "studio.commands.quantize",
    "studio.commands.ui",
    "studio.autolora.cli",
)

log = logging.getLogger("studio")


def add_group(sub: argparse._SubParsersAction, name: str, dest: str, metavar: str,
              **kwargs: str) -> argparse._SubParsersAction:
    """A subcommand that takes a required sub-subcommand (``studio eval SUITE``, ``studio decor ACTION``)."""
    p = sub.add_parser(name, **kwargs)
    group = p.add_subparsers(dest=dest, metavar=metavar)
    group.required = True
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="studio",
        description="diffusion-studio: train, keep and mix adapters for diffusers text-to-image models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # a subcommand module not built yet: no stub is shown
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    if argv is None:  # the process's own command line: choose its memory allocator first (studio.allocator)
        from studio.allocator import reexec_with_allocator

        reexec_with_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet = "-q" in argv or "--quiet" in argv
    setup_logging(debug, quiet)
    from studio.errors import StudioError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        result = args.func(args)
        return int(result or 0)
    except StudioError as exc:
        if debug:
            raise
        print(f"studio: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `studio ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
