"""Forwarding between vchan connections and sockets: the engine of ``vchan proxy``.

Every forwarded connection is one :class:`SocketSplice`, the protocol of a
vchan transport that owns a connected non-blocking socket.  Bytes never pass
through Python objects: ring data goes from the shared pages to the socket
with one ``sendmsg`` and socket data is read into the ring's free space with
one ``readv`` (``vchan/splice.c``), so forwarding costs one kernel copy a
byte, as a splice would.  Back-pressure is the ring's and the socket's own:
a full socket stops the ring being consumed, so the vchan peer's writes wait;
a full ring stops the socket being read, so TCP's window closes.

Closing follows the byte streams: EOF from the socket becomes a vchan
half-close (a whole close for a plain libxenvchan peer, which has none, as
``vchan-socket-proxy`` does), vchan EOF becomes ``shutdown(SHUT_WR)``, and
when both directions are done both sides are closed.  A vchan peer that
crashes resets a TCP socket (``SO_LINGER`` 0) so the far end hears of it.

    server = await vchan.create_server(lambda: SocketSplice(connect=open_target), port,
                                       peers=domid, sessions=False)

    sock, _ = listening_socket.accept()
    await vchan.create_connection(lambda: SocketSplice(sock), domid, port, dedicated=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .transport import (
    SPLICE_EOF,
    SPLICE_ERROR,
    SPLICE_FULL,
    SpliceProtocol,
    VchanTransport,
)

__all__ = ["SocketListener", "SocketSplice"]

log = logging.getLogger("vchan")

_RESET = struct.pack("ii", 1, 0)        # SO_LINGER on, 0 s: close sends RST


class SocketSplice(SpliceProtocol):
    """Forward one vchan connection to and from a socket, in C.

    Give it a connected socket, or a ``connect`` coroutine function that
    opens one once the vchan connection is made (reading from vchan waits
    for it; if it fails the vchan connection is aborted).  :meth:`wait_closed`
    returns when both sides are closed; :attr:`error` then says why, if
    something went wrong.
    """

    def __init__(self, sock: socket.socket | None = None, *,
                 connect: Callable[[], Awaitable[socket.socket]] | None = None,
                 name: str = "") -> None:
        if (sock is None) == (connect is None):
            raise ValueError("SocketSplice: give a socket or a connect function, not both")
        self.name = name
        self._pending = sock
        self._connect = connect
        self._sock: socket.socket | None = None
        self._fd = -1
        self._transport: VchanTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reading_fd = False
        self._writing_fd = False
        self._fd_eof = False        # the socket said EOF (forwarded to vchan)
        self._vchan_eof = False     # vchan said EOF (forwarded to the socket)
        self._lost = False
        self.error: BaseException | None = None
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<SocketSplice {self.name or self._fd}>"

    # -- the vchan side (called by the transport) ------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, VchanTransport):
            raise TypeError("SocketSplice works on vchan transports only")
        self._transport = transport
        self._loop = loop = asyncio.get_running_loop()
        if self._pending is not None:
            sock, self._pending = self._pending, None
            self._attach(sock)
            return
        transport.pause_reading()       # nowhere to send the data yet
        assert self._connect is not None
        self._connecting = loop.create_task(self._open(self._connect))

    async def _open(self, connect: Callable[[], Awaitable[socket.socket]]) -> None:
        try:
            sock = await connect()
        except Exception as exc:        # refused, unreachable, ...
            self.error = exc
            if self._transport is not None:
                self._transport.abort()
            return
        if self._lost:
            sock.close()
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        assert self._transport is not None and self._loop is not None
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._start_reading_fd()
        self._transport.resume_reading()

    def fileno(self) -> int:
        return self._fd

    def wait_writable(self) -> None:
        assert self._transport is not None and self._loop is not None
        self._transport.pause_reading()
        if not self._writing_fd and self._sock is not None:
            self._writing_fd = True
            self._loop.add_writer(self._fd, self._on_writable)

    def space_available(self) -> None:
        if not self._fd_eof and not self._lost:
            self._start_reading_fd()

    def eof_received(self) -> bool:
        """vchan EOF: everything the peer sent has gone to the socket."""
        self._vchan_eof = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        return not self._fd_eof         # both done: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.error = self.error or exc
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self._close_socket(reset=exc is not None)
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the vchan connection and the socket are both closed."""
        await self._closed.wait()

    # -- the socket side --------------------------------------------------------

    def _start_reading_fd(self) -> None:
        if not self._reading_fd and self._sock is not None and self._loop is not None:
            self._reading_fd = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading_fd(self) -> None:
        if self._reading_fd and self._loop is not None:
            self._reading_fd = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        transport = self._transport
        assert transport is not None
        result = transport.splice_in(self._fd)
        if result in (SPLICE_FULL, SPLICE_ERROR):
            self._stop_reading_fd()     # space_available() / connection_lost() follow
        elif result == SPLICE_EOF:
            self._stop_reading_fd()
            self._fd_eof = True
            if transport.is_closing():
                return
            if self._vchan_eof:
                transport.close()       # both directions done
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                # A plain libxenvchan peer has no half-close: close, which
                # still delivers what is in the ring.
                transport.close()

    def _on_writable(self) -> None:
        assert self._loop is not None and self._transport is not None
        self._writing_fd = False
        self._loop.remove_writer(self._fd)
        self._transport.resume_reading()

    def _close_socket(self, reset: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stop_reading_fd()
        if self._writing_fd and self._loop is not None:
            self._writing_fd = False
            self._loop.remove_writer(self._fd)
        if reset and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        sock.close()
        self._fd = -1


class SocketListener(asyncio.AbstractServer):
    """Listening sockets whose accepted connections go to ``on_accept``.

    A plain accept loop (``loop.add_reader`` on each listening socket), so
    that the accepted sockets stay ours to splice rather than becoming
    asyncio transports.  Runs out of descriptors the way asyncio does: stops
    accepting for a second.
    """

    backlog = 128

    def __init__(self, sockets: Iterable[socket.socket],
                 on_accept: Callable[[socket.socket, Any], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = list(sockets)
        self._on_accept = on_accept
        self._serving = False
        self._closed = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None
        for sock in self.sockets:
            sock.setblocking(False)
            sock.listen(self.backlog)
        self._start()

    def _start(self) -> None:
        self._retry = None
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop(self) -> None:
        self._serving = False
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self.backlog):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("out of resources accepting connections (%s): pausing 1 s",
                                exc.strerror)
                    self._stop()
                    self._retry = self._loop.call_later(1.0, self._start)
                    return
                raise
            self._on_accept(conn, addr)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if self._closed.is_set():
            return
        if self._retry is not None:
            self._retry.cancel()
        if self._serving:
            self._stop()
        for sock in self.sockets:
            sock.close()
        self._closed.set()

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()
