"""Running a command's coroutine: the event loop, logging, and failures as one line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, UsageError, error, oserror_text

__all__ = ["run_coroutine"]

log = logging.getLogger(__name__)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vchan: %(message)s", stream=sys.stderr)
    logging.getLogger("vchan").setLevel(level)


def run_coroutine(args: argparse.Namespace,
                  coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``coro_fn()`` on the chosen loop; runtime failures as one line, exit 1."""
    from ..backend import BackendError, check_environment, get_backend
    from ..errors import NoSuchDomainError, VchanError
    from ..sim import SimError

    _setup_logging(args.verbose)
    try:
        check_environment()     # a bad VCHAN_* variable: one line before anything starts
        get_backend()           # and one that shows only in use, before we serve anyone
    except (BackendError, SimError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    runner: Callable[[Coroutine[Any, Any, int]], int]
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise UsageError("--loop uvloop: uvloop is not installed "
                             "(pip install 'vchan[uvloop]')") from None
        runner = uvloop.run
    elif args.loop == "asyncio":
        runner = asyncio.run
    else:
        raise UsageError(f"--loop must be asyncio or uvloop, got {args.loop!r}")
    started = False

    async def main() -> int:
        nonlocal started
        started = True
        return await coro_fn()

    coro = main()
    try:
        return runner(coro)
    except UsageError:
        raise
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        # asyncio.Runner (which uvloop.run uses too) installs its SIGINT
        # handler before it zeroes its count of interrupts: a Ctrl-C in
        # between cancels the main task before its first step and comes out
        # as CancelledError, not KeyboardInterrupt.  Nothing else cancels a
        # task that has not started.
        if started:
            raise
        error("interrupted")
        return EXIT_INTERRUPTED
    except (BackendError, SimError) as exc:
        error(str(exc))
    except NoSuchDomainError as exc:
        error(f"{exc}")
    except TimeoutError as exc:
        error(f"timed out: {exc}" if str(exc) else "timed out")
    except ConnectionRefusedError as exc:
        error(f"connection refused: {exc.strerror or exc}")
    except (OSError, VchanError, ValueError) as exc:
        if args.verbose >= 2:
            log.exception("failed")
        error(oserror_text(exc))
    finally:
        if not started:
            # A Ctrl-C before the loop ran it (while the runner made its loop,
            # or before uvloop.run's wrapper awaited it): close it, or Python
            # warns that it was never awaited.
            coro.close()
    return EXIT_FAILURE
