"""The benchmark suite: vchan against TCP loopback and Unix sockets.

``vchan bench`` (or ``python -m vchan.bench``) runs it.  Its parts:

* :mod:`~vchan.bench.command` -- the command: options, defaults, :func:`main`;
* :mod:`~vchan.bench.suite` -- the plan of a run and its measurements in order;
* :mod:`~vchan.bench.processes` -- the server and client children, and the
  JSON-lines channel the parent drives them through;
* :mod:`~vchan.bench.endpoints` -- listening and connecting on each transport;
* the cases: :mod:`~vchan.bench.bulk`, :mod:`~vchan.bench.pingpong`,
  :mod:`~vchan.bench.concurrency` (many connections, setup rate),
  :mod:`~vchan.bench.dropin` and :mod:`~vchan.bench.matrix`;
* the report: :mod:`~vchan.bench.report` (Markdown, files), built from
  :mod:`~vchan.bench.results`, :mod:`~vchan.bench.targets`,
  :mod:`~vchan.bench.sections`, :mod:`~vchan.bench.plots` and
  :mod:`~vchan.bench.matrix_report`;
* :mod:`~vchan.bench.common` (names, sizes, readings every part shares) and
  :mod:`~vchan.bench.machine` (the machine and its memcpy bandwidth).
"""

from __future__ import annotations

from .command import main

__all__ = ["main"]
