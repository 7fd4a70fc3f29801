"""A private emulated hypervisor: one place for "an emulator for this run".

The test suite, the pytest plugin (:mod:`vchan.testing`), ``vchan bench`` and
the benchmark scripts all need the same thing: a daemon in a directory of
their own (so that they neither see nor disturb the user's emulator), this
process pointed at it, and everything put back afterwards::

    from vchan import sim

    with sim.private() as emu:              # a new daemon in a new directory
        peer = emu.popen([sys.executable, "peer.py"], domid=2)
        ...

    with sim.private(reuse_env=True) as emu:
        ...     # VCHAN_SIM_DIR's emulator if the caller set one (started if it
                # was not running, and then stopped again), else a private one
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Emulator", "private"]

_VARIABLES = ("VCHAN_BACKEND", "VCHAN_SIM_DIR", "VCHAN_DOMID")


class Emulator:
    """A private emulated hypervisor, and the environment of its domains.

    ``with Emulator() as emu:`` starts a daemon in a new temporary directory
    (or ``directory``), points this process at it as domain ``own_domid``
    (``None``: ``VCHAN_DOMID`` unset, which is domain 0), and on the way out
    stops the daemon, restores the environment and removes a directory it
    made.  ``started`` says whether this object started the daemon (and so
    stops it): an emulator already running in ``directory`` is used as it is
    and left running.
    """

    def __init__(self, directory: Path | None = None, *,
                 own_domid: int | None = 0) -> None:
        self._made: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            # Short: the emulator's socket paths must fit a sockaddr_un.
            self._made = tempfile.TemporaryDirectory(prefix="vchan-")
            directory = Path(self._made.name) / "sim"
        self.directory = directory
        self.own_domid = own_domid
        self.started = False
        self._saved: dict[str, str | None] = {}
        self._held: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"<vchan Emulator {self.directory} own_domid={self.own_domid}>"

    def start(self) -> Emulator:
        """Start the daemon (unless one runs there) and point this process at it."""
        from .. import backend, sim

        self._saved = {k: os.environ.get(k) for k in _VARIABLES}
        os.environ.update(VCHAN_BACKEND="sim", VCHAN_SIM_DIR=str(self.directory))
        if self.own_domid is None:
            os.environ.pop("VCHAN_DOMID", None)
        else:
            os.environ["VCHAN_DOMID"] = str(self.own_domid)
        backend._reset_for_tests()
        try:
            self.started = not sim.is_running(self.directory)
            sim.ensure_running(self.directory)
        except BaseException:
            self._restore()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemon if this object started it, restore the environment,
        remove what we made."""
        from .. import sim

        self.release_domains()
        try:
            if self.started:
                sim.stop(self.directory)
                self.started = False
        finally:
            self._restore()

    def _restore(self) -> None:
        from .. import backend

        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}
        backend._reset_for_tests()
        if self._made is not None:
            self._made.cleanup()
            self._made = None

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

    def hold_domain(self, domid: int) -> socket.socket:
        """Make domain ``domid`` exist until :meth:`release_domains` or :meth:`stop`.

        On Xen a domain exists before its programs run; an emulated one exists
        while a process of it is connected.  A C libxenvchan server needs its
        client's domain to exist: hold it first.  Closing the returned socket
        lets the domain go early.
        """
        from . import compat

        sock = compat.hold_domain(domid, self.directory)
        # (Sockets the caller closed early need no keeping.)
        self._held = [s for s in self._held if s.fileno() >= 0]
        self._held.append(sock)
        return sock

    def release_domains(self) -> None:
        """Let the domains held with :meth:`hold_domain` go."""
        for sock in self._held:
            sock.close()
        self._held.clear()

    def domains(self) -> dict[int, dict[str, Any]]:
        """The emulator's domains now, by domid (``vchan sim status --json``)."""
        from .. import sim

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


def private(*, reuse_env: bool = False, own_domid: int | None = 0) -> Emulator:
    """An emulator for this run, as a context manager (:class:`Emulator`).

    A new daemon in a new temporary directory, unless ``reuse_env`` and the
    caller set ``VCHAN_SIM_DIR``: then that directory's emulator (started if
    none runs there, and stopped again on the way out; one already running is
    left as it was, with its grant limit and its other users).
    """
    named = os.environ.get("VCHAN_SIM_DIR")
    if reuse_env and named:
        return Emulator(Path(named), own_domid=own_domid)
    return Emulator(own_domid=own_domid)
