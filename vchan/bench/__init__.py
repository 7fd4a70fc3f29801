"""The benchmark suite: vchan against TCP loopback and Unix sockets.

``vchan bench`` (or ``python -m vchan.bench``) runs it: see
:mod:`vchan.bench.streams` for what is measured and how, and
:mod:`vchan.bench.report` for the Markdown table, the targets and the plots.
"""

from __future__ import annotations

from .streams import main

__all__ = ["main"]
