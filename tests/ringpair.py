"""Two ring endpoints over one shared memory, and a model of the protocol.

Used by the ring tests: ``Pair`` is a server and a client built over the same
anonymous mappings, and ``Model`` predicts every return value and every
"send an event" verdict from libxenvchan's rules, so a test can check that
the C ring agrees byte for byte and wake-up for wake-up.
"""

from __future__ import annotations

import mmap
import os
import random
from dataclasses import dataclass, field

from vchan.ring import NOTIFY_READ, NOTIFY_WRITE, Ring

_L = 4 << 20
_PATTERN = random.Random(1234).randbytes(_L) * 2


def chunk(offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the endless test stream."""
    start = offset % _L
    return _PATTERN[start:start + n]


def _ring_memory(order: int, read_only_view: bool = False) -> tuple[object, object] | None:
    """Shared memory for a separate ring: (writable view, reader's view)."""
    if order < 12:
        return None
    size = 1 << order
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, size)
        rw = mmap.mmap(fd, size)
        ro = mmap.mmap(fd, size, prot=mmap.PROT_READ) if read_only_view else rw
    finally:
        os.close(fd)
    return rw, ro


class Pair:
    """A libxenvchan server and client sharing memory in one process."""

    def __init__(self, left_order: int, right_order: int) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE)
        left = _ring_memory(left_order)
        # The client maps its read ring (right) read-only, as libxenvchan does.
        right = _ring_memory(right_order, read_only_view=True)
        self.server = Ring.server(self.page, left_order, right_order,
                                  left[0] if left else None, right[0] if right else None)
        self.client = Ring.client(self.page, right[1] if right else None,
                                  left[0] if left else None)

    def side(self, is_server: bool) -> Ring:
        return self.server if is_server else self.client

    @property
    def cli_notify(self) -> int:
        return self.page[22]

    @property
    def srv_notify(self) -> int:
        return self.page[23]


@dataclass
class Side:
    sent: int = 0                   # bytes this side has written
    received: int = 0               # bytes this side has read
    requests: set[int] = field(default_factory=set)  # bits in its own notify byte
    waiting_data: bool = False      # a read came up short: it would sleep
    waiting_space: bool = False     # a write came up short: it would sleep


class Model:
    """Predicts the ring's behaviour and checks the C ring against it."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        # Server init asks the client for WRITE (cli_notify), the client's
        # connect asks the server for WRITE (srv_notify).
        self.sides = {True: Side(requests={NOTIFY_WRITE}), False: Side(requests={NOTIFY_WRITE})}
        assert pair.client.take_notify(), "a connecting client must wake the server"
        assert not pair.server.take_notify()

    def _space(self, x: bool) -> int:
        ring = self.pair.side(x)
        return ring.write_size - (self.sides[x].sent - self.sides[not x].received)

    def _ready(self, x: bool) -> int:
        return self.sides[not x].sent - self.sides[x].received

    def _moved(self, x: bool, bit: int) -> None:
        """x moved an index: an event is due iff the peer had asked."""
        ring = self.pair.side(x)
        expected = bit in self.sides[x].requests
        self.sides[x].requests.discard(bit)
        assert ring.take_notify() is expected, f"notify after moving {bit:#x}"
        peer = self.sides[not x]
        if bit == NOTIFY_WRITE and peer.waiting_data:
            assert expected, "lost wake-up: reader sleeps but writer sent no event"
            peer.waiting_data = False
        if bit == NOTIFY_READ and peer.waiting_space:
            assert expected, "lost wake-up: writer sleeps but reader sent no event"
            peer.waiting_space = False

    def _arm(self, x: bool, bit: int) -> None:
        self.sides[not x].requests.add(bit)

    def write(self, x: bool, n: int) -> None:
        space = self._space(x)
        if n and space < n:
            self._arm(x, NOTIFY_READ)
        got = self.pair.side(x).write(chunk(self.sides[x].sent, n))
        assert got == min(n, space)
        self._after_write(x, n, got)

    def writev(self, x: bool, sizes: list[int]) -> None:
        space, total = self._space(x), sum(sizes)
        if total and space < total:
            self._arm(x, NOTIFY_READ)
        pieces, at = [], self.sides[x].sent
        for n in sizes:
            pieces.append(chunk(at, n))
            at += n
        got = self.pair.side(x).writev(pieces)
        assert got == min(total, space)
        self._after_write(x, total, got)

    def send(self, x: bool, n: int) -> None:
        space = self._space(x)
        if n and space < n:
            self._arm(x, NOTIFY_READ)
        got = self.pair.side(x).send(chunk(self.sides[x].sent, n))
        assert got == (n if space >= n else 0)
        self._after_write(x, n, got)

    def reserve_commit(self, x: bool, n: int) -> None:
        """Zero-copy write: reserve all free space (always arms), fill n of it."""
        space = self._space(x)
        self._arm(x, NOTIFY_READ)
        got = self.pair.side(x).fill(chunk(self.sides[x].sent, n))
        assert got == min(n, space)
        # Reserving a full ring is a short write: this side would sleep.
        self._after_write(x, 1 if space == 0 else n, got)

    def _after_write(self, x: bool, n: int, got: int) -> None:
        self.sides[x].sent += got
        if got:
            self._moved(x, NOTIFY_WRITE)
        else:
            assert not self.pair.side(x).take_notify()
        if got < n:
            self.sides[x].waiting_space = True

    def read(self, x: bool, n: int) -> None:
        ready = self._ready(x)
        if n and ready < n:
            self._arm(x, NOTIFY_WRITE)
        buf = bytearray(n)
        got = self.pair.side(x).read_into(buf)
        assert got == min(n, ready)
        self._after_read(x, n, bytes(buf[:got]))

    def recv(self, x: bool, n: int) -> None:
        ready = self._ready(x)
        if n and ready < n:
            self._arm(x, NOTIFY_WRITE)
        data = self.pair.side(x).recv(n)
        assert len(data) == (n if ready >= n else 0)
        self._after_read(x, n, data)

    def peek_consume(self, x: bool, n: int) -> None:
        """Zero-copy read: peek everything (always arms), consume n of it."""
        ready = self._ready(x)
        self._arm(x, NOTIFY_WRITE)
        ring = self.pair.side(x)
        data = b"".join(ring.peek())
        assert data == chunk(self.sides[x].received, ready), "peek saw wrong bytes"
        k = min(n, ready)
        assert ring.consume(k) == k
        # Peeking an empty ring is a short read: this side would sleep.
        self._after_read(x, 1 if ready == 0 else k, data[:k])

    def _after_read(self, x: bool, n: int, data: bytes) -> None:
        assert data == chunk(self.sides[x].received, len(data)), "stream corrupted"
        self.sides[x].received += len(data)
        if data:
            self._moved(x, NOTIFY_READ)
        else:
            assert not self.pair.side(x).take_notify()
        if len(data) < n:
            self.sides[x].waiting_data = True

    def data_ready(self, x: bool) -> None:
        self._arm(x, NOTIFY_WRITE)
        assert self.pair.side(x).data_ready() == self._ready(x)

    def buffer_space(self, x: bool) -> None:
        self._arm(x, NOTIFY_READ)
        assert self.pair.side(x).buffer_space() == self._space(x)

    def check_shared_bytes(self) -> None:
        """The notify bytes in the page are exactly what the model says."""
        def bits(s: set[int]) -> int:
            return sum(s)
        assert self.pair.cli_notify & 3 == bits(self.sides[False].requests)
        assert self.pair.srv_notify & 3 == bits(self.sides[True].requests)

    def drain(self) -> None:
        """Read everything outstanding in both directions and check it."""
        for x in (True, False):
            while self._ready(x):
                self.read(x, 1 << 20)
