"""vchan connections as asyncio transports.

:class:`VchanTransport` follows the skeleton of CPython's
``_SelectorSocketTransport`` so that ``StreamReaderProtocol``,
``StreamWriter.drain()`` and any protocol written for TCP behave the same:
``connection_made`` is scheduled first, then the first look at the ring, then
the waiter; ``BufferedProtocol`` is chosen in :meth:`set_protocol`; there is
one ``_fatal_error`` and one ``_force_close``; ``connection_lost`` is called
exactly once.

Events.  One event-channel handle per event loop (:class:`_EventHub`) is
watched with ``loop.add_reader``; it hands each fired port to its transport.
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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Literal, Protocol

from ._flow import TransportBase
from ._native import ffi, lib
from .devices import EventChannel
from .endpoint import Endpoint
from .errors import LocalProtocolError, RemoteProtocolError, VchanError
from .ring import ECLOSED, NOTIFY_CLOSED, NOTIFY_EOF, NOTIFY_HELLO, strerror

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


class _PeerWatcher(Protocol):
    """What the hub tells when a peer domain is found gone (a transport, a session)."""

    def _peer_domain_gone(self, domid: int) -> None: ...


class _EventHub:
    """The event-channel handle of one event loop, shared by its transports.

    It also watches that the peer domains of its transports still exist: a
    domain destroyed outright (``xl destroy``) runs no kernel to perform its
    unmap notifications, so nothing would ever tell us.  Every
    ``LIVENESS_INTERVAL`` seconds each distinct peer domain is asked for
    (binding an event channel to a missing domain fails with ESRCH).

    A destroyed domain whose pages we still map lingers as a dying zombie
    that the hypervisor answers for like a live one; the toolstack removes
    its XenStore home (``/local/domain/<id>``) at once, though.  So a domain
    that may read other domains' homes (dom0) also looks there, without
    blocking the loop: a missing home is a domain gone.  Where XenStore
    refuses (an unprivileged domU), only the hypervisor's answer counts.
    """

    LIVENESS_INTERVAL = 0.5

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.evtchn = EventChannel()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.holds = 0
        self.fd = self.evtchn.fileno()
        self.peers: dict[int, set[_PeerWatcher]] = {}
        self._liveness: asyncio.TimerHandle | None = None
        self._homes: asyncio.Task[None] | None = None
        self._homes_readable = True     # False once XenStore refuses us a peer's home
        self._own: int | None = None
        self._dev = self.evtchn._dev
        self._ports = ffi.new("uint32_t[64]")
        loop.add_reader(self.fd, self._dispatch)

    def watch_peer(self, domid: int, transport: _PeerWatcher) -> None:
        self.peers.setdefault(domid, set()).add(transport)
        if self._liveness is None:
            self._liveness = self.loop.call_later(self.LIVENESS_INTERVAL, self._check_peers)

    def unwatch_peer(self, domid: int, transport: _PeerWatcher) -> None:
        watchers = self.peers.get(domid)
        if watchers is not None:
            watchers.discard(transport)
            if not watchers:
                del self.peers[domid]
        if not self.peers and self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None

    def _check_peers(self) -> None:
        from .listener import domain_exists

        self._liveness = None
        if self.evtchn.closed:
            return
        for domid in list(self.peers):
            try:
                gone = not domain_exists(self.evtchn, domid)
            except OSError:
                continue
            if gone:
                self._domain_gone(domid)
        if (self._homes_readable and self._homes is None
                and any(domid != self._own for domid in self.peers)):
            self._homes = self.loop.create_task(self._check_homes(),
                                                name="vchan peer domain homes")
        if self.peers:
            self._liveness = self.loop.call_later(self.LIVENESS_INTERVAL, self._check_peers)

    def _domain_gone(self, domid: int) -> None:
        for transport in list(self.peers.get(domid, ())):
            transport._peer_domain_gone(domid)

    async def _check_homes(self) -> None:
        """Whether each peer domain still has its XenStore home (dom0 may look)."""
        try:
            async with _loop_state() as state:
                self._own = state.own
                for domid in list(self.peers):
                    if domid == state.own or domid not in self.peers:
                        continue
                    try:
                        await state.xs.read(f"/local/domain/{domid}")
                    except FileNotFoundError:
                        if not self.evtchn.closed:
                            self._domain_gone(domid)
                    except PermissionError:
                        self._homes_readable = False    # not privileged: never again
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:    # XenStore unavailable or closing: next round
            if self.loop.get_debug():
                log.debug("vchan: could not look at peer domains' homes: %r", exc)
        finally:
            if self._homes is asyncio.current_task():
                self._homes = None

    def register(self, port: int, handler: Callable[[], None]) -> None:
        self.handlers[port] = handler

    def unregister(self, port: int) -> None:
        self.handlers.pop(port, None)
        self._close_if_unused()

    def hold(self) -> None:
        """Keep the hub open while something is being set up on it."""
        self.holds += 1

    def unhold(self) -> None:
        self.holds -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if not self.handlers and self.holds <= 0:
            self.close()

    def close(self) -> None:
        if _hubs.get(self.loop) is self:
            del _hubs[self.loop]
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None
        if self._homes is not None:
            self._homes.cancel()
            self._homes = None
        if not self.evtchn.closed:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
            self.evtchn.close()

    def _dispatch(self) -> None:
        # One call takes every fired port and unmasks it: an event from now
        # on fires again, and each handler looks at its ring after this.
        ports = self._ports
        handlers = self.handlers
        while not self.evtchn.closed:     # a handler may have closed us
            n = lib.vk_take_events(self._dev, ports, 64)
            if n <= 0:
                if n < 0:
                    log.error("vchan event channel failed: %s", os.strerror(-n))
                return
            for i in range(n):
                handler = handlers.get(ports[i])
                if handler is not None:
                    handler()
            if n < 64:
                return


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _EventHub] = \
    weakref.WeakKeyDictionary()


def event_hub(loop: asyncio.AbstractEventLoop) -> _EventHub:
    """The loop's event hub, created on first use."""
    hub = _hubs.get(loop)
    if hub is None or hub.evtchn.closed:
        hub = _hubs[loop] = _EventHub(loop)
    return hub


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
        self._protocol = None
        self._buffer = bytearray()
        self._conn_lost = 0
        self._closing = False
        self._closed = False
        self._user_closed = False
        self._paused = False
        self._eof = False               # write_eof() asked for
        self._eof_sent = False
        self._eof_received = False
        self._protocol_paused = False
        self._read_more_scheduled = False
        self._high_water = self._low_water = 0
        self._set_write_buffer_limits()
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
            raise NotImplementedError(
                "write_eof(): the peer is a plain libxenvchan endpoint, which has no "
                "half-close (only vchan peers understand the EOF extension)")
        self._eof = True
        if not self._buffer:
            self._send_eof()

    def can_write_eof(self) -> bool:
        return bool(lib.vchan_ring_peer_flags(self._r) & NOTIFY_HELLO)

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
            if flags & NOTIFY_HELLO and not flags & NOTIFY_CLOSED:
                peer = self._extra.get("peername")
                self._force_close(ConnectionResetError(
                    f"vchan peer {peer} went away without closing (crashed or killed)"))
                return
            if not self._eof_received:
                self._deliver_eof(peer_gone=True)
            if self._buffer:
                lost = len(self._buffer)
                self._force_close(BrokenPipeError(
                    f"vchan peer closed with {lost} bytes of ours not yet in the ring"))
            elif not self._closing:
                self._close()
            return
        if flags & NOTIFY_EOF and not self._eof_received:
            self._deliver_eof(peer_gone=False)

    def _peer_domain_gone(self, domid: int) -> None:
        """The hub found the peer's domain gone (destroyed, no notification)."""
        self._force_close(ConnectionResetError(
            f"vchan peer domain {domid} no longer exists"))

    def _deliver_eof(self, *, peer_gone: bool) -> None:
        self._eof_received = True
        keep_open = self._protocol.eof_received()
        if keep_open and not peer_gone:
            # Half-close: we may still write; the peer keeps reading.
            return
        if not peer_gone and not self._closing:
            self._close()

    # -- closing --------------------------------------------------------------

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._paused = False
        if not self._buffer:
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._user_closed = True
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on vchan") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                log.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._buffer.clear()
        self._closing = True
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

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


# ---------------------------------------------------------------------------
# Connections and servers
# ---------------------------------------------------------------------------


class _LoopState:
    """What the vchan connections of one event loop share.

    One XenStore connection (with one watch per path, however many waiters)
    and one event-channel hub.  The XenStore connection is owned by a task,
    so that ``asyncio.run()`` closes it when the loop ends; it is also closed
    after a short idle period with no connection being set up and no server
    (and, where peers' homes are readable, no connection to another domain
    whose home the event hub's liveness probe reads).
    """

    IDLE_CLOSE = 2.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.xs: Any = None
        self.watches: Any = None
        self.own: int | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        self._idle: asyncio.TimerHandle | None = None
        self._owner: asyncio.Task[None] | None = None

    async def acquire(self) -> _LoopState:
        self.users += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            if self._ready is None:
                self._ready = self.loop.create_future()
                self._owner = self.loop.create_task(self._own(), name="vchan xenstore")
            await asyncio.shield(self._ready)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._idle is None and not self.loop.is_closed():
            self._idle = self.loop.call_later(self.IDLE_CLOSE, self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        self._idle = None
        if self.users == 0:
            self._stop.set()

    async def _own(self) -> None:
        from .listener import WatchRegistry
        from .xenstore import XenStore

        assert self._ready is not None
        try:
            self.xs = await XenStore.open()
            self.watches = WatchRegistry(self.xs)
            self.own = await own_domid_async(self.xs)
        except BaseException as exc:
            if self.xs is not None:
                await self.xs.close()
            self._ready.set_exception(exc)
            _states.pop(self.loop, None)
            return
        self._ready.set_result(None)
        try:
            await self._stop.wait()
        finally:
            if _states.get(self.loop) is self:
                del _states[self.loop]
            await self.xs.close()


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = \
    weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _loop_state() -> AsyncIterator[_LoopState]:
    loop = asyncio.get_running_loop()
    state = _states.get(loop)
    if state is None or state._stop.is_set():
        state = _states[loop] = _LoopState(loop)
    await state.acquire()
    try:
        yield state
    finally:
        state.release()


async def own_domid_async(xs: Any) -> int:
    """This process's domain id (the emulator's VCHAN_DOMID, or XenStore's domid)."""
    from .backend import get_backend

    backend = get_backend()
    if backend.domid is not None:
        return backend.domid
    return int(await xs.read("domid"))


def _ring_sizes(read_min: int | None, write_min: int | None) -> tuple[int, int]:
    from .endpoint import DEFAULT_RING_SIZE, check_ring_size

    r = DEFAULT_RING_SIZE if read_min is None else check_ring_size(read_min, "read_min")
    w = DEFAULT_RING_SIZE if write_min is None else check_ring_size(write_min, "write_min")
    return r, w


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], domid: int, port: int | str, *,
    timeout: float | None = None, read_min: int | None = None, write_min: int | None = None,
    dedicated: bool | None = None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect to vchan port ``port`` of domain ``domid``.

    Waits for the server (on a XenStore watch) up to ``timeout`` seconds
    (None: as long as the server's domain exists).  Reaches listener servers
    (many clients per port) and raw libxenvchan servers alike.

    By default the connection is a stream of this event loop's session with
    the server's port (:mod:`vchan.mux`): the first connection meets the
    server through XenStore, every later one costs one frame on the
    session's ring, and all of them share its grants.  ``dedicated=True``
    (implied by ``read_min`` / ``write_min``) gives the connection a
    libxenvchan ring of its own instead, as a
    :class:`~vchan.proxy.SocketSplice` needs; ``read_min`` / ``write_min``
    then ask a listener for ring sizes (bytes, up to 1 MiB each; left out,
    the server chooses).  A raw server decides its sizes itself.

    Raises :class:`vchan.NoSuchDomainError` if the domain does not exist (or
    goes away), :class:`TimeoutError` when no server appears in time, and
    :class:`ConnectionRefusedError` when the server turns the request down.
    """
    from .listener import check_domid, check_port, client_connect

    check_domid(domid)
    port_s = check_port(port)
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    if dedicated is None:
        dedicated = read_min is not None or write_min is not None
    elif not dedicated and (read_min is not None or write_min is not None):
        raise ValueError("read_min/write_min size a dedicated ring: not with dedicated=False")
    # Sizes not given are the server's choice (0 in the request).
    read_min, write_min = _ring_sizes(read_min or 0, write_min or 0)
    loop = asyncio.get_running_loop()
    hub = event_hub(loop)
    hub.hold()
    try:
        endpoint: Endpoint | None = None
        if not dedicated:
            from .pool import session_pool

            pool = session_pool(loop)
            got = await pool.connect(domid, port_s, timeout)
            if isinstance(got, tuple):
                endpoint = got[0]
                own = pool.own
            else:
                return await _open_stream(got, protocol_factory, domid, port)
        if endpoint is None:
            async with _loop_state() as state:
                assert state.own is not None
                endpoint, _mode = await client_connect(
                    state.xs, state.watches, hub.evtchn, own=state.own, server=domid,
                    port=port_s, read_min=read_min, write_min=write_min, timeout=timeout)
                own = state.own
        protocol = protocol_factory()
        waiter = loop.create_future()
        transport = VchanTransport(loop, endpoint, protocol, hub, waiter=waiter, extra={
            "peername": (domid, port), "sockname": (own, port)})
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol
    finally:
        hub.unhold()


async def _open_stream(session: Any, protocol_factory: Callable[[], asyncio.BaseProtocol],
                       domid: int, port: int | str) -> tuple[Any, asyncio.BaseProtocol]:
    """A new connection as a stream of ``session``: no XenStore, no round trip."""
    from .listener import check_port

    protocol = protocol_factory()
    if isinstance(protocol, SpliceProtocol):
        raise TypeError("a SpliceProtocol needs a ring of its own: pass read_min/write_min "
                        "to create_connection for a dedicated connection")
    waiter = asyncio.get_running_loop().create_future()
    transport = session.open_stream(check_port(port), protocol, waiter=waiter, extra={
        "peername": (domid, port), "sockname": (session.own, port)})
    try:
        await waiter
    except BaseException:
        transport.abort()
        raise
    return transport, protocol



Peers = int | Collection[int] | Literal["any"]


class Server(asyncio.AbstractServer):
    """A vchan server: what ``asyncio.Server`` is for TCP.

    ``close()`` stops accepting; connections already made stay open and
    ``wait_closed()`` waits for them too (as asyncio does since 3.12).
    ``addresses`` lists the ``(domid, port)`` it serves.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol], port: int | str,
                 port_s: str, peers: Peers, *, raw: bool, read_min: int, write_min: int,
                 accept_timeout: float, shrink: bool = True, sessions: bool = True) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._port = port
        self._port_s = port_s
        self._peers = peers
        self._raw = raw
        self._read_min = read_min
        self._write_min = write_min
        self._accept_timeout = accept_timeout
        self._shrink = shrink               # default sizes: smaller rings beat no ring
        self._sessions = sessions           # grant sessions to clients that ask
        self._sessions_open: set[Any] = set()
        self._refused: set[tuple[int, str]] = set()
        self._serving = False
        self._closed = False
        self._state: _LoopState | None = None
        self._hub: _EventHub | None = None
        self._hub_held = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.Transport] = set()
        self._pending: set[Any] = set()         # endpoints not yet connected
        self._watched: dict[int, asyncio.Task[None]] = {}
        self._seen: dict[int, set[str]] = {}
        self._accept_slots: dict[int, asyncio.Semaphore] = {}
        self._serving_forever: asyncio.Future[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.own: int | None = None

    def __repr__(self) -> str:
        mode = "raw" if self._raw else "listener"
        state = "serving" if self._serving else ("closed" if self._closed else "idle")
        return (f"<vchan.Server {mode} port={self._port!r} peers={self._peers!r} {state} "
                f"connections={len(self._transports)}>")

    @property
    def addresses(self) -> list[tuple[int, int | str]]:
        """The (domid, port) addresses this server serves."""
        return [] if self.own is None else [(self.own, self._port)]

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        if self._closed:
            raise RuntimeError("the vchan server is closed")
        state = _states.get(self._loop)
        if state is None or state._stop.is_set():
            state = _states[self._loop] = _LoopState(self._loop)
        await state.acquire()
        self._state = state
        self.own = state.own
        self._hub = event_hub(self._loop)
        self._hub.hold()
        self._hub_held = True
        self._serving = True
        try:
            for peer in await self._initial_peers():
                self._watch_peer(peer)
            if self._peers == "any":
                self._spawn(self._follow_domains())
        except BaseException:
            self.close()
            raise

    async def _initial_peers(self) -> list[int]:
        from .listener import check_domid

        if self._peers == "any":
            return await self._list_domains()
        if isinstance(self._peers, int):
            return [check_domid(self._peers, "peers")]
        return sorted({check_domid(p, "peers") for p in self._peers})

    async def _list_domains(self) -> list[int]:
        assert self._state is not None
        try:
            names = await self._state.xs.directory("/local/domain")
        except PermissionError:
            raise PermissionError(
                "peers='any' needs to list /local/domain, which only a privileged domain "
                "(dom0) may do: name the peer domains instead") from None
        return sorted(int(n) for n in names if n.isdigit() and int(n) != self.own)

    async def _follow_domains(self) -> None:
        assert self._state is not None
        async with self._state.watches.watching("@introduceDomain") as intro, \
                self._state.watches.watching("@releaseDomain") as release:
            while self._serving:
                await _either(intro, release)
                intro.clear()
                release.clear()
                current = set(await self._list_domains())
                for peer in current - set(self._watched):
                    self._watch_peer(peer)
                for peer in set(self._watched) - current:
                    self._watched.pop(peer).cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._serving:
            self._loop.call_exception_handler({
                "message": "vchan server task failed", "exception": exc, "server": self})

    def _watch_peer(self, peer: int) -> None:
        if peer in self._watched:
            return
        coro = self._serve_raw(peer) if self._raw else self._serve_listener(peer)
        self._watched[peer] = self._spawn(coro)

    # -- listener mode --------------------------------------------------------

    async def _serve_listener(self, peer: int) -> None:
        from .listener import is_nonce, request_dir

        assert self._state is not None and self.own is not None
        reqdir = request_dir(peer, self.own, self._port_s)
        seen = self._seen.setdefault(peer, set())
        async with self._state.watches.watching(reqdir) as changed:
            while self._serving:
                await changed.wait()
                changed.clear()
                try:
                    names = await self._state.xs.directory(reqdir)
                except (FileNotFoundError, PermissionError):
                    names = []
                current = {n for n in names if is_nonce(n)}
                for nonce in seen - current:
                    # A refused client withdrew its request: our answer goes too
                    # (left behind, answers would fill the port's directory).
                    if (peer, nonce) in self._refused:
                        self._refused.discard((peer, nonce))
                        self._spawn(self._forget_refusal(peer, nonce))
                seen &= current             # forget requests their clients removed
                for nonce in current - seen:
                    seen.add(nonce)
                    self._spawn(self._accept_limited(peer, nonce, f"{reqdir}/{nonce}"))

    async def _forget_refusal(self, peer: int, nonce: str) -> None:
        from .listener import remove_if_empty, vchan_path

        assert self._state is not None and self.own is not None
        base = vchan_path(self.own, peer, self._port_s)
        with contextlib.suppress(OSError):
            await self._state.xs.rm(f"{base}/{nonce}")
            await remove_if_empty(self._state.xs, base)

    async def _accept_limited(self, peer: int, nonce: str, request: str) -> None:
        # Pending rings of one peer live in one XenStore directory, whose
        # size is limited: publish a bounded number at a time.
        from .listener import MAX_PENDING_PER_ADDRESS

        slots = self._accept_slots.get(peer)
        if slots is None:
            slots = self._accept_slots[peer] = asyncio.Semaphore(MAX_PENDING_PER_ADDRESS)
        async with slots:
            await self._accept(peer, nonce, request)

    async def _accept(self, peer: int, nonce: str, request: str) -> None:
        from .endpoint import Endpoint
        from .listener import parse_request, vchan_path

        assert self._state is not None and self._hub is not None and self.own is not None
        xs = self._state.xs
        try:
            value = await xs.read(request)
        except (FileNotFoundError, PermissionError):
            return                          # withdrawn already
        path = f"{vchan_path(self.own, peer, self._port_s)}/{nonce}"
        try:
            read_min, write_min, session = parse_request(value)
            session = session and self._sessions
            if read_min or write_min or not self._shrink:
                # Sizes somebody asked for: those or an error naming the limit.
                endpoint = Endpoint.serve(peer, read_min=read_min or self._read_min,
                                          write_min=write_min or self._write_min,
                                          evtchn=self._hub.evtchn)
            else:
                endpoint = Endpoint.serve_shrinking(peer, read_min=self._read_min,
                                                    write_min=self._write_min,
                                                    evtchn=self._hub.evtchn)
            if session:
                await self._connect_session(endpoint, peer, path)
            else:
                await self._connect(endpoint, peer, path, publish_at=path)
        except (OSError, VchanError) as exc:
            # Tell the client at once rather than let it wait for its timeout;
            # the answer goes once the client withdraws its request.
            if self._serving:
                self._refused.add((peer, nonce))
                await _refuse(xs, path, str(exc), self.own, peer)
            if not isinstance(exc, OSError):
                raise

    async def _connect_session(self, endpoint: Any, peer: int, path: str) -> None:
        """Publish a session ring; once the client is there, it opens streams."""
        from .listener import publish
        from .mux import Session

        assert self._state is not None and self._hub is not None and self.own is not None
        try:
            session = Session(self._loop, endpoint, self._hub, is_server=True, own=self.own,
                              peer=peer, accept=self._accept_stream,
                              on_close=self._session_closed)
        except BaseException:
            endpoint.close()
            raise
        self._pending.add(session)
        try:
            await publish(self._state.xs, path, endpoint.ring_ref, endpoint.port, self.own,
                          peer, session=True)
            connected = await _wait_client(self._hub, endpoint, self._accept_timeout,
                                           then=session._on_event)
        except BaseException:
            self._pending.discard(session)
            session.close()
            with contextlib.suppress(OSError):
                await self._state.xs.rm(path)
            raise
        self._pending.discard(session)
        with contextlib.suppress(OSError):
            await self._state.xs.rm(path)
        if not connected or not self._serving:
            session.close()
            return
        self._sessions_open.add(session)
        self._all_closed.clear()
        session._on_event()         # the client may have opened streams already

    def _accept_stream(self, session: Any, stream_id: int, port: str) -> Any:
        """A client opened a stream on one of our sessions: a new connection."""
        from .mux import StreamTransport

        if not self._serving:
            return "the vchan server is no longer serving"
        if port != self._port_s:
            return f"no vchan server for port {port} on this session"
        try:
            protocol = self._factory()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "vchan server: protocol factory failed", "exception": exc,
                "server": self})
            return f"the vchan server failed to make a protocol: {exc!r}"
        holder: list[Any] = []

        def closed() -> None:
            self._transports.discard(holder[0])
            self._maybe_all_closed()

        transport = StreamTransport(session, stream_id, protocol, extra={
            "peername": (session.peer, self._port), "sockname": (self.own, self._port)},
            on_close=closed)
        holder.append(transport)
        self._transports.add(transport)
        self._all_closed.clear()
        return transport

    def _session_closed(self, session: Any) -> None:
        self._sessions_open.discard(session)
        self._pending.discard(session)
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if not self._transports and not self._pending and not self._sessions_open:
            self._all_closed.set()

    async def _connect(self, endpoint: Any, peer: int, path: str, *, publish_at: str,
                       keep_path: bool = False) -> VchanTransport | None:
        """Publish a ring, wait for the client, hand it to a new protocol."""
        from .listener import publish

        assert self._state is not None and self._hub is not None and self.own is not None
        self._pending.add(endpoint)
        try:
            await publish(self._state.xs, publish_at, endpoint.ring_ref, endpoint.port,
                          self.own, peer)
            connected = await _wait_client(self._hub, endpoint, self._accept_timeout)
        except BaseException:
            self._pending.discard(endpoint)
            endpoint.close()
            with contextlib.suppress(OSError):
                await self._state.xs.rm(path)
            raise
        self._pending.discard(endpoint)
        if not keep_path:
            with contextlib.suppress(OSError):
                await self._state.xs.rm(path)
        if not connected or not self._serving:
            endpoint.close()
            if keep_path:
                with contextlib.suppress(OSError):
                    await self._state.xs.rm(path)
            return None
        return self._make_transport(endpoint, peer, path if keep_path else None)

    def _make_transport(self, endpoint: Any, peer: int, xs_path: str | None) -> VchanTransport:
        try:
            protocol = self._factory()
        except BaseException:
            endpoint.close()
            raise
        holder: list[VchanTransport] = []

        def closed() -> None:
            self._transports.discard(holder[0])
            if xs_path is not None:
                self._cleanup_path(xs_path, peer)
            self._maybe_all_closed()

        transport = VchanTransport(self._loop, endpoint, protocol, self._hub,  # type: ignore[arg-type]
                                   extra={"peername": (peer, self._port),
                                          "sockname": (self.own, self._port)},
                                   on_close=closed)
        holder.append(transport)
        self._transports.add(transport)
        self._all_closed.clear()
        return transport

    def _cleanup_path(self, path: str, peer: int) -> None:
        """A raw connection ended: remove its path, serve the next client."""
        state = self._state
        if state is None or state._stop.is_set():
            return

        async def cleanup() -> None:
            with contextlib.suppress(OSError):
                await state.xs.rm(path)
            if self._serving:
                self._watched.pop(peer, None)
                self._watch_peer(peer)

        self._spawn(cleanup())

    # -- raw mode -------------------------------------------------------------

    async def _serve_raw(self, peer: int) -> None:
        from .endpoint import Endpoint
        from .listener import vchan_path

        assert self._hub is not None and self.own is not None
        path = vchan_path(self.own, peer, self._port_s)
        while self._serving:
            try:
                endpoint = Endpoint.serve(peer, read_min=self._read_min,
                                          write_min=self._write_min, evtchn=self._hub.evtchn)
            except ProcessLookupError:
                # A raw ring is made for one peer domain, which must exist:
                # wait for it to come up.
                await self._wait_for_domain(peer)
                continue
            transport = await self._connect(endpoint, peer, path, publish_at=path,
                                            keep_path=True)
            if transport is not None:
                return      # one connection at a time: closing it serves the next

    async def _wait_for_domain(self, peer: int) -> None:
        from .listener import domain_exists

        assert self._state is not None and self._hub is not None
        async with self._state.watches.watching("@introduceDomain") as changed:
            while not domain_exists(self._hub.evtchn, peer):
                changed.clear()
                # The watch may not be ours to see (unprivileged domains):
                # look again every second regardless.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting connections (open ones are not touched)."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        for task in list(self._tasks):
            task.cancel()
        for endpoint in list(self._pending):
            endpoint.close()
        self._pending.clear()
        for session in list(self._sessions_open):
            session.goaway()        # open streams go on; the session ends with them
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
        if self._hub is not None and self._hub_held:
            self._hub_held = False
            self._hub.unhold()      # our transports hold the hub themselves
        self._maybe_all_closed()

    def close_clients(self) -> None:
        """Close every connection this server accepted."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection this server accepted."""
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        if not self._closed:
            raise RuntimeError("wait_closed() before close()")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Path clean-ups need XenStore: release it only after them.
        await self._all_closed.wait()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._state is not None:
            if not self._raw and self.own is not None:
                # The port's directory for each peer, once its connections'
                # rings are gone (a domain serving many ports in turn must
                # not fill its XenStore node quota).
                from .listener import remove_if_empty, vchan_path

                for peer in sorted(self._seen):
                    with contextlib.suppress(OSError):
                        await remove_if_empty(self._state.xs,
                                              vchan_path(self.own, peer, self._port_s))
            self._state.release()
            self._state = None

    async def serve_forever(self) -> None:
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        await self.start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _refuse(xs: Any, path: str, why: str, own: int, peer: int) -> None:
    from .xenstore import Perm

    with contextlib.suppress(OSError):
        await xs.write(f"{path}/error", why)
        await xs.set_perms(f"{path}/error", [Perm(own, "n"), Perm(peer, "r")])


async def _wait_client(hub: _EventHub, endpoint: Any, timeout: float,
                       then: Callable[[], None] | None = None) -> bool:
    """Wait until the client marks itself live (it sends an event then).

    ``then``: the port's handler once connected (else the port is left
    without one).
    """
    from .ring import LIVE_WAITING

    changed = asyncio.Event()
    hub.register(endpoint.port, changed.set)
    connected = False
    try:
        async def client_live() -> bool:
            while True:
                live = endpoint.ring.peer_live()
                if live != LIVE_WAITING:
                    return bool(live)
                await changed.wait()
                changed.clear()

        try:
            connected = await asyncio.wait_for(client_live(), timeout)
        except TimeoutError:
            connected = False
        return connected
    finally:
        if connected and then is not None:
            hub.handlers[endpoint.port] = then
        else:
            hub.handlers.pop(endpoint.port, None)


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], port: int | str, *,
    peers: Peers, raw: bool = False, read_min: int | None = None,
    write_min: int | None = None, accept_timeout: float = 30.0, start_serving: bool = True,
    sessions: bool = True,
) -> Server:
    """Serve vchan port ``port`` to the domains in ``peers``.

    ``peers`` is one domid, a collection of domids, or ``"any"`` (follows
    domains as they come and go; needs a privileged domain).  In listener
    mode (the default) any number of clients of each peer may connect at
    once, each on its own libxenvchan ring; ``raw=True`` serves exactly one
    plain libxenvchan connection at a time on the path, for C peers
    (``peers`` must then be one domid).  ``read_min`` / ``write_min`` are
    this server's ring sizes in bytes (clients may ask for others).  Left
    out, rings are 1 MiB each way, and smaller ones when the domain runs
    short of grants; given, they are kept, or the connection is refused
    with the grant limit named.

    A client that asks for a session (vchan clients do by default) gets one
    ring for all its connections to this port (:mod:`vchan.mux`);
    ``sessions=False`` gives every connection a ring of its own, as a
    :class:`~vchan.proxy.SocketSplice` protocol needs.
    """
    from .listener import check_domid, check_port

    port_s = check_port(port)
    if peers != "any":
        if isinstance(peers, int):
            check_domid(peers, "peers")
        elif isinstance(peers, Collection) and not isinstance(peers, str | bytes):
            if not peers:
                raise ValueError("peers must name at least one domain")
            for p in peers:
                check_domid(p, "peers")
        else:
            raise TypeError("peers must be a domid, a collection of domids or 'any'")
    if raw and not isinstance(peers, int):
        raise ValueError("raw=True serves one libxenvchan client: peers must be one domid")
    if accept_timeout <= 0:
        raise ValueError(f"accept_timeout must be > 0, got {accept_timeout}")
    shrink = read_min is None and write_min is None
    read_min, write_min = _ring_sizes(read_min, write_min)
    server = Server(asyncio.get_running_loop(), protocol_factory, port, port_s, peers, raw=raw,
                    read_min=read_min, write_min=write_min, accept_timeout=accept_timeout,
                    shrink=shrink, sessions=sessions)
    if start_serving:
        await server.start_serving()
    return server
