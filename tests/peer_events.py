"""How every peer process of the tests reports: one JSON object a line on stdout.

The peer scripts (``peer_roles.py``, ``compat_peer.py``, ``dropin_peer.py``,
``emulator_peer.py``, the rig's ``xen/roles.py``) all report through
:func:`emit`; the test side reads the lines back with ``procs.Proc.event``
(or, for a role in a Xen domU, ``xen/harness.py``).  Each line is flushed at
once: the test waits for it while the process goes on.

This file is shipped beside ``roles.py`` into the rig's domUs
(``xen/harness.py``), so it imports nothing of the tests.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def emit(**fields: Any) -> None:
    """One JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def emit_timed(**fields: Any) -> None:
    """:func:`emit` with ``t``, the time of the event by ``time.monotonic()``
    (one clock for every process of a machine: a test can time what it caused)."""
    emit(**fields, t=time.monotonic())
