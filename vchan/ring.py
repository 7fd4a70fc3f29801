"""The libxenvchan ring, over memory this process can address.

This is a thin wrapper over ``vchan/ring.c``: every index, fence and copy is
done in C.  :class:`Ring` is one endpoint's view of the shared control page
and its two data rings; it never makes a system call.  When the peer must be
woken, the ring says so (:meth:`Ring.take_notify`) and its owner sends the
event -- over a Xen event channel, the emulator's, or anything else.

Two rings over the same memory talk to each other exactly as a libxenvchan
server and client do::

    page = mmap.mmap(-1, 4096)
    server = Ring.server(page, read_order=10, write_order=11)
    client = Ring.client(page)
    client.write(b"hello")
    assert server.read(5) == b"hello"
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from ._native import ffi, lib
from .addresses import check_ring_size
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "EINDEX",
    "ELIVE",
    "EORDER",
    "LIVE_CLOSED",
    "LIVE_CONNECTED",
    "LIVE_WAITING",
    "MAX_ORDER",
    "MIN_ORDER",
    "PAGE_SIZE",
    "Ring",
    "client_orders",
    "peer_crashed",
    "peer_gone_error",
    "ring_offset",
    "ring_pages",
    "server_orders",
]

PAGE_SIZE: int = lib.VCHAN_PAGE_SIZE
MIN_ORDER: int = lib.VCHAN_MIN_ORDER
MAX_ORDER: int = lib.VCHAN_MAX_ORDER
LIVE_CLOSED: int = lib.VCHAN_LIVE_CLOSED
LIVE_CONNECTED: int = lib.VCHAN_LIVE_CONNECTED
LIVE_WAITING: int = lib.VCHAN_LIVE_WAITING
NOTIFY_WRITE: int = lib.VCHAN_NOTIFY_WRITE
NOTIFY_READ: int = lib.VCHAN_NOTIFY_READ
NOTIFY_EOF: int = lib.VCHAN_NOTIFY_EOF
NOTIFY_CLOSED: int = lib.VCHAN_NOTIFY_CLOSED
NOTIFY_HELLO: int = lib.VCHAN_NOTIFY_HELLO
OFFSET_CLI_LIVE: int = lib.VCHAN_OFFSET_CLI_LIVE
OFFSET_SRV_LIVE: int = lib.VCHAN_OFFSET_SRV_LIVE


def peer_crashed(flags: int) -> bool:
    """Whether a peer whose live byte is 0 went away without closing.

    ``flags`` are its extension bits (:meth:`Ring.peer_flags`).  A vchan peer
    sets HELLO at set-up and CLOSED just before its live byte goes to 0; a
    live byte cleared without CLOSED was cleared by the kernel's unmap
    notification alone: the peer crashed or was killed.  A plain libxenvchan
    peer sets neither, so its going away always reads as a close.
    """
    return bool(flags & NOTIFY_HELLO) and not flags & NOTIFY_CLOSED


def peer_gone_error(flags: int, peer: object = None, *, unsent: int = 0) -> OSError:
    """The error of a connection whose peer's live byte is 0.

    :class:`ConnectionResetError` if the peer crashed (:func:`peer_crashed`);
    else it closed: :class:`BrokenPipeError`, for a write now or for
    ``unsent`` bytes of ours that never reached the ring.  ``peer`` names it.
    """
    who = "vchan peer" if peer is None else f"vchan peer {peer}"
    if peer_crashed(flags):
        return ConnectionResetError(f"the {who} went away without closing (crashed or killed)")
    if unsent:
        return BrokenPipeError(f"the {who} closed with {unsent} bytes of ours not yet in "
                               "the ring")
    return BrokenPipeError(f"the {who} closed the connection")

EINVAL: int = lib.VCHAN_EINVAL
EMSGSIZE: int = lib.VCHAN_EMSGSIZE
ECLOSED: int = lib.VCHAN_ECLOSED
EINDEX: int = lib.VCHAN_EINDEX
EORDER: int = lib.VCHAN_EORDER
ELIVE: int = lib.VCHAN_ELIVE

_REMOTE = {EINDEX, EORDER, ELIVE}


def strerror(code: int) -> str:
    """Describe a ring error code."""
    return str(ffi.string(lib.vchan_strerror(code)).decode())


def _raise(code: int, what: str) -> None:
    message = f"{what}: {strerror(code)}"
    if code in _REMOTE:
        raise RemoteProtocolError(message, code)
    if code == ECLOSED:
        raise LocalProtocolError(message)
    raise ValueError(message)


def server_orders(read_min: int, write_min: int) -> tuple[int, int]:
    """The ring orders a libxenvchan server picks for the requested sizes.

    ``read_min`` is the minimum size of the server's read ring (client to
    server, "left"), ``write_min`` of its write ring.  Sizes up to 1024 and
    2048 bytes use the in-page rings; larger ones are rounded up to a power
    of two of at least one page.
    """
    check_ring_size(read_min, "read_min")
    check_ring_size(write_min, "write_min")
    out = ffi.new("int[2]")
    _check(lib.vchan_server_orders(read_min, write_min, out, out + 1), "server_orders")
    return out[0], out[1]


def client_orders(page0: Any) -> tuple[int, int]:
    """Validate the orders in a control page, as a client does.

    Returns ``(read_order, write_order)`` from the client's point of view;
    raises :class:`RemoteProtocolError` for orders no server may announce.
    """
    page = _page(page0)
    out = ffi.new("int[2]")
    _check(lib.vchan_client_orders(ffi.cast("struct vchan_interface *", page), out, out + 1),
           "client_orders")
    return out[0], out[1]


def ring_offset(order: int) -> int | None:
    """Offset of an in-page ring in page 0, or None for separate pages."""
    off = lib.vchan_ring_offset(order)
    return None if off < 0 else int(off)


def ring_pages(order: int) -> int:
    """How many separate pages (grants) a ring of this order needs."""
    return int(lib.vchan_ring_pages(order))


def _check(rc: int, what: str) -> int:
    if rc < 0:
        _raise(rc, what)
    return rc


def _page(obj: Any) -> Any:
    buf = ffi.from_buffer("uint8_t[]", obj, require_writable=True)
    if len(buf) < PAGE_SIZE:
        raise ValueError(f"the control page must be at least {PAGE_SIZE} bytes, got {len(buf)}")
    return buf


def _ring_buffer(obj: Any, order: int, what: str, writable: bool) -> Any:
    if ring_offset(order) is not None:
        return ffi.NULL
    if obj is None:
        raise ValueError(f"a ring of order {order} needs its own {what} buffer")
    buf = ffi.from_buffer("uint8_t[]", obj, require_writable=writable)
    if len(buf) < (1 << order):
        raise ValueError(
            f"{what} buffer of {len(buf)} bytes is smaller than a ring of order {order}"
        )
    return buf


def _check_order(order: int, what: str) -> None:
    if not isinstance(order, int) or not MIN_ORDER <= order <= MAX_ORDER:
        raise ValueError(f"{what} must be an int in {MIN_ORDER}..{MAX_ORDER}, got {order!r}")


class Ring:
    """One endpoint of a libxenvchan ring.

    Build it with :meth:`server` or :meth:`client`.  All I/O is
    non-blocking: a write that finds the ring full, or a read that finds it
    empty, returns 0 after arming a wake-up request, so the caller can sleep
    until the peer's next event without losing it.  After any call,
    :meth:`take_notify` says whether the peer must be sent an event.
    """

    __slots__ = ("__weakref__", "_buffers", "_notify", "_r", "is_server", "read_size",
                 "write_size")

    _r: Any                     # struct vchan_ring *
    _notify: Any                # int *: "an event is due" accumulator
    _buffers: tuple[Any, ...]
    is_server: bool
    read_size: int
    write_size: int

    def __init__(self) -> None:
        raise TypeError("use Ring.server() or Ring.client()")

    @classmethod
    def _attach(cls, is_server: bool, page0: Any, read_order: int, write_order: int,
                read_buffer: Any, write_buffer: Any) -> Ring:
        page = _page(page0)
        # A client may have its read ring mapped read-only.
        rd = _ring_buffer(read_buffer, read_order, "read", is_server)
        wr = _ring_buffer(write_buffer, write_order, "write", True)
        self = object.__new__(cls)
        self._r = ffi.new("struct vchan_ring *")
        self._notify = ffi.new("int *")
        # Keeps the memory alive as long as we are.
        self._buffers = (page0, read_buffer, write_buffer, page, rd, wr)
        self.is_server = is_server
        self.read_size = 1 << read_order
        self.write_size = 1 << write_order
        init, what = ((lib.vchan_ring_init_server, "server init") if is_server else
                      (lib.vchan_ring_init_client, "client init"))
        _check(init(self._r, page, read_order, write_order, rd, wr), what)
        return self

    @classmethod
    def server(cls, page0: Any, read_order: int, write_order: int,
               read_buffer: Any = None, write_buffer: Any = None) -> Ring:
        """Initialise ``page0`` as a fresh control page and serve on it.

        ``read_buffer`` / ``write_buffer`` are the separate ring memories for
        orders >= 12 (ignored for the in-page orders 10 and 11).
        """
        _check_order(read_order, "read_order")
        _check_order(write_order, "write_order")
        if read_order == write_order and read_order < 12:
            raise ValueError("both rings cannot use the same in-page slot")
        return cls._attach(True, page0, read_order, write_order, read_buffer, write_buffer)

    @classmethod
    def client(cls, page0: Any, read_buffer: Any = None, write_buffer: Any = None,
               orders: tuple[int, int] | None = None) -> Ring:
        """Connect to the server's control page ``page0``.

        ``orders`` are the (read, write) orders from :func:`client_orders`;
        they are read from the page when omitted.  The caller must then send
        the peer one event (:meth:`take_notify` returns True).
        """
        read_order, write_order = orders if orders is not None else client_orders(page0)
        self = cls._attach(False, page0, read_order, write_order, read_buffer, write_buffer)
        self._notify[0] = 1     # wake the server, as libxenvchan does
        return self

    # -- state ----------------------------------------------------------

    def take_notify(self) -> bool:
        """Whether an event must be sent to the peer; clears the flag."""
        pending = bool(self._notify[0])
        self._notify[0] = 0
        return pending

    @property
    def error(self) -> RemoteProtocolError | None:
        """The peer's protocol violation that killed this ring, if any."""
        code = lib.vchan_ring_error(self._r)
        if not code:
            return None
        return RemoteProtocolError(strerror(code), code)

    def data_ready(self) -> int:
        """Bytes ready to read (and ask to be told when more arrive)."""
        return _check(lib.vchan_ring_data_ready(self._r), "data_ready")

    def buffer_space(self) -> int:
        """Bytes that can be written now (and ask to be told of more)."""
        return _check(lib.vchan_ring_buffer_space(self._r), "buffer_space")

    def peer_live(self) -> int:
        """The peer's live byte: 0 closed, 1 connected, 2 not yet connected."""
        return _check(lib.vchan_ring_peer_live(self._r), "peer_live")

    def peer_eof(self) -> bool:
        """Whether the peer half-closed its write side (vchan extension)."""
        return bool(lib.vchan_ring_peer_eof(self._r))

    def peer_flags(self) -> int:
        """Extension bits the peer set: NOTIFY_EOF | NOTIFY_CLOSED | NOTIFY_HELLO."""
        return int(lib.vchan_ring_peer_flags(self._r))

    @property
    def peer_speaks_extensions(self) -> bool:
        """False for a plain libxenvchan peer (no half-close, no crash telling)."""
        return bool(lib.vchan_ring_peer_flags(self._r) & NOTIFY_HELLO)

    def peek(self) -> list[bytes]:
        """Copies of the ready bytes (one or two pieces), not yet consumed."""
        a, alen = ffi.new("const uint8_t **"), ffi.new("uint32_t *")
        b, blen = ffi.new("const uint8_t **"), ffi.new("uint32_t *")
        _check(lib.vchan_ring_peek(self._r, a, alen, b, blen), "peek")
        pieces = [ffi.unpack(ffi.cast("char *", a[0]), alen[0])]
        if blen[0]:
            pieces.append(ffi.unpack(ffi.cast("char *", b[0]), blen[0]))
        return [p for p in pieces if p]

    def consume(self, n: int) -> int:
        """Release ``n`` bytes that :meth:`peek` reported."""
        return _check(lib.vchan_ring_consume(self._r, n, self._notify), "consume")

    def reserve(self) -> int:
        """Free space, as :meth:`fill` may use it (arms a "tell me on read")."""
        a, alen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        b, blen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        return _check(lib.vchan_ring_reserve(self._r, a, alen, b, blen), "reserve")

    def fill(self, data: Any) -> int:
        """Zero-copy write: reserve, copy ``data`` into the free pieces, commit.

        Writes as much of ``data`` as fits, like :meth:`write`, but through
        the reserve/commit pair the splice path uses.
        """
        a, alen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        b, blen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
        space = _check(lib.vchan_ring_reserve(self._r, a, alen, b, blen), "reserve")
        src = ffi.from_buffer(data)
        n = min(space, len(src))
        first = min(n, alen[0])
        ffi.memmove(a[0], src, first)
        if n > first:
            ffi.memmove(b[0], src[first:n], n - first)
        return _check(lib.vchan_ring_commit(self._r, n, self._notify), "commit")

    def commit(self, n: int) -> int:
        """Publish ``n`` bytes of the space :meth:`reserve` reported."""
        return _check(lib.vchan_ring_commit(self._r, n, self._notify), "commit")

    # -- I/O ------------------------------------------------------------

    def write(self, data: Any) -> int:
        """Write as much of ``data`` as fits; return the byte count."""
        buf = ffi.from_buffer(data)
        return _check(lib.vchan_ring_write(self._r, buf, len(buf), self._notify), "write")

    def writev(self, buffers: Iterable[Any]) -> int:
        """Write from several buffers in order, as much as fits."""
        bufs = [ffi.from_buffer(b) for b in buffers]
        ptrs = ffi.new("void *[]", bufs)
        lens = ffi.new("size_t[]", [len(b) for b in bufs])
        return _check(lib.vchan_ring_writev(self._r, ptrs, lens, len(bufs), self._notify),
                      "writev")

    def send(self, data: Any) -> int:
        """Write all of ``data`` or nothing; return len(data) or 0."""
        buf = ffi.from_buffer(data)
        return _check(lib.vchan_ring_send(self._r, buf, len(buf), self._notify), "send")

    def read_into(self, buffer: Any) -> int:
        """Read up to len(buffer) bytes straight into ``buffer``."""
        buf = ffi.from_buffer(buffer, require_writable=True)
        return _check(lib.vchan_ring_read(self._r, buf, len(buf), self._notify), "read")

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes."""
        out = bytearray(n)
        got = self.read_into(out)
        del out[got:]
        return bytes(out)

    def recv_into(self, buffer: Any) -> int:
        """Fill ``buffer`` completely, or read nothing; return the count."""
        buf = ffi.from_buffer(buffer, require_writable=True)
        return _check(lib.vchan_ring_recv(self._r, buf, len(buf), self._notify), "recv")

    def recv(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or b"" if fewer are ready."""
        out = bytearray(n)
        return bytes(out) if self.recv_into(out) else b""

    def write_eof(self) -> None:
        """Half-close: the peer reads what was written, then EOF."""
        _check(lib.vchan_ring_write_eof(self._r, self._notify), "write_eof")

    def close(self) -> None:
        """Mark this side closed (live byte 0); the caller then notifies."""
        lib.vchan_ring_close(self._r)
        self._notify[0] = 1

    def release(self) -> None:
        """Let go of the ring's memory (once it is unmapped: never use the ring again).

        The C views go first, then the buffers they view, in that order: left
        to the garbage collector, a cycle could free them the other way round.
        """
        buffers, self._buffers = self._buffers, ()
        for b in buffers:
            if isinstance(b, ffi.CData) and b != ffi.NULL:
                ffi.release(b)
        for b in buffers:
            if isinstance(b, memoryview):
                with contextlib.suppress(BufferError):
                    b.release()

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        err = lib.vchan_ring_error(self._r)
        state = f" error={strerror(err)!r}" if err else ""
        return f"<Ring {role} read={self.read_size} write={self.write_size}{state}>"
