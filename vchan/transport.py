"""vchan connections as asyncio transports.

:class:`VchanTransport` follows the skeleton of CPython's
``_SelectorSocketTransport`` so that ``StreamReaderProtocol``,
``StreamWriter.drain()`` and any protocol written for TCP behave the same:
``connection_made`` is scheduled first, then the first look at the ring, then
the waiter; ``BufferedProtocol`` is chosen in :meth:`set_protocol`; there is
one ``_fatal_error`` and one ``_force_close``; ``connection_lost`` is called
exactly once.

Events.  One event-channel handle per event loop (:class:`vchan.hub._EventHub`)
is watched with ``loop.add_reader``; it hands each fired port to its transport.
A transport never sleeps on a hunch: after every event (and after
``resume_reading``) it reads until the ring is empty -- the ring arms the
wake-up request and re-checks before reporting empty -- and flushes what it
can of its write buffer, so no wake-up is ever lost.

Closing.  ``close()`` delivers everything already written (the buffer is
flushed into the ring, and data in the ring stays readable by the peer after
we let go of it); ``abort()`` drops the buffer.  The peer sees a graceful
close (live byte 0 with the CLOSED mark) as EOF, a crash (live byte cleared
by the kernel's unmap notification alone) as ``ConnectionResetError``, and a
corrupt ring as :class:`vchan.RemoteProtocolError`.

Setting connections up is elsewhere: :mod:`vchan.client` (``create_connection``),
:mod:`vchan.server` (``create_server``, ``Server``).  Both are importable from
here too, as they always were.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._flow import TransportBase
from ._native import ffi, lib
from .endpoint import Endpoint
from .errors import HalfCloseUnsupportedError, LocalProtocolError, RemoteProtocolError
from .hub import _EventHub
from .ring import ECLOSED, NOTIFY_EOF, peer_crashed, peer_gone_error, strerror

if TYPE_CHECKING:     # re-exported (see __getattr__ at the end)
    from .client import create_connection as create_connection
    from .hub import event_hub as event_hub
    from .hub import own_domid_async as own_domid_async
    from .server import Peers as Peers
    from .server import Server as Server
    from .server import create_server as create_server

__all__ = ["SpliceProtocol", "VchanTransport"]

log = logging.getLogger("vchan")

_REMOTE_CODES = {lib.VCHAN_EINDEX, lib.VCHAN_EORDER, lib.VCHAN_ELIVE}


def _set_result_unless_cancelled(fut: asyncio.Future[None], result: None) -> None:
    if not fut.cancelled():
        fut.set_result(result)


def _ring_error(code: int, what: str) -> Exception:
    if code in _REMOTE_CODES:
        return RemoteProtocolError(f"vchan peer broke the protocol ({what}): "
                                   f"{strerror(code)}", code)
    if code == ECLOSED:
        return LocalProtocolError(f"{what}: {strerror(code)}")
    return RuntimeError(f"{what}: {strerror(code)}")


class SpliceProtocol(asyncio.BaseProtocol):
    """A protocol whose bytes move between the ring and a file descriptor in C.

    Given to a :class:`VchanTransport`, it replaces ``data_received``: ring
    data goes straight from the shared pages to :meth:`fileno` with one
    ``sendmsg`` (see ``vchan/splice.c``), and :meth:`VchanTransport.splice_in`
    reads the descriptor straight into the ring.  :class:`vchan.proxy.SocketSplice`
    is the implementation; the hooks below are what the transport calls.
    """

    def fileno(self) -> int:
        """The descriptor ring data goes to; -1 while there is none."""
        raise NotImplementedError

    def wait_writable(self) -> None:
        """The descriptor is full: resume the transport's reading once it drains."""
        raise NotImplementedError

    def space_available(self) -> None:
        """The ring has room again after :meth:`VchanTransport.splice_in` filled it."""
        raise NotImplementedError


# What VchanTransport.splice_in() found.
SPLICE_MORE = 0     # stopped after its share of the loop: call again
SPLICE_WAIT = 1     # the descriptor has nothing now (EAGAIN)
SPLICE_FULL = 2     # the ring is full: space_available() will be called
SPLICE_EOF = 3      # the descriptor reached end of file
SPLICE_ERROR = 4    # the transport is closing with an error

_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK}


class VchanTransport(TransportBase):
    """An asyncio transport over one libxenvchan connection."""

    max_size = 256 * 1024       # bytes handed to the protocol per loop iteration
    max_splice = 1024 * 1024    # bytes spliced each way per loop iteration
    _extra: dict[str, Any]      # asyncio.BaseTransport's extra info
    _protocol: Any
    _buffer: bytearray

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint,
                 protocol: asyncio.BaseProtocol, hub: _EventHub, *,
                 waiter: asyncio.Future[None] | None = None, extra: dict[str, Any] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(extra)
        self._loop = loop
        self._endpoint = endpoint
        self._hub = hub
        self._r = endpoint.ring._r
        self._notify = endpoint.ring._notify
        self._on_close = on_close
        self._extra.setdefault("endpoint", endpoint)
        self._buffer = bytearray()
        self._read_more_scheduled = False
        self._pa = ffi.new("const uint8_t **")
        self._pb = ffi.new("const uint8_t **")
        self._alen = ffi.new("uint32_t *")
        self._blen = ffi.new("uint32_t *")
        self._errno = ffi.new("int *")
        self._space_wanted = False      # splice_in() found the ring full
        self.set_protocol(protocol)
        hub.register(endpoint.port, self._on_event)
        hub.watch_peer(endpoint.peer_domid, self)
        self._made = False
        loop.call_soon(self._connection_made)
        # The ring may hold data already, and its events may have fired
        # before we were registered: look once.
        loop.call_soon(self._on_event)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            # Unreachable, so its event hub is too (the hub holds every
            # registered transport), and may be finalized already: only the
            # ring is ours to let go of.
            self._closed = True
            with contextlib.suppress(Exception):
                self._endpoint.close()

    # -- protocol -------------------------------------------------------------

    def _connection_made(self) -> None:
        if self._protocol is None:      # torn down before we got here
            return
        self._protocol.connection_made(self)
        self._made = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        if isinstance(protocol, SpliceProtocol):
            self._read_into = self._read__splice
        elif isinstance(protocol, asyncio.BufferedProtocol):
            self._read_into = self._read__get_buffer
        else:
            self._read_into = self._read__data_received
        self._protocol = protocol

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        # Nothing will wake us for data already in the ring: look now.
        self._loop.call_soon(self._on_event)

    # -- writing --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._accepts_write(data, bool(self._conn_lost)):
            return
        if not self._buffer:
            # Straight into the ring: no copy into our buffer, no syscall
            # unless the peer asked to be woken.
            n = lib.vchan_ring_write(self._r, ffi.from_buffer(data), len(data), self._notify)
            if n < 0:
                self._fatal_error(_ring_error(n, "write"), "Fatal write error on vchan")
                return
            self._flush_notify()
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self._buffer.extend(data)
        self._maybe_pause_protocol()

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        if not self.can_write_eof():
            raise HalfCloseUnsupportedError
        self._eof = True
        if not self._buffer:
            self._send_eof()

    def can_write_eof(self) -> bool:
        return self._endpoint.ring.peer_speaks_extensions

    def _send_eof(self) -> None:
        rc = lib.vchan_ring_write_eof(self._r, self._notify)
        if rc < 0:
            self._fatal_error(_ring_error(rc, "write_eof"), "Fatal error on vchan")
            return
        self._eof_sent = True
        self._flush_notify()

    def _flush_notify(self) -> None:
        if self._notify[0]:
            self._notify[0] = 0
            try:
                self._endpoint.notify()
            except OSError as exc:
                self._fatal_error(exc, "Fatal error notifying the vchan peer")

    def _flush_buffer(self) -> bool:
        """Move what fits of the write buffer into the ring; False on error."""
        n = lib.vchan_ring_write(self._r, ffi.from_buffer(self._buffer), len(self._buffer),
                                 self._notify)
        if n < 0:
            self._fatal_error(_ring_error(n, "write"), "Fatal write error on vchan")
            return False
        if n:
            del self._buffer[:n]
        self._maybe_resume_protocol()
        if not self._buffer:
            if self._eof and not self._eof_sent:
                self._send_eof()
            if self._closing and not self._conn_lost:
                self._conn_lost += 1
                self._loop.call_soon(self._call_connection_lost, None)
        return True

    # -- reading --------------------------------------------------------------

    def _read__data_received(self) -> bool:
        """Hand ring data to protocol.data_received.

        Returns True if it stopped before the ring was empty (paused, closing
        or max_size reached), False once the ring is empty and re-armed.
        """
        r, pa, pb, alen, blen = self._r, self._pa, self._pb, self._alen, self._blen
        total = 0
        while True:
            if self._paused or self._closing or total >= self.max_size:
                return True
            n = lib.vchan_ring_peek(r, pa, alen, pb, blen)
            if n <= 0:
                if n < 0:
                    raise _ring_error(n, "read")
                return False
            # Copy out before releasing the space to the peer; at most
            # max_size at a time, as a socket transport's recv() would.
            first = min(alen[0], self.max_size)
            data = ffi.unpack(ffi.cast("char *", pa[0]), first)
            if first < self.max_size and blen[0]:
                data += ffi.unpack(ffi.cast("char *", pb[0]),
                                   min(blen[0], self.max_size - first))
            n = len(data)
            lib.vchan_ring_consume(r, n, self._notify)
            total += n
            self._protocol.data_received(data)

    def _read__get_buffer(self) -> bool:
        """Read ring data straight into the protocol's buffer (see above)."""
        r = self._r
        total = 0
        while True:
            if self._paused or self._closing or total >= self.max_size:
                return True
            ready = lib.vchan_ring_data_ready(r)
            if ready <= 0:
                if ready < 0:
                    raise _ring_error(ready, "read")
                return False    # data_ready armed the request and re-checked
            buf = self._protocol.get_buffer(ready)
            view = ffi.from_buffer(buf, require_writable=True)
            if not len(view):
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = lib.vchan_ring_read(r, view, len(view), self._notify)
            if n < 0:
                raise _ring_error(n, "read")
            total += n
            self._protocol.buffer_updated(n)

    def _read__splice(self) -> bool:
        """Send ring data straight to the splice protocol's descriptor (see above)."""
        r, notify, err = self._r, self._notify, self._errno
        fd = self._protocol.fileno()
        total = 0
        while True:
            if self._paused or self._closing or total >= self.max_splice or fd < 0:
                return True
            n = lib.vchan_splice_to_fd(r, fd, self.max_splice, notify, err)
            if n > 0:
                total += n
                continue
            if n == 0:
                return False    # empty, and the wake-up request is armed
            if n == lib.VCHAN_SPLICE_ERRNO:
                if err[0] in _AGAIN:
                    self._protocol.wait_writable()
                    return True
                raise OSError(err[0], f"forwarding to fd {fd}: {os.strerror(err[0])}")
            raise _ring_error(n, "read")

    def splice_in(self, fd: int) -> int:
        """Read ``fd`` straight into the ring (for a :class:`SpliceProtocol`).

        Moves at most :attr:`max_splice` bytes, waking the peer if it asked,
        and returns one of ``SPLICE_MORE``, ``SPLICE_WAIT``, ``SPLICE_FULL``
        (the protocol's ``space_available()`` is called when there is room),
        ``SPLICE_EOF`` or ``SPLICE_ERROR`` (the transport is being closed with
        the error; ``connection_lost`` follows).
        """
        if self._closing or self._eof:
            return SPLICE_ERROR
        r, notify, err = self._r, self._notify, self._errno
        total = 0
        result = SPLICE_MORE
        try:
            while total < self.max_splice:
                n = lib.vchan_splice_from_fd(r, fd, self.max_splice - total, notify, err)
                if n > 0:
                    total += n
                    continue
                if n == 0:
                    self._space_wanted = True
                    result = SPLICE_FULL
                elif n == lib.VCHAN_SPLICE_EOF:
                    result = SPLICE_EOF
                elif n == lib.VCHAN_SPLICE_ERRNO and err[0] in _AGAIN:
                    result = SPLICE_WAIT
                elif n == lib.VCHAN_SPLICE_ERRNO:
                    self._fatal_error(OSError(err[0], f"forwarding from fd {fd}: "
                                                      f"{os.strerror(err[0])}"))
                    return SPLICE_ERROR
                else:
                    exc = _ring_error(n, "write")
                    self._fatal_error(exc, "vchan peer broke the protocol")
                    return SPLICE_ERROR
                break
        finally:
            self._flush_notify()
        return result

    # -- the event handler ----------------------------------------------------

    def _on_event(self) -> None:
        """The peer signalled us (or we are looking again): catch up."""
        self._read_more_scheduled = False
        if self._closed or self._conn_lost or not self._made:
            # Not before connection_made (uvloop runs I/O callbacks ahead of
            # call_soon ones): the look scheduled after it catches up.
            return
        try:
            if self._buffer and not self._flush_buffer():
                return
            if self._space_wanted and not self._closing:
                space = lib.vchan_ring_buffer_space(self._r)
                if space < 0 and space != ECLOSED:
                    raise _ring_error(space, "write")
                if space > 0:
                    self._space_wanted = False
                    self._protocol.space_available()
            reading = not self._paused and not self._closing and not self._eof_received
            if reading and self._read_into():
                # Stopped early.  Still reading: come back after other
                # callbacks had their turn.  Paused: resume_reading() looks
                # again.
                if not self._paused and not self._closing:
                    self._schedule_read()
                self._flush_notify()
                return
            if not self._conn_lost and (not self._closing or self._buffer):
                self._check_peer()
            self._flush_notify()
        except (SystemExit, KeyboardInterrupt):
            raise
        except RemoteProtocolError as exc:
            self._fatal_error(exc, "vchan peer broke the protocol")
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol callback or vchan read failed")

    def _schedule_read(self) -> None:
        if not self._read_more_scheduled:
            self._read_more_scheduled = True
            self._loop.call_soon(self._on_event)

    def _check_peer(self) -> None:
        """The ring is empty (and re-armed): has the peer finished?"""
        r = self._r
        live = lib.vchan_ring_peer_live(r)
        if live < 0:
            raise _ring_error(live, "peer state")
        flags = lib.vchan_ring_peer_flags(r)
        if live == 0 or (flags & NOTIFY_EOF and not self._eof_received):
            # Data written just before the mark must not be lost: look once
            # more now that we have seen it.
            ready = lib.vchan_ring_data_ready(r)
            if ready < 0:
                raise _ring_error(ready, "read")
            if ready and not self._paused and not self._eof_received:
                self._schedule_read()
                return
            if ready:
                return          # paused: resume_reading() comes back here
        if live == 0:
            peer = self._extra.get("peername")
            if peer_crashed(flags):
                self._force_close(peer_gone_error(flags, peer))
                return
            if not self._eof_received:
                self._deliver_eof(peer_gone=True)
            if self._buffer:
                self._force_close(peer_gone_error(flags, peer, unsent=len(self._buffer)))
            elif not self._closing:
                self._close()
            return
        if flags & NOTIFY_EOF and not self._eof_received:
            self._deliver_eof(peer_gone=False)

    def _peer_domain_gone(self, domid: int) -> None:
        """The hub found the peer's domain gone (destroyed, no notification)."""
        self._force_close(ConnectionResetError(
            f"vchan peer domain {domid} no longer exists"))

    def _hypervisor_failed(self, exc: BaseException) -> None:
        """The hub found the (emulated) hypervisor gone or stopped."""
        self._endpoint.keep_quiet()     # the peer learns it as we did, not as a close
        self._force_close(exc)

    def _deliver_eof(self, *, peer_gone: bool) -> None:
        self._eof_received = True
        keep_open = self._protocol.eof_received()
        if keep_open and not peer_gone:
            # Half-close: we may still write; the peer keeps reading.
            return
        if not peer_gone and not self._closing:
            self._close()

    # -- closing --------------------------------------------------------------

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.unwatch_peer(self._endpoint.peer_domid, self)
        try:
            self._endpoint.close()      # live 0, notify, unmap, unbind
        finally:
            self._hub.unregister(self._endpoint.port)
            if self._on_close is not None:
                self._on_close()
            self._protocol = None


# Names that moved to vchan.client, vchan.server and vchan.hub, still
# importable from here.  Looked up on first use: client and server import
# this module.
_MOVED = {"create_connection": "client", "Peers": "server", "Server": "server",
          "create_server": "server", "event_hub": "hub", "own_domid_async": "hub"}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __package__), name)
    globals()[name] = value
    return value
