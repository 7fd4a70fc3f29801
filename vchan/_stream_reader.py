"""vchan.StreamReader: an asyncio.StreamReader that keeps what it receives
as it came and, on a session stream, takes it straight from the ring
(see docs/streams.md).  vchan.streams gives it to users."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

from . import _reader

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["StreamReader"]

_DEFAULT_LIMIT = 2**16   # asyncio.streams' own default
# read(n) returns a whole received piece of at least this size as it is (no
# copy) when it is all that fits; smaller pieces are joined up to _JOIN bytes.
_WHOLE = 1 << 14
_JOIN = 1 << 16
_NO_LIMIT = 1 << 62


# What read(), readexactly(), readline() and readuntil() return: an awaitable that does
# the usual case in C and otherwise runs the Python method (vchan/_reader.c).
# asyncio.create_task(), wait_for(), gather() and run() take it as the
# coroutine it stands for.
collections.abc.Coroutine.register(_reader.Call)


class StreamReader(_reader.ReaderCore, asyncio.StreamReader):
    """An :class:`asyncio.StreamReader` that keeps what it receives as it came.

    asyncio's reader appends every piece it receives to one ``bytearray`` and
    copies each answer out of it (``read()`` twice: a ``bytearray`` slice,
    then ``bytes``), and the ``bytearray`` is reallocated as it grows and
    shrinks.  This one keeps the ``bytes`` objects the transport delivered
    (copied once out of the ring, up to 64 KiB each) and hands them on: a
    ``read(n)`` that one whole piece answers returns that piece itself, and
    ``readexactly()`` / ``readuntil()`` copy only the bytes they return.

    ``read()``, ``readexactly()``, ``readline()`` and ``readuntil()`` answer the usual call
    (from the first piece) in C (``vchan/_reader.c``): they return an
    awaitable that asyncio takes as the coroutine it stands for (nothing is
    read until it is awaited), and that runs the Python method otherwise.

    Otherwise it is asyncio's reader, as :func:`open_connection` and
    :func:`start_server` give it: the same methods, exceptions, ``limit``
    (reading pauses above twice the limit and resumes at the limit) and
    corner cases, and ``readuntil()`` takes a tuple of separators as
    Python 3.13's does.  ``read(n)`` returns at most ``n`` bytes as soon as
    any are there, as asyncio's does; it may return fewer of those that are
    buffered (a whole received piece rather than a copy of several).
    """

    # asyncio's own state, set by its __init__ (typeshed does not declare it)
    _limit: int
    _loop: asyncio.AbstractEventLoop
    _eof: bool
    _waiter: asyncio.Future[None] | None
    _exception: BaseException | None
    _transport: Any                 # a transport that pauses, or None
    _paused: bool
    _buffer: bytearray              # asyncio's; deleted by __init__ (not used here)

    def __init__(self, limit: int = _DEFAULT_LIMIT,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(limit, loop)
        # asyncio's bytearray is not used here.  (del, not vars(self).pop():
        # vars() turns the object's attributes into a dict of their own, and
        # every attribute read of the reader's (on every call) then costs
        # ~18 ns more on CPython 3.11.)
        with contextlib.suppress(AttributeError):
            del self._buffer
        self._chunks: deque[bytes] = deque()
        self._pos = 0                   # bytes of _chunks[0] already taken
        self._size = 0                  # bytes buffered (after _pos), _ring included
        # A vchan session stream announces its bytes at the head of its ring
        # instead of copying them out (vchan.mux): _ring of them are there,
        # after the chunks, and _pull() takes them from the transport.
        self._ring = 0
        self._source: Any = None

    def __repr__(self) -> str:
        info = ["vchan.StreamReader"]
        if self._size:
            info.append(f"{self._size} bytes")
        if self._eof:
            info.append("eof")
        if self._limit != _DEFAULT_LIMIT:
            info.append(f"limit={self._limit}")
        if self._waiter:
            info.append(f"waiter={self._waiter!r}")
        if self._exception:
            info.append(f"exception={self._exception!r}")
        if self._transport:
            info.append(f"transport={self._transport!r}")
        if self._paused:
            info.append("paused")
        return "<{}>".format(" ".join(info))

    # -- the protocol's side -------------------------------------------------------

    def set_transport(self, transport: asyncio.BaseTransport) -> None:
        """The transport (the protocol calls this once).  A vchan session
        stream lets this reader take its bytes straight from the ring."""
        super().set_transport(transport)
        attach = getattr(transport, "_attach_reader", None)
        if attach is not None and attach(self):
            self._source = transport

    def feed_data(self, data: Iterable[SupportsIndex] | ReadableBuffer) -> None:
        """Append ``data`` (the protocol calls this); pause reading above
        twice the limit."""
        assert not self._eof, "feed_data after feed_eof"
        if type(data) is not bytes:
            data = bytes(data)          # the caller may reuse its buffer
        if not data:
            return
        if self._ring:
            self._pull(self._size)      # (it never comes after those, but in order)
        self._chunks.append(data)
        # (_added, inline: this runs for every message)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)
        if self._size > 2 * self._limit:
            self._maybe_pause()

    def _ring_ready(self, n: int) -> None:
        """The transport: ``n`` more bytes are in the ring for us."""
        self._ring += n
        self._added(n)

    def _ring_evicted(self, data: bytes) -> None:
        """The transport copied the next of our ring bytes aside."""
        self._ring -= len(data)
        self._chunks.append(data)

    def _ring_lost(self) -> None:
        """The transport's ring is gone, and the bytes we were told of with it."""
        self._size -= self._ring
        self._ring = 0

    def _pull(self, n: int) -> None:
        """Have at least ``n`` bytes in the chunks, taking from the ring the
        bytes missing and no more (a frame taken in part stays in the ring,
        and the next call takes the rest straight from there)."""
        while self._ring and (need := n - (self._size - self._ring)) > 0:
            self._chunks.append(self._take_ring(need))     # (C: _ring goes down)

    def _added(self, n: int) -> None:
        self._size += n
        self._wakeup_waiter()
        if self._size > 2 * self._limit:
            self._maybe_pause()

    def _maybe_pause(self) -> None:
        """Over twice the limit: pause the transport (once)."""
        if self._transport is not None and not self._paused:
            try:
                self._transport.pause_reading()
            except NotImplementedError:
                self._transport = None  # it cannot pause: keep everything
            else:
                self._paused = True

    def _wakeup_waiter(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)

    def _new_waiter(self, func_name: str) -> asyncio.Future[None]:
        """The future that data or EOF completes (reading resumed if it is
        paused); the caller awaits it and clears ``_waiter`` after."""
        if self._waiter is not None:
            raise RuntimeError(f"{func_name}() called while another coroutine is "
                               f"already waiting for incoming data")
        assert not self._eof, "_wait_for_data after EOF"
        if self._exception is not None:
            # (set while we ran: nothing would wake us any more)
            raise self._exception
        # Paused and waiting would never end (readexactly(n) with n > limit).
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        self._waiter = waiter = self._loop.create_future()
        return waiter

    async def _wait_for_data(self, func_name: str) -> None:
        """Wait until data or EOF comes (resuming reading if it is paused)."""
        waiter = self._new_waiter(func_name)
        try:
            await waiter
        finally:
            self._waiter = None

    def at_eof(self) -> bool:
        """True if the buffer is empty and ``feed_eof()`` was called."""
        return self._eof and not self._size

    def _maybe_resume_transport(self) -> None:
        if self._paused and self._size <= self._limit:
            self._paused = False
            self._transport.resume_reading()

    # -- the buffer ------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (0 < n <= size)."""
        if self._ring:
            self._pull(n)
        chunks, pos = self._chunks, self._pos
        head = chunks[0]
        left = len(head) - pos
        self._size -= n
        if n < left:
            self._pos = pos + n
            return head[pos:pos + n]
        chunks.popleft()
        self._pos = 0
        if n == left:
            return head[pos:] if pos else head
        parts: list[bytes | memoryview] = [memoryview(head)[pos:]]
        need = n - left
        while need:
            head = chunks[0]
            if len(head) > need:
                parts.append(memoryview(head)[:need])
                self._pos = need
                break
            parts.append(chunks.popleft())
            need -= len(head)
        return b"".join(parts)

    def _take_all(self) -> bytes:
        return self._take(self._size) if self._size else b""

    def _drop(self, n: int) -> None:
        """Forget the first ``n`` buffered bytes."""
        self._pull(n)
        self._size -= n
        n += self._pos
        chunks = self._chunks
        while chunks and n >= len(chunks[0]):
            n -= len(chunks.popleft())
        self._pos = n if chunks else 0

    def _startswith(self, prefix: bytes, offset: int) -> bool:
        """Whether the buffer holds ``prefix`` at ``offset``."""
        if self._size - offset < len(prefix):
            return False
        self._pull(offset + len(prefix))
        got = bytearray()
        for i, chunk in enumerate(self._chunks):
            start = self._pos if i == 0 else 0
            if offset >= len(chunk) - start:
                offset -= len(chunk) - start
                continue
            got += chunk[start + offset:start + offset + len(prefix) - len(got)]
            offset = 0
            if len(got) == len(prefix):
                break
        return got == prefix

    def _find(self, separators: list[bytes], offset: int) -> tuple[int, int] | None:
        """(start, end) in the buffer of the separator that ends first,
        looking at the separators that start at ``offset`` or later (taking
        ring bytes piece by piece until one is found)."""
        while True:
            found = self._find_in_chunks(separators, offset)
            if found is not None or not self._ring:
                return found
            # Not in what was searched: no separator starts before this.
            have = self._size - self._ring
            offset = max(offset, have + 1 - len(separators[-1]))
            if len(separators) == 1 and len(separators[0]) == 1:
                # In the ring's head frame?  Then _take() takes just that much.
                k = self._find_ring(separators[0][0], _NO_LIMIT)
                if k:
                    return have + k - 1, have + k
            self._chunks.append(self._take_ring(self._ring))   # the head frame's rest

    def _find_in_chunks(self, separators: list[bytes], offset: int) -> tuple[int, int] | None:
        keep = len(separators[-1]) - 1   # bytes a separator may straddle
        best: tuple[int, int] | None = None
        carry = b""                     # the last ``keep`` bytes before this piece
        base = 0                        # buffer offset of this piece's first byte
        for i, chunk in enumerate(self._chunks):
            start = self._pos if i == 0 else 0
            size = len(chunk) - start
            if base + size > offset:
                if carry:
                    # Separators across the boundary with the pieces before.
                    window = carry + chunk[start:start + keep]
                    w0 = base - len(carry)
                    for sep in separators:
                        j = window.find(sep, max(0, offset - w0))
                        if j != -1 and (best is None or w0 + j + len(sep) < best[1]):
                            best = (w0 + j, w0 + j + len(sep))
                for sep in separators:
                    j = chunk.find(sep, start + max(0, offset - base))
                    if j != -1:
                        j += base - start
                        if best is None or j + len(sep) < best[1]:
                            best = (j, j + len(sep))
                if best is not None:
                    return best
            if keep:
                carry = (carry + chunk[max(start, len(chunk) - keep):])[-keep:]
            base += size
        return None

    # -- reading ---------------------------------------------------------------------

    async def _readline_slow(self) -> bytes:
        """readline(), when the first piece does not hold the line (C: vchan/_reader.c)."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial
        except asyncio.LimitOverrunError as e:
            if self._startswith(b"\n", e.consumed):
                self._drop(e.consumed + 1)
            else:
                self._drop(self._size)
            self._maybe_resume_transport()
            raise ValueError(e.args[0]) from None

    async def _readuntil_slow(
            self, separator: ReadableBuffer | tuple[ReadableBuffer, ...] = b"\n") -> bytes:
        """readuntil(separator), when the first piece does not answer it
        (C: vchan/_reader.c)."""
        # (of several, the shortest match wins)
        separators = sorted((bytes(sep) for sep in separator), key=len) \
            if isinstance(separator, tuple) else [bytes(separator)]
        if not separators:
            raise ValueError("Separator should contain at least one element")
        if not separators[0]:
            raise ValueError("Separator should be at least one-byte string")
        if self._exception is not None:
            raise self._exception
        # No separator starts before ``offset``.
        offset = 0
        min_len, max_len = len(separators[0]), len(separators[-1])
        while True:
            size = self._size
            if size - offset >= min_len:
                found = self._find(separators, offset)
                if found is not None:
                    break
                offset = max(0, size + 1 - max_len)
                if offset > self._limit:
                    raise asyncio.LimitOverrunError(
                        "Separator is not found, and chunk exceed the limit", offset)
            # A whole separator may have come with the last piece, EOF or not.
            if self._eof:
                raise asyncio.IncompleteReadError(self._take_all(), None)
            await self._wait_for_data("readuntil")
        start, end = found
        if start > self._limit:
            raise asyncio.LimitOverrunError(
                "Separator is found, but chunk is longer than limit", start)
        data = self._take(end)
        self._maybe_resume_transport()
        return data

    async def _read_slow(self, n: int = -1) -> bytes:
        """read(n), when the first piece does not answer it (C: vchan/_reader.c)."""
        if self._exception is not None:
            raise self._exception
        if n == 0:
            return b""
        if n < 0:
            # read(limit) until EOF: waiting for everything at once would
            # stall a peer that sends more than the limit.
            blocks = []
            while block := await self.read(self._limit):
                blocks.append(block)
            return b"".join(blocks)
        # (a loop: bytes announced in a ring can vanish with the ring before
        # we run -- its session failed -- and the failure follows at once)
        while not self._size and not self._eof:
            await self._wait_for_data("read")
            if self._exception is not None and not self._size:
                raise self._exception
        if not self._size:
            self._maybe_resume_transport()
            return b""
        if not self._chunks:
            # All of it in the ring: the rest of its head frame, up to n
            # (the next call takes from the ring in C).
            data = self._take_ring(n)       # (C: _ring goes down)
            self._size -= len(data)
            self._maybe_resume_transport()
            return data
        left = len(self._chunks[0]) - self._pos
        if left >= n:
            data = self._take(n)
        elif not self._pos and left >= _WHOLE:
            # A whole piece, not worth a copy to join it to the next.
            data = self._chunks.popleft()
            self._size -= left
        else:
            data = self._take(self._joinable(left, min(n, _JOIN)))
        self._maybe_resume_transport()
        return data

    def _joinable(self, left: int, most: int) -> int:
        """How many bytes a short ``read()`` returns: the ``left`` bytes of
        the first piece, joined with the small whole pieces after it up to
        ``most`` bytes.  It never cuts into a large piece: a read that did
        would leave the next one starting inside a piece, and every read
        after it would join (copy twice) again."""
        if left >= _WHOLE:
            return left
        total, i = left, 1
        chunks = self._chunks
        while total < most:
            if i == len(chunks):
                break       # (ring bytes: the next call takes them from the ring)
            size = len(chunks[i])
            if size >= _WHOLE:
                break
            if total + size > most:
                return most             # (small pieces: a part of one is cheap)
            total += size
            i += 1
        return total

    async def _readexactly_slow(self, n: int) -> bytes:
        """readexactly(n), when the first piece does not hold the n bytes
        (C: vchan/_reader.c)."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        if self._exception is not None:
            raise self._exception
        if n == 0:
            return b""
        chunks = self._chunks
        if n > _JOIN and not (chunks and not self._pos and len(chunks[0]) == n):
            return await self._readexactly_assembled(n)
        while self._size < n:
            if self._eof:
                raise asyncio.IncompleteReadError(self._take_all(), n)
            # (_wait_for_data, inline: a coroutine fewer per message waited for)
            waiter = self._new_waiter("readexactly")
            try:
                await waiter
            finally:
                self._waiter = None
        if not self._pos and not self._ring and len(chunks[0]) == n:
            data = chunks.popleft()     # the message is the piece that came
            self._size -= n
        else:
            data = self._take(n)
        if self._paused:
            self._maybe_resume_transport()
        return data

    async def _readexactly_assembled(self, n: int) -> bytes:
        """readexactly(n) of more than ``_JOIN`` bytes: they are copied into
        the bytes object it returns as they come, from the ring or the
        buffer (C: ``_assemble``), rather than buffered and then joined (a
        copy fewer; the reader's buffer stays small, as reading goes on
        while the message comes).  If the call ends without them
        (cancelled, an error, EOF), what it took goes back to the front of
        the buffer (or into the ``IncompleteReadError``): nothing is lost."""
        try:
            while (data := self._assemble(n)) is None:
                if self._eof:
                    break
                await self._wait_for_data("readexactly")
        except BaseException:
            self._unread(self._unassemble())
            raise
        if data is None:
            raise asyncio.IncompleteReadError(self._unassemble(), n)
        if self._paused:
            self._maybe_resume_transport()
        return data

    def _unread(self, data: bytes) -> None:
        """Put ``data`` back at the front of the buffer."""
        if not data:
            return
        chunks = self._chunks
        if self._pos:
            chunks[0] = chunks[0][self._pos:]
            self._pos = 0
        chunks.appendleft(data)
        self._size += len(data)
        if self._size > 2 * self._limit:
            self._maybe_pause()
