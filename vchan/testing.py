"""Testing code that uses vchan, without Xen: a pytest plugin.

Installed with vchan (the ``pytest11`` entry point ``vchan``), it gives a
test session a private emulated hypervisor, and its tests domains to run
peers in::

    import vchan

    async def test_echo(vchan_emulator):
        server = await vchan.start_server(handle, "echo", peers=vchan.own_domid())
        reader, writer = await vchan.open_connection(vchan.own_domid(), "echo")
        ...

    def test_with_a_peer_process(vchan_emulator):
        peer = vchan_emulator.popen([sys.executable, "peer.py"], domid=2)
        ...

The test process itself is in domain 0 (privileged, as dom0: it may serve
``peers="any"``); every other domain is a process started with
:meth:`Emulator.popen` (or any process given :meth:`Emulator.env`).  The
emulator keeps Xen's rules between domains (see the README's "The emulator").

Fixtures:

* ``vchan_emulator`` (session scope): an :class:`Emulator` in a private state
  directory, started before the first test that asks for it and stopped after
  the last; ``VCHAN_BACKEND``, ``VCHAN_SIM_DIR`` and ``VCHAN_DOMID`` point at
  it while it runs (and are restored after).
* ``vchan_domain``: a factory for domains that exist for one test:
  ``vchan_domain(5)`` makes domain 5 exist (as a Xen domain would, before its
  programs start) until the test ends, and returns 5.

Without pytest, :class:`Emulator` (from :mod:`vchan.sim.private`, which
needs no pytest) works as a context manager.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from .sim.private import Emulator

__all__ = ["Emulator", "vchan_domain", "vchan_emulator"]


@pytest.fixture(scope="session")
def vchan_emulator() -> Iterator[Emulator]:
    """A private emulated hypervisor for the test session; this process is domain 0."""
    with Emulator() as emulator:
        yield emulator


@pytest.fixture
def vchan_domain(vchan_emulator: Emulator) -> Iterator[Callable[[int], int]]:
    """``vchan_domain(N)``: domain N exists until the test ends; returns N."""
    held: list[socket.socket] = []

    def make(domid: int) -> int:
        held.append(vchan_emulator.hold_domain(domid))
        return domid

    yield make
    for sock in held:
        sock.close()
