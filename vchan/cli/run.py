"""``vchan run``: a program whose event loops are drop-in, and exec'ing programs.

:func:`program_argv`, :func:`find_program` and :func:`exec_program` are also
how ``vchan sim run`` starts its program.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from .errors import UsageError

__all__ = ["add_parser", "exec_program", "find_program", "program_argv"]

# vchan/_site: its sitecustomize makes every event loop drop-in (vchan.dropin_loop).
_SITE = Path(__file__).resolve().parents[1] / "_site"


def program_argv(command: list[str], missing: str) -> list[str]:
    """``-- PROGRAM ARGS`` as given (argparse.REMAINDER keeps the ``--``); ``missing``
    is the :class:`UsageError` when there is no program."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError(missing)
    return command


def find_program(argv: list[str], what: str) -> str:
    """The path of ``argv[0]`` on ``$PATH``; ``what`` (the command) names the error."""
    program = shutil.which(argv[0])
    if program is None:
        raise UsageError(f"{what}: no program {argv[0]!r}")
    return program


def exec_program(program: str, argv: list[str], env: Mapping[str, str]) -> NoReturn:
    """Become ``program`` (what we printed so far goes out first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, argv, env)


def _run(args: argparse.Namespace) -> int:
    """Exec a program whose event loops are drop-in (vchan.dropin_loop.install)."""
    argv = program_argv(list(args.command), "run: name the program (vchan run -- PROGRAM ARGS)")
    program = find_program(argv, "run")
    env = dict(os.environ, VCHAN_RUN_LOOP=args.loop or "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SITE), env.get("PYTHONPATH")) if p)
    exec_program(program, argv, env)


def add_parser(subparsers: Any) -> None:
    """Add ``run`` to the ``vchan`` command's subparsers."""
    runp = subparsers.add_parser(
        "run", help="run an unmodified asyncio program with drop-in TCP (vchan to "
                    "co-resident domains)",
        description="Run PROGRAM (a Python program, or anything that runs one) with every\n"
                    "event loop it makes drop-in: its TCP connections and servers by host\n"
                    "and port (asyncio streams, aiohttp, redis.asyncio, ...) use vchan to\n"
                    "domains of this host that serve the address as drop-in servers, and\n"
                    "TCP to everything else (docs/dropin.md).  Python programs it starts\n"
                    "inherit it.",
        epilog="examples:\n"
               "  vchan run -- python app.py\n"
               "  vchan run --loop uvloop -- python -m aiohttp.web -H 10.0.0.1 -P 8080 app:main\n"
               "  VCHAN_DOMID=2 vchan run -- python client.py     # on the emulator",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runp.add_argument("--loop", choices=["asyncio", "uvloop"],
                      help="the event loop asyncio.run() and asyncio.new_event_loop() give "
                           "(default: the program's own choice)")
    runp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                      help="the program and its arguments")
    runp.set_defaults(func=_run)
