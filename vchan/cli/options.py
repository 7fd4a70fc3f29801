"""Checking the ``vchan`` command's arguments, and the options commands share.

Each check turns text into a value or raises :class:`~vchan.cli.errors.UsageError`
in one line; the rules themselves (domain ids, ports) are
:mod:`vchan.addresses`'.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..addresses import Port, check_port, parse_domid, parse_port
from .errors import UsageError

__all__ = ["common", "domid", "peers", "progress_options", "subcommand", "timeout",
           "vchan_port"]


def domid(text: str, what: str = "DOMID") -> int:
    """A domain id argument; ``what`` names it in the error."""
    try:
        return parse_domid(text, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def vchan_port(text: str) -> Port:
    """A vchan port argument: digits are a number, anything else a name."""
    port = parse_port(text)
    try:
        check_port(port)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad vchan port {text!r}: {exc}") from None
    return port


def peers(text: str) -> Any:
    """``--peers``: ``any``, one domain id, or ``D1,D2,...`` (a list)."""
    if text == "any":
        return "any"
    parts = [p for p in text.split(",") if p]
    if not parts:
        raise UsageError("--peers: name domain ids (D or D1,D2,...) or 'any'")
    domids = [domid(p, "--peers") for p in parts]
    return domids[0] if len(domids) == 1 else domids


def timeout(text: str) -> float | None:
    """``--timeout``: seconds, or ``inf`` for None (wait as long as it takes)."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--timeout must be a number of seconds or 'inf', got {text!r}") from None
    if value < 0 or math.isnan(value):
        raise UsageError(f"--timeout must be >= 0, got {text!r}")
    return None if math.isinf(value) else value


def subcommand(subparsers: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, **kw)`` for a command whose description and
    epilog keep their line breaks (aligned forms, one example a line)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    return parser


def common(p: argparse.ArgumentParser) -> None:
    """``--loop`` and ``-v``: every command that runs an event loop has them."""
    p.add_argument("--loop", default="asyncio", metavar="{asyncio,uvloop}",
                   help="event loop to run on (default asyncio)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="say what happens on stderr (-vv: more)")


def progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (commands that copy stdin and stdout)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show bytes and rates on stderr (default: when stderr is a terminal; "
                        "after 2 s)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress")
