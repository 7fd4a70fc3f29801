"""The ``vchan`` command (also ``python -m vchan``): one module per concern.

* :mod:`.dispatch` -- the parser and :func:`main`: each command's module adds
  its subparser; dispatch runs the command and turns errors into exit
  statuses.
* :mod:`.errors` -- :class:`UsageError`, the exit statuses, one-line messages.
* :mod:`.options` -- checking arguments (domains, ports, peers, timeouts)
  and the options commands share.
* :mod:`.loop` -- running a command's coroutine on the chosen event loop,
  runtime failures reported as one line.
* :mod:`.nc` -- ``vchan listen`` and ``vchan connect`` (nc over vchan), over
  :mod:`.stdio` (stdin/stdout as a stream, progress).
* :mod:`.proxy` -- ``vchan proxy`` (and Xen's ``vchan-socket-proxy`` form),
  over :mod:`.sockets` (TCP and Unix socket addresses).
* :mod:`.sim` -- ``vchan sim`` (the emulated hypervisor); :mod:`.demo` --
  ``vchan demo``; :mod:`.run` -- ``vchan run`` (drop-in event loops).
  ``vchan bench`` is :mod:`vchan.bench`'s own parser, handed its arguments.

A mistake of the user's raises :class:`UsageError`: one line, exit status 2.
Runtime failures (no such domain, timeout, connection refused, ...) are one
line with exit status 1; Ctrl-C is one line and 130.
"""

from __future__ import annotations

from .dispatch import main
from .errors import UsageError

__all__ = ["UsageError", "main"]
