"""How the ``vchan`` command reports: exit statuses and one-line messages."""

from __future__ import annotations

import sys

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "UsageError",
    "error",
    "oserror_text",
]

#: A runtime failure: no such domain, timeout, connection refused, no emulator, ...
EXIT_FAILURE = 1
#: A mistake of the user's (:class:`UsageError`), as argparse exits for its own.
EXIT_USAGE = 2
#: Ctrl-C: the status a shell gives a process SIGINT ended (128 + SIGINT).
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit status 2."""


def error(text: str) -> None:
    """Say ``text`` on stderr as the command's one line: ``vchan: text``."""
    print(f"vchan: {text}", file=sys.stderr, flush=True)


def oserror_text(exc: BaseException) -> str:
    """``exc`` in words: an OSError's strerror (and file), else its message or type."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__
