"""One connection ("stream") of a vchan session, as an asyncio transport.

:class:`StreamTransport` behaves as :class:`vchan.VchanTransport` does (and
so as a socket transport does); what it sends and receives goes as frames of
its :class:`~vchan.mux.Session`, whose theory of operation (credit, wake-ups,
corking, closing) is at the top of :mod:`vchan.mux`.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _reader
from ._flow import TransportBase, WriteQueue, unsent
from ._native import ffi, lib
from .errors import RemoteProtocolError
from .mux_frames import (
    _LATER,
    BLOCKED,
    CLOSE,
    CORK_FLUSH,
    CORK_GAP,
    CORK_MAX,
    DEFAULT_WINDOW,
    EOF,
    HEADER,
    HOLD_PIECE,
    LOUD,
    QUIET,
    RESET,
    WINDOW,
    _clock,
    _protocol_error,
    _ring_error,
)
from .transport import SpliceProtocol

if TYPE_CHECKING:
    from .mux import Session

# The reader's C fast paths take announced ring bytes with these (vchan/mux.c),
# and StreamTransport.writelines() writes through the last (vchan/session.c).
_reader.set_direct_functions(*(int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
                               for name in ("vchan_direct_take", "vchan_direct_find",
                                            "vchan_direct_rest", "vchan_direct_due",
                                            "vchan_session_writev")))

# The data_received() of a StreamReaderProtocol that does not override it:
# it feeds the protocol's reader and does nothing else.
_FEEDS_ITS_READER = asyncio.StreamReaderProtocol.data_received

__all__ = ["StreamTransport"]

log = logging.getLogger("vchan")


_SHARE_MIN = WriteQueue.SHARE_MIN
_TAIL_MAX = WriteQueue.TAIL_MAX


class StreamTransport(TransportBase):
    """An asyncio transport over one stream of a vchan :class:`Session`.

    It behaves as :class:`vchan.VchanTransport` does (and so as a socket
    transport does): ``connection_made`` first, ``BufferedProtocol``
    supported, ``close()`` delivers what was written, ``write_eof()``
    half-closes, ``connection_lost`` exactly once.
    """

    _extra: dict[str, Any]
    _protocol: Any
    _buffer: WriteQueue

    def __init__(self, session: Session, stream_id: int, protocol: asyncio.BaseProtocol, *,
                 extra: dict[str, Any] | None = None,
                 on_close: Callable[[], None] | None = None,
                 busy_poll: float | None = None) -> None:
        super().__init__(extra)
        self._loop = session._loop
        self._session = session
        self.stream_id = stream_id
        self._on_close = on_close
        session._add_poller(self, busy_poll)
        self._extra.setdefault("session", session)
        self._extra.setdefault("endpoint", session._endpoint)   # the ring carrying it
        self._reader: Any = None        # a vchan StreamReader taking from the ring
        self._buffer = WriteQueue()
        self._queued = False            # in the session's ready queue
        self._credit = session.peer_window if session._hello_seen else DEFAULT_WINDOW
        self._recv_credit = session.window
        self._unacked = 0               # bytes taken by the protocol, credit not yet returned
        self._peer_blocked = False      # the peer waits for our credit (it said BLOCKED)
        self._blocked_sent = False      # we said BLOCKED and wait for the peer's credit
        # Bytes held for the protocol (paused, not made yet, or the rest of a
        # frame), in pieces of at most HOLD_PIECE bytes: pieces that size come
        # from the allocator's heap and are reused, where objects of a whole
        # frame (256 KiB) are fresh pages each time (page faults); and one
        # bytearray as a queue is worse (it is reallocated as it shrinks).
        self._rbuf: deque[bytes | memoryview] = deque()
        self._made = False
        self._peer_eof_pending = False  # EOF/CLOSE seen, not yet delivered
        self._peer_closed = False
        self.set_protocol(protocol)
        session._add(self)
        # The creator calls make_now() once it has registered the stream.

    def _repr_info(self) -> list[str]:
        return [f"stream={self.stream_id}"]

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)

    # -- protocol -------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        if isinstance(protocol, SpliceProtocol):
            raise TypeError("a SpliceProtocol needs a ring of its own: connect with "
                            "read_min/write_min (a dedicated connection)")
        if self._reader is not None and protocol is not self._protocol:
            self._detach_reader()
        self._buffered_protocol = isinstance(protocol, asyncio.BufferedProtocol)
        self._protocol = protocol

    def _attach_reader(self, reader: Any) -> bool:
        """A vchan StreamReader (set_transport) takes this stream's data from
        the ring itself: ``reader._ring_ready(n)`` announces n bytes, which
        its C paths copy out of the ring (``vchan_direct_take`` through the
        session's ``struct vchan_direct``, given here); and the small pieces
        are fed to it directly (:meth:`_data`).  Only when its
        protocol's ``data_received()`` would do nothing but feed it: a
        protocol that looks at the data itself gets every byte through it."""
        protocol = self._protocol
        if type(protocol).data_received is not _FEEDS_ITS_READER or \
                getattr(protocol, "_stream_reader", None) is not reader:
            return False
        self._reader = reader
        direct = self._session._direct
        self._reader._set_direct(int(ffi.cast("uintptr_t", direct)), direct)
        return True

    def _detach_reader(self) -> None:
        session = self._session
        if session._lazy is self:
            try:
                session._evict_lazy()
            except RemoteProtocolError as exc:
                session._drop_lazy()
                session._fail(exc)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader._set_direct(0, None)

    def _ring_taken(self) -> None:
        """For the reader's C paths, which took bytes of the announced run
        straight out of the ring: the run is over, or a waiting writer is
        owed its wake-up."""
        self._session._lazy_taken()

    def _ring_failed(self, code: int) -> None:
        """For the reader's C paths: taking from the ring failed (the code
        of vchan_direct_take).  The session fails; raises why."""
        session = self._session
        exc = _protocol_error("the peer rewrote frames it had published") \
            if code == lib.VCHAN_MUX_EFRAME else _ring_error(code, "read")
        session._drop_lazy()
        session._fail(exc)
        raise exc

    def _connection_made(self) -> None:
        if self._protocol is None or self._conn_lost:
            return
        self._protocol.connection_made(self)
        self._made = True
        if self._rbuf or self._peer_eof_pending:
            self._loop.call_soon(self._drain_rbuf)

    def make_now(self) -> None:
        """``connection_made()``, at once rather than from the loop's next turn.

        A server makes the protocol while it reads the OPEN, so the DATA that
        came with it goes straight to the protocol instead of waiting two
        loop iterations in ``_rbuf``; a client connecting through its
        session gets a made transport without a loop iteration.  A protocol
        that fails in ``connection_made()`` is reported as a socket
        transport's is, and the stream is reset.
        """
        try:
            self._connection_made()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.connection_made() call failed.")

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._rbuf or self._peer_eof_pending:
            self._loop.call_soon(self._drain_rbuf)

    # -- receiving ------------------------------------------------------------------

    def _can_deliver(self) -> bool:
        return self._made and not self._paused and not self._rbuf and not self._conn_lost

    def _data(self, data: bytes) -> None:
        if self._conn_lost or self._eof_received:
            return                      # closing: the bytes are dropped, as a socket does
        if not self._made or self._paused or self._rbuf:     # (_can_deliver, inline)
            self._rbuf.append(data)
            return
        # (_consumed, inline for the usual case: no credit due yet)
        self._unacked += len(data)
        if self._unacked >= self._session.window >> 1:
            self._consumed(0)
        try:
            if self._reader is not None:
                self._reader.feed_data(data)    # all its data_received() does (_attach_reader)
            else:
                self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _deliver_frames(self, f: Any, a: Any, alen: int, b: Any, blen: int) -> int:
        """BufferedProtocol: the DATA frame just peeked (and the stream's whole
        frames after it, while they fit) straight from the ring into the
        protocol's buffer; the frames are consumed.  Returns the bytes taken
        from the ring.  A buffer smaller than the frame takes it in pieces;
        what is left when the protocol pauses (or the stream ends) on the way
        waits in ``_rbuf``.
        """
        session = self._session
        r, notify = session._r, session._notify
        n: int = f.length
        done = 0
        self._recv_credit -= n
        try:
            view = ffi.from_buffer(self._protocol.get_buffer(n), require_writable=True)
            if not len(view):
                raise RuntimeError("get_buffer() returned an empty buffer")
            if len(view) >= n:
                k: int = lib.vchan_mux_take_run(r, f, a, alen, b, blen, session._max_in,
                                                self._recv_credit + n, view, len(view),
                                                notify)
                if k < 0:
                    raise _ring_error(k, "read")
                self._recv_credit -= k - n
                self._consumed(k)
                self._protocol.buffer_updated(k)
                return k
            # The buffer is smaller than the frame: piece by piece.
            for ptr, length in ((a, alen), (b, blen)):
                off = 0
                while off < length:
                    if self._paused or self._conn_lost or session.closed:
                        raise _Stop
                    if view is None:
                        view = ffi.from_buffer(self._protocol.get_buffer(length - off),
                                               require_writable=True)
                        if not len(view):
                            raise RuntimeError("get_buffer() returned an empty buffer")
                    k = min(len(view), length - off)
                    # The buffer may be gone after a callback: copy before it.
                    ffi.memmove(view, ptr + off, k)
                    view = None
                    off += k
                    done += k
                    self._consumed(k)
                    self._protocol.buffer_updated(k)
        except _Stop:
            pass
        except RemoteProtocolError:
            raise
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
        if session.closed:
            return n                    # a callback ended the session: ring unmapped
        if done < n and not self._conn_lost:
            # Paused mid-frame: the rest waits for resume_reading().
            self._hold(a, alen, b, blen, done)
        lib.vchan_ring_consume(r, HEADER + n, notify)
        return n

    def _hold(self, a: Any, alen: int, b: Any, blen: int, skip: int) -> None:
        """Keep a payload (after its first ``skip`` bytes) until the protocol
        can take it, copied from the ring in pieces of at most HOLD_PIECE."""
        if self._conn_lost or self._eof_received:
            return                      # closing: the bytes are dropped, as a socket does
        rbuf = self._rbuf
        for ptr, length in ((a, alen), (b, blen)):
            if skip >= length:
                skip -= length
                continue
            p = ffi.cast("char *", ptr)
            for off in range(skip, length, HOLD_PIECE):
                rbuf.append(ffi.unpack(p + off, min(HOLD_PIECE, length - off)))
            skip = 0

    def _deliver_held(self) -> None:
        """Hand the protocol the first held piece (or what its buffer takes)."""
        rbuf = self._rbuf
        piece = rbuf[0]
        if self._buffered_protocol:
            buf = memoryview(self._protocol.get_buffer(len(piece))).cast("B")
            n = min(len(buf), len(piece))
            if n <= 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = piece[:n]
            buf.release()
            if n == len(piece):
                rbuf.popleft()
            else:
                rbuf[0] = memoryview(piece)[n:]
            self._consumed(n)
            self._protocol.buffer_updated(n)
        else:
            rbuf.popleft()
            self._consumed(len(piece))
            # (a piece a BufferedProtocol left half taken, if the protocol changed)
            self._protocol.data_received(piece if isinstance(piece, bytes) else bytes(piece))

    def _drain_rbuf(self) -> None:
        """Deliver what was held while paused (or before connection_made)."""
        try:
            while self._rbuf and not self._paused and not self._conn_lost and self._made:
                self._deliver_held()
            if not self._rbuf and self._peer_eof_pending and not self._paused:
                self._peer_eof_pending = False
                self._deliver_eof()
            self._session._kick()           # credit returned while draining
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol callback failed.")

    def _consumed(self, n: int) -> None:
        """The protocol took ``n`` bytes: return credit once half a window is due."""
        self._unacked += n
        session = self._session
        if self._unacked >= session.window >> 1 and not self._peer_closed:
            # Quiet unless the peer said it is blocked: a sender that still
            # has credit picks the update up when it next looks, and a busy
            # pair of processes is spared a wake-up per update.
            session._send_control(WINDOW, 0, self.stream_id, self._unacked, b"",
                                  LOUD if self._peer_blocked else QUIET)
            self._peer_blocked = False
            self._recv_credit += self._unacked
            self._unacked = 0

    def _peer_eof(self, *, closed: bool) -> None:
        if closed:
            self._peer_closed = True
            self._session._forget(self)
        if self._eof_received or self._conn_lost:
            if closed:
                self._after_peer_closed()
            return
        if self._rbuf or not self._made or self._paused:
            self._peer_eof_pending = True
            if self._made and not self._paused:
                self._loop.call_soon(self._drain_rbuf)
            return
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        self._eof_received = True
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if self._peer_closed:
            self._after_peer_closed()
        elif not keep_open and not self._closing:
            self._close()

    def _after_peer_closed(self) -> None:
        """The peer will not read any more: we are done once EOF is delivered."""
        if self._conn_lost:
            return
        if self._buffer:
            lost = len(self._buffer)
            self._force_close(BrokenPipeError(
                f"vchan peer closed with {lost} bytes of ours not yet sent"))
            return
        self._closing = True
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, None)

    # -- writing --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # (the common case, non-empty bytes on a stream that is well, checked inline)
        if (type(data) is not bytes or not data or self._conn_lost or self._peer_closed
                or self._user_closed or self._eof) and \
                not self._accepts_write(data, bool(self._conn_lost or self._peer_closed)):
            return
        session = self._session
        buf = self._buffer
        size = len(data)
        if not buf._size and self._credit > 0 and not session._ctl and not session._ready:
            # At once: a large write always; a small one unless it is part of
            # a burst (within CORK_GAP of the last small one sent at once) and
            # then only if the peer took everything or sleeps until our next
            # write (vchan_session_send's now_only; see "Small writes").
            if size >= CORK_MAX:
                now_only = 0
            elif session._corked:
                now_only = -1
            else:
                now = _clock()
                if now - session._last_direct < CORK_GAP:
                    now_only = -1
                else:
                    session._last_direct = now
                    now_only = 1
            if now_only >= 0:
                credit = self._credit
                n: int = lib.vchan_session_send(
                    session._r, self.stream_id, ffi.from_buffer(data),
                    size if size <= credit else credit, session._min_chunk, session._max_out,
                    session._notify, session._dev, session._port, session._wakes, now_only)
                if n != _LATER:
                    if n < 0:
                        self._write_failed(n)
                        return
                    if session._notify[0] or session._force_notify:
                        session._flush_notify()     # (or a wake-up that failed: to report why)
                    self._credit = credit - n
                    if session._polls:
                        session._poll_start()   # an answer may come soon
                    if n == size:
                        return
                    data = memoryview(data)[n:]
        # (inlined: this is the path of every small write while others wait;
        # so is WriteQueue.extend's usual case, bytes onto the bytearray tail)
        before = buf._size
        chunks = buf._chunks
        if type(data) is bytes and chunks and size < _SHARE_MIN \
                and type(last := chunks[-1]) is bytearray and len(last) + size <= _TAIL_MAX:
            last += data
            buf._size = before + size
        else:
            buf.extend(data)
        if self._credit > 0:
            if not self._queued:
                self._queued = True
                session._ready.append(self)
            if before < CORK_FLUSH <= buf._size:
                session._kick()         # a frame's worth: no need to wait
            elif not session._corked:
                session._cork()
        else:
            self._out_of_credit()
            session._kick()
        if buf._size > self._high_water:
            self._maybe_pause_protocol()

    def _write_failed(self, code: int) -> None:
        """Writing to the ring failed with ``code``: a broken peer fails the
        session; anything else is raised."""
        exc = _ring_error(code, "write")
        if not isinstance(exc, RemoteProtocolError):
            raise exc
        self._session._fail(exc)

    def writelines(self, list_of_data: Any) -> None:
        """Write the pieces in order, in one go.  A list or tuple of ``bytes``
        of ``CORK_MAX`` or more in all, on a stream with nothing waiting to
        be sent, goes into the ring in one C call whose frames gather their
        payload from the pieces (``vchan._reader.writev``: no join, no
        Python per piece; a ``[header, payload]`` message is one frame).
        Otherwise, and for what did not fit: runs of small pieces joined
        (one frame), large ``bytes`` as they are (no copy into a join)."""
        session = self._session
        if not self._buffer._size and self._credit > 0 and not session._ctl \
                and not session._ready and not (self._conn_lost or self._peer_closed
                                                or self._user_closed or self._eof):
            got = _reader.writev(session._out_address, self.stream_id, list_of_data,
                                 self._credit, CORK_MAX)
            if got is not None:
                n, total = got
                if n < 0:
                    self._write_failed(n)
                    return
                if session._notify[0] or session._force_notify:
                    session._flush_notify()     # (or a wake-up that failed: to report why)
                self._credit -= n
                if session._polls:
                    session._poll_start()       # an answer may come soon
                if n == total:
                    return
                list_of_data = unsent(list_of_data, n)
        small: list[Any] = []
        for data in list_of_data:
            if type(data) is bytes and len(data) >= CORK_MAX:
                if small:
                    self.write(b"".join(small))
                    small = []
                self.write(data)
            else:
                small.append(data)
        if small:
            self.write(b"".join(small))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._send_eof()

    def _send_eof(self) -> None:
        self._eof_sent = True
        self._session._send_control(EOF, 0, self.stream_id, 0, b"")
        self._session._kick()

    def _out_of_credit(self) -> None:
        """Data waits and the credit is spent: tell the peer (once per wait)."""
        if not self._blocked_sent and not self._conn_lost:
            self._blocked_sent = True
            self._session._send_control(BLOCKED, 0, self.stream_id, 0, b"")

    def _sent(self) -> None:
        """Some of our buffer went into the ring."""
        self._maybe_resume_protocol()
        if self._buffer:
            return
        if self._eof and not self._eof_sent:
            self._send_eof()
        if self._closing and not self._conn_lost:
            self._closed_and_flushed()

    # -- closing --------------------------------------------------------------------

    def _closed_and_flushed(self) -> None:
        self._conn_lost += 1
        if not self._peer_closed:
            self._session._send_control(CLOSE, 0, self.stream_id, 0, b"")
            self._session._forget(self)
            self._session._kick()
        self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._user_closed = True
        if self._conn_lost:
            return
        self._buffer.clear()
        self._closing = True
        self._closed_and_flushed()

    def _tell_peer_of_failure(self, exc: BaseException) -> None:
        if not self._conn_lost and not self._peer_closed and not self._session.closed:
            self._session._send_control(RESET, 0, self.stream_id, 0,
                                        f"the peer's protocol failed: {exc!r}".encode())
            self._session._forget(self)
            self._session._kick()

    def _drop_unread(self) -> None:
        self._rbuf.clear()

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._session._forget(self)
        self._session._remove_poller(self)
        try:
            if self._made:
                self._protocol.connection_lost(exc)
        finally:
            self._protocol = None
            if self._on_close is not None:
                self._on_close()


class _Stop(Exception):
    """Delivery stops here (paused, closed): the rest of the frame waits."""
