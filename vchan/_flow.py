"""What vchan's two transports share: write flow control and transport state.

Flow control is asyncio's _FlowControlMixin, copied in behaviour, not
imported: asyncio's private helpers move between Python versions.
:class:`VchanTransport` (a connection on a ring of its own) and
:class:`~vchan.mux_stream.StreamTransport` (a stream of a session) derive from
:class:`TransportBase`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from .errors import LocalProtocolError

log = logging.getLogger("vchan")

_LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


class WriteFlowControl:
    """High/low water marks and pause_writing()/resume_writing() calls."""

    _loop: asyncio.AbstractEventLoop
    _protocol: Any
    _high_water: int
    _low_water: int
    _protocol_paused: bool

    def get_write_buffer_size(self) -> int:
        raise NotImplementedError

    def _maybe_pause_protocol(self) -> None:
        if self.get_write_buffer_size() <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": "protocol.pause_writing() failed",
                "exception": exc, "transport": self, "protocol": self._protocol,
            })

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler({
                    "message": "protocol.resume_writing() failed",
                    "exception": exc, "transport": self, "protocol": self._protocol,
                })

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def _set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._set_write_buffer_limits(high=high, low=low)
        self._maybe_pause_protocol()


class WriteQueue:
    """Bytes accepted by ``write()`` and not yet in the ring, in order.

    A large ``bytes`` write is kept as it is (it cannot change under us):
    no copy into a buffer, no copy when the front of it leaves.  Smaller or
    mutable writes are copied into bytearrays of at most ``TAIL_MAX`` bytes,
    small writes one after another into the same one, so that they leave as
    one frame.
    """

    SHARE_MIN = 16384               # bytes objects this large are kept, not copied
    TAIL_MAX = 262144               # copied writes gather into pieces this large

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytearray | memoryview] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (after what is queued)."""
        chunks = self._chunks
        if type(data) is bytes and chunks:
            # The common small write, onto the tail (no memoryview made).
            last = chunks[-1]
            n = len(data)
            if n < self.SHARE_MIN and type(last) is bytearray and len(last) + n <= self.TAIL_MAX:
                last += data
                self._size += n
                return
        view = data if isinstance(data, memoryview) else memoryview(data)
        n = view.nbytes
        if not n:
            return
        self._size += n
        if n >= self.SHARE_MIN and isinstance(view.obj, bytes) and view.c_contiguous:
            chunks.append(view.cast("B"))
            return
        tail = chunks[-1] if chunks else None
        if isinstance(tail, bytearray) and len(tail) + n <= self.TAIL_MAX:
            tail += view
        else:
            chunks.append(bytearray(view))

    def head(self) -> bytearray | memoryview:
        """The first piece of what is queued (not empty; the queue is not)."""
        return self._chunks[0]

    def advance(self, n: int) -> None:
        """``n`` bytes of the head piece have left."""
        head = self._chunks[0]
        self._size -= n
        if n >= len(head):
            self._chunks.popleft()
        elif isinstance(head, bytearray):
            del head[:n]
        else:
            self._chunks[0] = head[n:]

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


def unsent(pieces: Any, n: int) -> list[Any]:
    """What is left of ``pieces`` (bytes-like) after their first ``n`` bytes
    were written (the tail of a piece as a ``memoryview``)."""
    rest: list[Any] = []
    for piece in pieces:
        if n >= len(piece):
            n -= len(piece)
        else:
            rest.append(memoryview(piece)[n:] if n else piece)
            n = 0
    return rest


class TransportBase(WriteFlowControl, asyncio.Transport):
    """State and accessors common to vchan's transports.

    ``__init__`` sets the state every transport starts in (``_closing``,
    ``_closed``, ``_paused``, ``_eof``, ..., the write buffer limits); a
    subclass sets ``_loop`` and ``_buffer`` (bytes accepted, not yet in the
    ring), and gives ``_call_connection_lost``.  The way to the end is
    written once here: :meth:`close` (the buffer drains first),
    :meth:`_fatal_error` and :meth:`_force_close` (at once); a subclass tells
    its peer on the way with :meth:`_closed_and_flushed` and
    :meth:`_tell_peer_of_failure`.
    """

    _loop: asyncio.AbstractEventLoop
    _buffer: bytearray | WriteQueue
    _closing: bool
    _closed: bool
    _paused: bool
    _extra: dict[str, Any]
    _user_closed: bool
    _eof: bool
    _conn_lost: int

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        # The state every transport starts in: open, reading, nothing asked.
        self._protocol: Any = None
        self._conn_lost = 0
        self._closing = False
        self._closed = False
        self._user_closed = False
        self._paused = False
        self._eof = False               # write_eof() asked for
        self._eof_sent = False
        self._eof_received = False
        self._protocol_paused = False
        self._set_write_buffer_limits()

    def _repr_info(self) -> list[str]:
        """What the repr says after the class name (subclasses add to it)."""
        return []

    def __repr__(self) -> str:
        info = [self.__class__.__name__, *self._repr_info()]
        if self._closed:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        peer = self._extra.get("peername")
        if peer is not None:
            info.append(f"peer={peer}")
        if not self._closed:
            info.append("paused" if self._paused else "reading")
            info.append(f"write_buffer={len(self._buffer)}")
        return "<{}>".format(" ".join(info))

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by write() that are not in the ring yet."""
        return len(self._buffer)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _accepts_write(self, data: Any, lost: bool) -> bool:
        """Check a write() call; False when there is nothing to send (no data,
        or the connection is ``lost``: counted and, after a few, logged)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data argument must be a bytes-like object, "
                            f"not {type(data).__name__!r}")
        if self._user_closed:
            raise LocalProtocolError("write() after close() or abort() on a vchan transport")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return False
        if lost:
            if self._conn_lost >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                log.warning("vchan write() after the connection was lost")
            self._conn_lost += 1
            return False
        return True

    # -- the way to the end ---------------------------------------------------------

    def close(self) -> None:
        self._user_closed = True
        self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._paused = False
        if not self._buffer:
            self._closed_and_flushed()

    def _closed_and_flushed(self) -> None:
        """Closing, and every byte written is in the ring: the connection ends
        (a subclass tells its peer first)."""
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._user_closed = True
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on vchan") -> None:
        """Our side failed: an OSError is the connection's end (logged in debug
        mode), anything else a bug to report to the loop's exception handler."""
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                log.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol,
            })
        self._tell_peer_of_failure(exc)
        self._force_close(exc)

    def _tell_peer_of_failure(self, exc: BaseException) -> None:
        """(A subclass) Let the peer know our side failed, before the close."""

    def _force_close(self, exc: BaseException | None) -> None:
        """End now: what was not sent (nor delivered) is dropped."""
        if self._conn_lost:
            return
        self._buffer.clear()
        self._drop_unread()
        self._closing = True
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _drop_unread(self) -> None:
        """(A subclass) Forget bytes received and not yet delivered."""

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        raise NotImplementedError
