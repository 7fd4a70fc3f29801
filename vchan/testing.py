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

Without pytest, :class:`Emulator` works as a context manager.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = ["Emulator", "vchan_domain", "vchan_emulator"]

_VARIABLES = ("VCHAN_BACKEND", "VCHAN_SIM_DIR", "VCHAN_DOMID")


class Emulator:
    """A private emulated hypervisor, and the environment of its domains.

    ``with Emulator() as emu:`` starts a daemon in a new temporary directory
    (or ``directory``), points this process at it as domain ``own_domid``,
    and on the way out stops the daemon, restores the environment and
    removes a directory it made.
    """

    def __init__(self, directory: Path | None = None, *, own_domid: int = 0) -> None:
        self._made: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            # Short: the emulator's socket paths must fit a sockaddr_un.
            self._made = tempfile.TemporaryDirectory(prefix="vchan-test-")
            directory = Path(self._made.name) / "sim"
        self.directory = directory
        self.own_domid = own_domid
        self._saved: dict[str, str | None] = {}
        self._held: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"<vchan.testing.Emulator {self.directory} own_domid={self.own_domid}>"

    def start(self) -> Emulator:
        """Start the daemon and point this process (its vchan backend) at it."""
        from . import backend, sim

        self._saved = {k: os.environ.get(k) for k in _VARIABLES}
        os.environ.update(VCHAN_BACKEND="sim", VCHAN_SIM_DIR=str(self.directory),
                          VCHAN_DOMID=str(self.own_domid))
        backend._reset_for_tests()
        sim.ensure_running(self.directory)
        return self

    def stop(self) -> None:
        """Stop the daemon, restore the environment, remove what we made."""
        from . import backend, sim

        for sock in self._held:
            sock.close()
        self._held.clear()
        sim.stop(self.directory)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        backend._reset_for_tests()
        if self._made is not None:
            self._made.cleanup()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def env(self, domid: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of domain ``domid`` on this emulator."""
        env = dict(os.environ if base is None else base)
        env.update(VCHAN_BACKEND="sim", VCHAN_SIM_DIR=str(self.directory),
                   VCHAN_DOMID=str(domid))
        return env

    def popen(self, argv: Sequence[str | os.PathLike[str]], *, domid: int,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` as a process of domain ``domid`` (``subprocess.Popen``)."""
        env = self.env(domid, kwargs.pop("env", None))
        return subprocess.Popen(list(argv), env=env, **kwargs)

    def hold_domain(self, domid: int) -> None:
        """Make domain ``domid`` exist until :meth:`release_domains` or :meth:`stop`.

        On Xen a domain exists before its programs run; an emulated one exists
        while a process of it is connected.  A C libxenvchan server needs its
        client's domain to exist: hold it first.
        """
        from .sim import compat

        self._held.append(compat.hold_domain(domid, self.directory))

    def release_domains(self) -> None:
        """Let the domains held with :meth:`hold_domain` go."""
        for sock in self._held:
            sock.close()
        self._held.clear()

    def domains(self) -> dict[int, dict[str, Any]]:
        """The emulator's domains now, by domid (``vchan sim status --json``)."""
        from . import sim

        status = sim.control({"cmd": "status"}, self.directory)
        return {d["domid"]: d for d in status["domains"]}

    def wait_for_domain(self, domid: int, timeout: float = 10.0) -> None:
        """Wait until domain ``domid`` exists (a process of it has connected)."""
        deadline = time.monotonic() + timeout
        while not self.domains().get(domid, {}).get("alive"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"emulated domain {domid} did not appear within "
                                   f"{timeout} s")
            time.sleep(0.02)


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
        from .sim import compat

        held.append(compat.hold_domain(domid, vchan_emulator.directory))
        return domid

    yield make
    for sock in held:
        sock.close()
