"""``vchan.Vchan``: one connection for code without asyncio.

The model is libxenvchan's: a server publishes a ring and returns at once,
a client connects to it; both then read and write, blocking or not, and
``fileno()`` can be handed to ``select``/``poll``.  Python conventions
replace C's return codes: a non-blocking call that cannot proceed raises
:class:`BlockingIOError`, end of stream is ``b""``, a peer that went away
while we write is :class:`BrokenPipeError`.  The names say how much a call
moves: :meth:`Vchan.read` / :meth:`Vchan.read_into` / :meth:`Vchan.write` what
there is (``libxenvchan_read`` / ``write``), :meth:`Vchan.recv_exactly` and
:meth:`Vchan.send` all of it or nothing (``libxenvchan_recv`` / ``send``).
"""

from __future__ import annotations

import contextlib
import secrets
import select
import time
import warnings
from typing import Any, Self

from . import handshake
from .addresses import check_domid, check_port, check_ring_size, vchan_path
from .devices import EventChannel
from .endpoint import DEFAULT_RING_SIZE, Endpoint
from .errors import HalfCloseUnsupportedError, NoSuchDomainError
from .handshake import run_sync
from .ring import LIVE_CONNECTED, LIVE_WAITING, peer_gone_error
from .xenstore import XenStoreSync

__all__ = ["Vchan", "own_domid"]

EMULATOR_SLICE = 0.2        # a blocking wait on the emulator looks at its daemon this often

def own_domid() -> int:
    """This process's domain id."""
    from .backend import get_backend

    backend = get_backend()
    if backend.domid is not None:
        return backend.domid
    from .xenstore import XenStoreSync

    with XenStoreSync() as xs:
        return int(xs.read("domid"))


class Vchan:
    """A libxenvchan connection, blocking or not (``blocking`` attribute)."""

    def __init__(self, endpoint: Endpoint, *, blocking: bool, peer: int, port: int | str,
                 xs_path: str | None) -> None:
        self._ep = endpoint
        self.blocking = blocking
        self.peer = peer
        self.port = port
        self._xs_path = xs_path
        self._closed = False

    # -- set-up -----------------------------------------------------------------

    @classmethod
    def server(cls, domid: int, port: int | str, *, read_min: int = DEFAULT_RING_SIZE,
               write_min: int = DEFAULT_RING_SIZE, blocking: bool = True) -> Vchan:
        """Publish a raw libxenvchan server for domain ``domid`` and return.

        Like ``libxenvchan_server_init``: the client connects later;
        :meth:`wait_connected` waits for it.  Raises
        :class:`~vchan.NoSuchDomainError` if domain ``domid`` does not exist
        where that is known (the emulator; Xen lets a ring be made for any
        domain id).
        """
        check_domid(domid)
        port_s = check_port(port)
        check_ring_size(read_min, "read_min")
        check_ring_size(write_min, "write_min")
        own = own_domid()
        try:
            endpoint = Endpoint.serve(domid, read_min=read_min, write_min=write_min)
        except ProcessLookupError as exc:
            raise NoSuchDomainError(f"vchan client domain {domid} does not exist: a raw "
                                    f"server's ring is for one domain, which must exist "
                                    f"({exc})") from None
        path = vchan_path(own, domid, port_s)
        try:
            with XenStoreSync() as xs:
                run_sync(handshake.publish(path, endpoint.ring_ref, endpoint.port, own, domid), xs)
        except BaseException:
            endpoint.close()
            raise
        return cls(endpoint, blocking=blocking, peer=domid, port=port, xs_path=path)

    @classmethod
    def client(cls, domid: int, port: int | str, *, timeout: float | None = None,
               blocking: bool = True, read_min: int = 0, write_min: int = 0) -> Vchan:
        """Connect to vchan ``port`` of domain ``domid`` (raw or listener server).

        Blocks up to ``timeout`` seconds (None: as long as the server's
        domain exists) for the server, on a XenStore watch; a listener
        server gives this connection a ring of its own.  ``timeout=0`` looks
        once and does not wait: it connects to a raw server published now,
        else raises :class:`TimeoutError` (a listener's answer is a round
        trip away).  Raises as :func:`vchan.create_connection` does.
        """
        from .handshake import client_cleanup, client_rendezvous, not_ready
        from .listener import (
            domain_exists,
            raw_retry_grace,
            wait_for_server_domain_sync,
        )

        check_domid(domid)
        port_s = check_port(port)
        check_ring_size(read_min, "read_min")
        check_ring_size(write_min, "write_min")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
        own = own_domid()
        evtchn = EventChannel()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # On the emulator, a server started just before us may not be there yet.
            wait_for_server_domain_sync(evtchn, domid, timeout)
            nonce = secrets.token_hex(8)
            with XenStoreSync() as xs:
                watch = xs.watch(vchan_path(domid, own, port_s))

                def wait_at_most(grace: float | None) -> None:
                    # Until the watch fires; once a second, is the domain still there?
                    # TimeoutError: with no argument after ``grace`` seconds,
                    # with a message at the caller's deadline.
                    end = None if grace is None else time.monotonic() + grace
                    while True:
                        now = time.monotonic()
                        if deadline is not None and deadline <= now:
                            raise TimeoutError(f"no vchan server at domain {domid} port "
                                               f"{port} within {timeout} s")
                        if end is not None and end <= now:
                            raise TimeoutError
                        left = min(t - now for t in (deadline, end, now + 1.0)
                                   if t is not None)
                        try:
                            watch.wait(left)
                            return
                        except TimeoutError:
                            if not domain_exists(evtchn, domid):
                                raise NoSuchDomainError(
                                    f"vchan server domain {domid} went away while we "
                                    "waited for it") from None

                def wait() -> None:
                    wait_at_most(None)

                try:
                    while True:
                        answer = run_sync(client_rendezvous(
                            own=own, server=domid, port=port_s, nonce=nonce,
                            read_min=read_min, write_min=write_min, session=False,
                            wait=timeout != 0), xs, wait=wait)
                        if answer is None:
                            raise TimeoutError(not_ready(domid, port, sessions=False))
                        try:
                            endpoint = Endpoint.connect(domid, answer.ring_ref, answer.port,
                                                        evtchn=evtchn)
                            break
                        except OSError as exc:
                            # A raw server between clients or serving another:
                            # as the asyncio client, wait for its next ring.
                            if timeout == 0:
                                raise
                            grace = raw_retry_grace(exc)
                            try:
                                wait_at_most(grace)
                            except TimeoutError as late:
                                if late.args:       # the caller's deadline
                                    raise TimeoutError(f"{late} ({exc})") from None
                                raise exc from None     # the entry stayed as it was
                finally:
                    watch.close()
                    run_sync(client_cleanup(own=own, server=domid, port=port_s, nonce=nonce),
                             xs)
            endpoint.owns_evtchn = True
        except BaseException:
            evtchn.close()
            raise
        return cls(endpoint, blocking=blocking, peer=domid, port=port, xs_path=None)

    # -- state ------------------------------------------------------------------

    def _live(self, what: str) -> Endpoint:
        if self._closed:
            raise ValueError(f"{what} on a closed Vchan")
        return self._ep

    def fileno(self) -> int:
        """The event-channel descriptor: readable when the peer signalled us."""
        return self._live("fileno").evtchn.fileno()

    def is_open(self) -> bool:
        """Whether the peer is connected or (server) still expected."""
        return self._live("is_open").ring.peer_live() in (LIVE_CONNECTED, LIVE_WAITING)

    @property
    def connected(self) -> bool:
        return self._live("connected").ring.peer_live() == LIVE_CONNECTED

    def data_ready(self) -> int:
        """Bytes that can be read now."""
        return self._live("data_ready").ring.data_ready()

    def buffer_space(self) -> int:
        """Bytes that can be written now."""
        return self._live("buffer_space").ring.buffer_space()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the peer signals us; False on timeout.

        On the emulator the wait looks at its daemon every
        ``EMULATOR_SLICE`` seconds and raises :class:`vchan.sim.EmulatorError`
        if it died or was stopped: with it gone, nothing would tell us that
        the peer went too.
        """
        ep = self._live("wait")
        fd = ep.evtchn.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        emulated = ep.evtchn.backend.name == "sim"
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if emulated:
                left = EMULATOR_SLICE if left is None else min(left, EMULATOR_SLICE)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                break
            if emulated and (failure := ep.evtchn.check()) is not None:
                raise failure
            if deadline is not None and time.monotonic() >= deadline:
                return False
        while (port := ep.evtchn.pending()) is not None:
            ep.evtchn.unmask(port)
        return True

    def wait_connected(self, timeout: float | None = None) -> None:
        """(Server) block until the client has connected."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = self._live("wait_connected").ring.peer_live()
            if live == LIVE_CONNECTED:
                return
            if live != LIVE_WAITING:
                raise ConnectionResetError("the vchan client went away before connecting")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no vchan client within {timeout} s")
            self.wait(left)

    def _peer_gone(self) -> bool:
        return self._ep.ring.peer_live() == 0

    def _gone_error(self) -> OSError:
        return peer_gone_error(self._ep.ring.peer_flags(), self.peer)

    def _block(self, what: str) -> None:
        if not self.blocking:
            raise BlockingIOError(f"{what} would block")
        self.wait()

    # -- I/O --------------------------------------------------------------------

    def read_into(self, buffer: Any) -> int:
        """Read up to len(buffer) bytes into it; 0 means end of stream."""
        ep = self._live("read")
        while True:
            n = ep.ring.read_into(buffer)
            ep.flush_notify()
            if n or not len(memoryview(buffer)):
                return n
            if self._peer_gone() or ep.ring.peer_eof():
                # Data written just before the close must not be lost.
                n = ep.ring.read_into(buffer)
                ep.flush_notify()
                return n
            self._block("read")

    def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at end of stream."""
        buf = bytearray(n)
        got = self.read_into(buf)
        return bytes(buf[:got])

    def recv_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (at most the ring's size), as ``libxenvchan_recv``.

        Blocking, waits until all ``n`` are there; non-blocking, takes them
        only when all are there, else raises :class:`BlockingIOError`.
        Raises :class:`EOFError` if the stream ends first.  For "up to ``n``"
        (what ``socket.recv`` means), use :meth:`read`.
        """
        ep = self._live("recv_exactly")
        buf = bytearray(n)
        while True:
            if ep.ring.recv_into(buf):
                ep.flush_notify()
                return bytes(buf)
            ep.flush_notify()
            if self._peer_gone() or ep.ring.peer_eof():
                if ep.ring.recv_into(buf):
                    ep.flush_notify()
                    return bytes(buf)
                raise EOFError(f"end of stream before {n} bytes were ready")
            self._block("recv_exactly")

    def recv(self, n: int) -> bytes:
        """Deprecated name of :meth:`recv_exactly` (unlike ``socket.recv``, never "up to n")."""
        warnings.warn("Vchan.recv(n) is deprecated: it reads exactly n bytes, unlike "
                      "socket.recv; call recv_exactly(n) (or read(n) for up to n)",
                      DeprecationWarning, stacklevel=2)
        return self.recv_exactly(n)

    def write(self, data: Any) -> int:
        """Write ``data``: all of it when blocking, what fits otherwise."""
        ep = self._live("write")
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._peer_gone():
                raise self._gone_error()
            n = ep.ring.write(view[done:])
            ep.flush_notify()
            done += n
            if done < len(view):
                if not self.blocking:
                    if done:
                        return done
                    raise BlockingIOError("write would block: the ring is full")
                self.wait()
        return done

    def send(self, data: Any) -> None:
        """Write all of ``data`` at once or (non-blocking) raise BlockingIOError."""
        ep = self._live("send")
        while True:
            if self._peer_gone():
                raise self._gone_error()
            if ep.ring.send(data):
                ep.flush_notify()
                return
            ep.flush_notify()
            self._block("send")

    def can_write_eof(self) -> bool:
        """Whether the peer can be half-closed: False for a plain libxenvchan peer."""
        return self._live("can_write_eof").ring.peer_speaks_extensions

    def write_eof(self) -> None:
        """Half-close: the peer reads what was written, then end of stream.

        Raises :class:`~vchan.HalfCloseUnsupportedError` (as the asyncio
        transport does) if :meth:`can_write_eof` is False.
        """
        ep = self._live("write_eof")
        if not ep.ring.peer_speaks_extensions:
            raise HalfCloseUnsupportedError
        ep.ring.write_eof()
        ep.flush_notify()

    # -- teardown -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (and, as a server, remove its XenStore path)."""
        if self._closed:
            return
        self._closed = True
        self._ep.close()
        if self._xs_path is not None:
            with contextlib.suppress(OSError), XenStoreSync() as xs:
                xs.rm(self._xs_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            # No XenStore from a finalizer: the ring goes, a server's path
            # stays (a raw server's next publish there replaces it).
            self._closed = True
            self._ep.close()

    def __repr__(self) -> str:
        role = "server" if self._ep.is_server else "client"
        state = "closed" if self._closed else ("blocking" if self.blocking else "non-blocking")
        return f"<Vchan {role} peer={self.peer} port={self.port!r} {state}>"
