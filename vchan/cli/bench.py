"""``vchan bench``: the front of the benchmark suite, which has its own parser.

The suite is :mod:`vchan.bench` (also ``python -m vchan.bench``); the
``vchan`` command lists ``bench`` among its commands and hands it every
argument after the word.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """List ``bench`` among the ``vchan`` command's subcommands (its help is its own)."""
    subparsers.add_parser(
        "bench", add_help=False,
        help="benchmark vchan against TCP and Unix sockets (vchan bench --help)")


def run(argv: list[str]) -> int:
    """Run the benchmark suite with ``argv`` (what follows ``vchan bench``)."""
    from ..backend import check_environment
    from ..bench import main as bench_main

    if not {"-h", "--help"} & set(argv):
        check_environment(domid=False)      # it chooses its domains itself
    return bench_main(argv)
