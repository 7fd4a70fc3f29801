"""Run at interpreter start-up in programs started by ``vchan run``.

``vchan run -- PROGRAM`` puts this directory first on ``PYTHONPATH``, so
Python imports this module as ``sitecustomize`` when it starts: it makes
the program's event loops drop-in (:func:`vchan.dropin_loop.install`, the
loop kind from ``VCHAN_RUN_LOOP``), then runs the ``sitecustomize`` that
would have run without us, if there is one.  A failure to install is one
line on stderr; the program runs anyway, over TCP.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _install() -> None:
    try:
        from vchan import dropin_loop

        dropin_loop.install(os.environ.get("VCHAN_RUN_LOOP") or None)
    except Exception as exc:
        print(f"vchan run: drop-in not installed ({type(exc).__name__}: {exc}); "
              "the program uses TCP", file=sys.stderr)


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_install()
_chain()
