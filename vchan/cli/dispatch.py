"""The ``vchan`` command's parser and :func:`main`: run a command, exit with its status."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, demo, nc, proxy, run, sim
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, error

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vchan`` command's parser: each command's module adds its own."""
    parser = argparse.ArgumentParser(
        prog="vchan",
        description="Xen inter-domain shared-memory channels (libxenvchan).",
    )
    parser.add_argument("--version", action="version", version=f"vchan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # In the order `vchan --help` lists them.
    for command in (demo, sim, run):
        command.add_parser(sub)
    nc.add_parsers(sub)
    proxy.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vchan`` command; its exit status."""
    parser = build_parser()
    args_list = sys.argv[1:] if argv is None else list(argv)
    from ..backend import BackendError
    from ..sim import SimError

    try:
        if args_list[:1] == ["bench"]:
            return bench.run(args_list[1:])
        args = parser.parse_args(args_list)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        result: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line, and the status a shell gives a process SIGINT ended.
        error("interrupted")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except (BackendError, SimError, OSError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    return result
