"""Sessions: the C framing (vchan/mux.c) and the session protocol (vchan/mux.py).

The first part drives ``vchan_mux_write`` / ``vchan_mux_peek`` /
``vchan_mux_take`` over a ``ringpair.Pair`` (no event loop): frames round
trip intact, wrap around the end of the ring, are cut to the free space and
to the payload limit, and a hostile peer's bytes never make the reader
return anything but a whole frame that fits, "not yet", or an error.

The second part runs whole sessions over the emulator, a server and a
client in this process: a peer that breaks the protocol (frames written
raw into the client's ring, or a scribbled index) fails every stream of
the session with :class:`vchan.RemoteProtocolError`, and the streams of one
session keep their bytes, their flow control and their half-closes apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import random
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import support
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringpair import Pair
from vchan._native import ffi, lib

import vchan
from vchan import RemoteProtocolError
from vchan.devices import EventChannel
from vchan.mux import Session
from vchan.mux_frames import (
    CLOSE,
    DATA,
    DEFAULT_WINDOW,
    EOF,
    GATHER,
    GOAWAY,
    HEADER,
    HELLO,
    MAX_FRAME,
    OPEN,
    RESET,
    VERSION,
    WINDOW,
)
from vchan.mux_stream import StreamTransport
from vchan.ring import NOTIFY_READ, Ring

FULL: int = lib.VCHAN_MUX_FULL
EFRAME: int = lib.VCHAN_MUX_EFRAME
RING_ERRORS = {lib.VCHAN_EINVAL, lib.VCHAN_EMSGSIZE, lib.VCHAN_ECLOSED, lib.VCHAN_EINDEX,
               lib.VCHAN_EORDER, lib.VCHAN_ELIVE}
HDR = struct.Struct("<BBHIII")          # type, flags, reserved, stream, length, arg
NO_LIMIT = 0xFFFFFFFF

assert HDR.size == HEADER == 16


def header(kind: int, stream: int, length: int, arg: int = 0, *, flags: int = 0,
           reserved: int = 0) -> bytes:
    return HDR.pack(kind, flags, reserved, stream, length, arg)


# -- C framing helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream: int
    arg: int
    payload: bytes


def mux_write(ring: Ring, frame: Frame, *, min_payload: int | None = None,
              max_payload: int = NO_LIMIT) -> int:
    """vchan_mux_write of ``frame`` on ``ring``'s write ring: its return value."""
    data = frame.payload
    return int(lib.vchan_mux_write(
        ring._r, frame.type, frame.flags, frame.stream, frame.arg, data, len(data),
        len(data) if min_payload is None else min_payload, max_payload, ring._notify))


def ring_bounds(ring: Ring) -> tuple[int, int]:
    """Addresses [start, end) of a ring's read buffer."""
    page, rd = ring._buffers[3], ring._buffers[4]
    offset = lib.vchan_ring_offset(ring.read_size.bit_length() - 1)
    base = ffi.cast("uint8_t *", page) + offset if offset >= 0 else ffi.cast("uint8_t *", rd)
    start = int(ffi.cast("uintptr_t", base))
    return start, start + ring.read_size


def interface(page: Any) -> Any:
    """The shared control page as a ``struct vchan_interface *``."""
    return ffi.cast("struct vchan_interface *", ffi.from_buffer(page))


class Reader:
    """vchan_mux_peek / vchan_mux_take on a ring's read side."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.f = ffi.new("struct vchan_mux_frame *")
        self.pa = ffi.new("const uint8_t **")
        self.pb = ffi.new("const uint8_t **")
        self.alen = ffi.new("uint32_t *")
        self.blen = ffi.new("uint32_t *")

    def peek(self, max_payload: int = NO_LIMIT) -> int:
        return int(lib.vchan_mux_peek(self.ring._r, self.f, max_payload, self.pa, self.alen,
                                      self.pb, self.blen))

    def frame_header(self) -> tuple[int, int, int, int, int]:
        f = self.f
        return f.type, f.flags, f.stream, f.length, f.arg

    def pieces(self) -> tuple[bytes, bytes]:
        """The payload as the two pieces peek reported (copied out)."""
        a = ffi.unpack(ffi.cast("char *", self.pa[0]), self.alen[0]) if self.alen[0] else b""
        b = ffi.unpack(ffi.cast("char *", self.pb[0]), self.blen[0]) if self.blen[0] else b""
        return a, b

    def check_pieces_inside_ring(self) -> None:
        """Both payload pieces lie inside the read ring's buffer."""
        lo, hi = ring_bounds(self.ring)
        for ptr, n in ((self.pa[0], self.alen[0]), (self.pb[0], self.blen[0])):
            if n:
                start = int(ffi.cast("uintptr_t", ptr))
                assert lo <= start and start + n <= hi, "payload piece outside the ring"

    def take(self) -> tuple[int, bytes]:
        n = self.f.length
        buf = ffi.new("char[]", max(n, 1))
        rc = lib.vchan_mux_take(self.ring._r, self.f, self.pa[0], self.alen[0], self.pb[0],
                                self.blen[0], buf, self.ring._notify)
        return int(rc), ffi.unpack(buf, n)

    def read(self, max_payload: int = NO_LIMIT) -> Frame | None:
        """One whole frame (peeked, checked, taken), or None if there is none yet."""
        rc = self.peek(max_payload)
        assert rc in (0, 1), rc
        if rc == 0:
            return None
        kind, flags, stream, length, arg = self.frame_header()
        a, b = self.pieces()
        assert len(a) + len(b) == length
        self.check_pieces_inside_ring()
        rc, payload = self.take()
        assert rc == HEADER + length
        assert payload == a + b
        return Frame(kind, flags, stream, arg, payload)


def advance(pair: Pair, n: int) -> None:
    """Move both indexes of the client-to-server ring by n bytes (raw filler)."""
    while n:
        k = pair.client.write(b"\xee" * min(n, pair.client.write_size))
        assert pair.server.read(k) == b"\xee" * k
        n -= k
    pair.client.take_notify()
    pair.server.take_notify()


def payload_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- C framing: round trips ----------------------------------------------------------------


@pytest.mark.parametrize("orders", [(10, 11), (11, 10), (12, 12), (13, 12)])
def test_frame_round_trip_keeps_header_fields_and_payload(orders: tuple[int, int]) -> None:
    pair = Pair(*orders)
    reader = Reader(pair.server)
    frames = [
        Frame(DATA, 0, 1, 0, b"hello"),
        Frame(0xFF, 0xFE, 0xFFFFFFFF, 0xFFFFFFFF, b""),
        Frame(WINDOW, 0, 0x01020304, 0xA0B0C0D0, b""),
        Frame(OPEN, 0x80, 7, 0, b"port-name"),
        Frame(DATA, 1, 2, 3, payload_of(300, 1)),
    ]
    for frame in frames:
        assert reader.read() is None                # finds nothing: asks to hear of writes
        assert mux_write(pair.client, frame) == len(frame.payload)
        assert pair.client.take_notify()
        assert reader.read() == frame
    assert reader.read() is None
    assert pair.server.data_ready() == 0


def test_a_reader_with_frames_to_read_asks_for_no_wake_up() -> None:
    """Only a reader that found nothing (or half a frame) is woken: a busy one
    costs the writer no event per frame."""
    pair = Pair(12, 12)
    reader = Reader(pair.server)
    assert reader.read() is None
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"a")) == 1
    assert pair.client.take_notify()
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"b")) == 1
    assert reader.read() == Frame(DATA, 0, 1, 0, b"a")      # more is there: not armed
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"c")) == 1
    assert not pair.client.take_notify()


def test_header_bytes_are_little_endian_with_zero_reserved() -> None:
    pair = Pair(12, 12)
    assert mux_write(pair.client, Frame(RESET, 0x01, 0x11223344, 0x55667788, b"why")) == 3
    raw = pair.server.read(100)
    assert raw == header(RESET, 0x11223344, 3, 0x55667788, flags=0x01) + b"why"
    assert raw[2:4] == b"\0\0"


def test_a_frame_filling_the_whole_ring_round_trips() -> None:
    pair = Pair(10, 11)
    size = pair.client.write_size
    data = payload_of(size - HEADER, 2)
    advance(pair, 333)                                  # and wrapping, too
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, data)) == len(data)
    assert pair.client.buffer_space() == 0
    frame = Reader(pair.server).read(max_payload=size - HEADER)
    assert frame is not None and frame.payload == data


# -- C framing: wrapping around the end of the ring ------------------------------------------


@pytest.mark.parametrize("orders", [(10, 11), (12, 12)])
@pytest.mark.parametrize("gap", [*range(40), 100, 500])
@pytest.mark.parametrize("length", [0, 1, 23, 200])
def test_frame_wrapping_the_end_of_the_ring_round_trips(
        orders: tuple[int, int], gap: int, length: int) -> None:
    """The write position is ``gap`` bytes before the end of the ring.

    gap < 16 splits the header, 16 lands the payload exactly at the start
    of the ring, 16 < gap < 16 + length splits the payload.
    """
    pair = Pair(*orders)
    size = pair.client.write_size
    advance(pair, size - gap)
    data = payload_of(length, gap)
    frame = Frame(DATA, 3, 42, 0xDEADBEEF, data)
    assert mux_write(pair.client, frame) == length
    reader = Reader(pair.server)
    assert reader.peek() == 1
    assert reader.frame_header() == (DATA, 3, 42, length, 0xDEADBEEF)
    a, b = reader.pieces()
    assert a + b == data
    reader.check_pieces_inside_ring()
    if HEADER < gap < HEADER + length:                  # the payload straddles the end
        assert (len(a), len(b)) == (gap - HEADER, length - (gap - HEADER))
    else:                                               # it is in one piece
        assert (len(a), len(b)) == (length, 0)
    rc, payload = reader.take()
    assert (rc, payload) == (HEADER + length, data)
    assert pair.server.data_ready() == 0


def test_header_split_at_every_byte_across_many_wraps() -> None:
    """Frames of every size from 0 to 40 bytes, back to back, through a 1 KiB ring."""
    pair = Pair(10, 11)
    reader = Reader(pair.server)
    sent = 0
    for i in range(2000):
        length = i % 41
        frame = Frame(DATA, 0, i, i * 7, payload_of(length, i))
        assert mux_write(pair.client, frame) == length
        sent += HEADER + length
        assert reader.read() == frame
    assert sent > 20 * pair.client.write_size


# -- C framing: free space, min_payload, max_payload ---------------------------------------------


def fill_to_free(pair: Pair, free: int) -> None:
    """Leave exactly ``free`` bytes of space in the client's write ring (raw bytes)."""
    used = pair.client.write_size - free
    assert pair.client.write(b"\xaa" * used) == used
    assert pair.client.buffer_space() == free


@pytest.mark.parametrize("free", [0, 1, 15])
def test_full_when_not_even_a_header_fits(free: int) -> None:
    pair = Pair(10, 11)
    fill_to_free(pair, free)
    pair.client.take_notify()
    ready = pair.server.data_ready()
    assert mux_write(pair.client, Frame(EOF, 0, 1, 0, b"")) == FULL
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"x" * 100), min_payload=0) == FULL
    assert pair.server.data_ready() == ready            # nothing was written
    assert not pair.client.take_notify()


def test_full_arms_the_wake_up_on_read() -> None:
    """A writer told FULL sleeps: the reader's next consume must wake it."""
    pair = Pair(10, 11)
    fill_to_free(pair, 10)
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"x" * 10)) == FULL
    assert pair.page[23] & NOTIFY_READ                 # srv_notify: "tell me on read"
    pair.server.take_notify()
    assert pair.server.read(1) == b"\xaa"
    assert pair.server.take_notify(), "a reader freeing space must wake the FULL writer"


@pytest.mark.parametrize(
    ("free", "length", "min_payload", "expected"),
    [
        (16, 0, 0, 0),             # an empty frame fits in a header's room
        (16, 10, 0, 0),            # min_payload 0: a header alone is a frame
        (16, 10, 1, FULL),
        (20, 100, 4, 4),           # cut to the free space, which is min_payload
        (20, 100, 5, FULL),        # min_payload not met
        (20, 3, 100, 3),           # min(len, min_payload) = len, which fits
        (20, 4, 100, 4),
        (20, 5, 100, FULL),        # all 5 bytes needed, 4 free
        (50, 100, 10, 34),         # cut to the free space, above min_payload
        (50, 34, 34, 34),          # exactly fits
        (50, 35, 35, FULL),
        (1024, 2000, 1, 308),      # empty 1 KiB ring: ends at the ring end (324 there)
    ],
)
def test_payload_cut_to_free_space_but_never_below_min_payload(
        free: int, length: int, min_payload: int, expected: int) -> None:
    pair = Pair(10, 11)
    advance(pair, 700)                                  # the frame wraps the ring
    if free < pair.client.write_size:
        fill_to_free(pair, free)
    before = pair.server.data_ready()
    data = payload_of(length, 5)
    got = mux_write(pair.client, Frame(DATA, 0, 9, 0, data), min_payload=min_payload)
    assert got == expected
    if got == FULL:
        assert pair.server.data_ready() == before
        return
    assert pair.server.data_ready() == before + HEADER + got
    pair.server.read(before)
    frame = Reader(pair.server).read()
    assert frame == Frame(DATA, 0, 9, 0, data[:got])


@pytest.mark.parametrize(("length", "max_payload", "expected"),
                         [(1000, 100, 100), (1000, 0, 0), (50, 100, 50), (100, 100, 100)])
def test_max_payload_cuts_the_payload(length: int, max_payload: int, expected: int) -> None:
    pair = Pair(12, 12)
    data = payload_of(length, 6)
    got = mux_write(pair.client, Frame(DATA, 0, 1, 0, data), min_payload=0,
                    max_payload=max_payload)
    assert got == expected
    frame = Reader(pair.server).read(max_payload=max_payload)
    assert frame == Frame(DATA, 0, 1, 0, data[:expected])


def test_a_long_write_becomes_successive_frames() -> None:
    """How the session writes: frames of the largest size that fits, in order."""
    pair = Pair(11, 10)
    data = payload_of(50_000, 7)
    reader = Reader(pair.server)
    done, got = 0, bytearray()
    while done < len(data):
        k = mux_write(pair.client, Frame(DATA, 0, 5, 0, data[done:]), min_payload=64,
                      max_payload=700)
        if k == FULL:
            frame = reader.read()
            assert frame is not None
            got += frame.payload
            continue
        assert 64 <= k <= 700 or k == len(data) - done
        done += k
    while (frame := reader.read()) is not None:
        got += frame.payload
    assert bytes(got) == data


# -- C framing: half frames, impossible frames -------------------------------------------------


@pytest.mark.parametrize("split", [1, 8, 15])
def test_half_a_header_is_not_yet_a_frame(split: int) -> None:
    pair = Pair(12, 12)
    reader = Reader(pair.server)
    raw = header(DATA, 3, 4, 9) + b"abcd"
    assert pair.client.write(raw[:split]) == split
    pair.client.take_notify()
    assert reader.peek() == 0
    assert (reader.alen[0], reader.blen[0]) == (0, 0)
    assert pair.client.write(raw[split:]) == len(raw) - split
    assert pair.client.take_notify(), "peek of half a header must arm the wake-up"
    assert reader.peek() == 1
    assert reader.frame_header() == (DATA, 0, 3, 4, 9)
    assert reader.take() == (HEADER + 4, b"abcd")


@pytest.mark.parametrize("have", [0, 1, 99])
def test_a_header_without_all_its_payload_is_not_yet_a_frame(have: int) -> None:
    pair = Pair(12, 12)
    reader = Reader(pair.server)
    data = payload_of(100, 8)
    assert pair.client.write(header(DATA, 1, 100, 0) + data[:have]) == HEADER + have
    pair.client.take_notify()
    assert reader.peek() == 0
    assert (reader.alen[0], reader.blen[0]) == (0, 0)
    assert pair.server.data_ready() == HEADER + have     # nothing was consumed
    assert pair.client.write(data[have:]) == 100 - have
    assert pair.client.take_notify(), "peek of half a payload must arm the wake-up"
    frame = reader.read()
    assert frame == Frame(DATA, 0, 1, 0, data)


def test_half_a_frame_wrapping_the_ring_completes() -> None:
    pair = Pair(10, 11)
    advance(pair, pair.client.write_size - 10)
    reader = Reader(pair.server)
    raw = header(WINDOW, 2, 30, 77) + payload_of(30, 9)
    for k in range(0, len(raw), 7):
        assert reader.peek() == 0
        assert pair.client.write(raw[k:k + 7]) == len(raw[k:k + 7])
    assert reader.read() == Frame(WINDOW, 0, 2, 77, raw[HEADER:])


@pytest.mark.parametrize(("length", "max_payload"),
                         [(101, 100), (1, 0), (0xFFFFFFFF, MAX_FRAME), (1 << 20, 1008)])
def test_length_above_max_payload_is_eframe(length: int, max_payload: int) -> None:
    """Refused from the header alone, before any payload is there."""
    pair = Pair(10, 11)
    assert pair.client.write(header(DATA, 1, length)) == HEADER
    assert Reader(pair.server).peek(max_payload) == EFRAME
    assert pair.server.data_ready() == HEADER            # nothing consumed


@pytest.mark.parametrize("reserved", [1, 0x100, 0xFFFF, 0x8000])
def test_nonzero_reserved_bytes_are_eframe(reserved: int) -> None:
    pair = Pair(12, 12)
    assert pair.client.write(header(DATA, 1, 0, reserved=reserved)) == HEADER
    assert Reader(pair.server).peek() == EFRAME


def test_flags_are_not_reserved() -> None:
    pair = Pair(12, 12)
    assert pair.client.write(header(DATA, 1, 0, flags=0xFF)) == HEADER
    assert Reader(pair.server).read() == Frame(DATA, 0xFF, 1, 0, b"")


def test_take_copies_the_payload_and_consumes_the_frame() -> None:
    pair = Pair(12, 12)
    data = payload_of(500, 10)
    assert mux_write(pair.client, Frame(OPEN, 0, 1, 0, data)) == 500
    assert mux_write(pair.client, Frame(EOF, 0, 1, 0, b"")) == 0
    reader = Reader(pair.server)
    assert reader.peek() == 1
    assert pair.server.data_ready() == 2 * HEADER + 500   # peek consumed nothing
    rc, payload = reader.take()
    assert (rc, payload) == (HEADER + 500, data)
    assert pair.server.data_ready() == HEADER
    assert reader.peek() == 1 and reader.frame_header() == (EOF, 0, 1, 0, 0)
    assert reader.take() == (HEADER, b"")
    assert pair.server.data_ready() == 0
    assert reader.peek() == 0


def test_take_refuses_pieces_that_do_not_add_up() -> None:
    pair = Pair(12, 12)
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"abc")) == 3
    reader = Reader(pair.server)
    assert reader.peek() == 1
    buf = ffi.new("char[]", 8)
    rc = lib.vchan_mux_take(pair.server._r, reader.f, reader.pa[0], 2, reader.pb[0], 0, buf,
                            pair.server._notify)
    assert rc == lib.VCHAN_EINVAL
    assert pair.server.data_ready() == HEADER + 3        # not consumed


def take_run(reader: Reader, *, credit: int = NO_LIMIT, room: int = 1 << 16,
             max_payload: int = NO_LIMIT) -> tuple[int, bytes]:
    """vchan_mux_take_run on the frame ``reader`` just peeked: (rc, bytes copied)."""
    buf = ffi.new("char[]", room)
    rc = lib.vchan_mux_take_run(reader.ring._r, reader.f, reader.pa[0], reader.alen[0],
                                reader.pb[0], reader.blen[0], max_payload, credit, buf, room,
                                reader.ring._notify)
    return int(rc), ffi.unpack(buf, max(int(rc), 0))


def test_take_run_takes_the_streams_next_frames_and_stops_at_anything_else() -> None:
    pair = Pair(12, 12)
    for frame in (Frame(DATA, 0, 1, 0, b"ab"), Frame(DATA, 0, 1, 0, b""),
                  Frame(DATA, 0, 1, 0, b"cde"), Frame(DATA, 0, 2, 0, b"other stream"),
                  Frame(DATA, 0, 1, 0, b"f"), Frame(EOF, 0, 1, 0, b""),
                  Frame(DATA, 0, 1, 0, b"g"), Frame(DATA, 1, 1, 0, b"flagged")):
        assert mux_write(pair.client, frame) == len(frame.payload)
    reader = Reader(pair.server)
    got = []
    while reader.peek() == 1:
        if reader.f.type != DATA:
            got.append(("ctl", reader.take()[1]))
            continue
        rc, data = take_run(reader)
        assert rc == len(data)
        got.append((reader.f.stream, data))
    assert got == [(1, b"abcde"), (2, b"other stream"), (1, b"f"), ("ctl", b""),
                   (1, b"g"), (1, b"flagged")]
    assert pair.server.data_ready() == 0


def test_take_run_stops_where_the_buffer_or_the_credit_would_be_exceeded() -> None:
    pair = Pair(12, 12)
    for _ in range(6):
        assert mux_write(pair.client, Frame(DATA, 0, 3, 0, b"x" * 100)) == 100
    reader = Reader(pair.server)
    assert reader.peek() == 1
    assert take_run(reader, room=250) == (200, b"x" * 200)       # a third would not fit
    assert reader.peek() == 1
    assert take_run(reader, credit=299) == (200, b"x" * 200)     # nor within the credit
    assert reader.peek() == 1
    assert take_run(reader, room=99) == (lib.VCHAN_EINVAL, b"")  # the first must fit
    assert take_run(reader, credit=99)[0] == lib.VCHAN_EINVAL
    assert pair.server.data_ready() == 2 * (HEADER + 100)        # nothing taken
    assert take_run(reader) == (200, b"x" * 200)
    assert pair.server.data_ready() == 0


def test_take_run_leaves_a_broken_or_half_frame_to_the_next_peek() -> None:
    pair = Pair(12, 12)
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"good")) == 4
    raw = header(DATA, 1, 5000) + b"y" * 10                      # too long, and half there
    assert pair.client.write(raw) == len(raw)
    reader = Reader(pair.server)
    assert reader.peek(max_payload=4096) == 1
    assert take_run(reader, max_payload=4096) == (4, b"good")
    assert reader.peek(max_payload=4096) == EFRAME               # judged by the caller
    assert pair.server.data_ready() == len(raw)


def test_take_run_copies_frames_wrapping_the_end_of_the_ring() -> None:
    pair = Pair(10, 11)
    assert pair.client.write_size == 1024
    advance(pair, 1000)
    data = payload_of(900, 12)
    for i in range(0, 900, 300):
        assert mux_write(pair.client, Frame(DATA, 0, 9, 0, data[i:i + 300])) == 300
    reader = Reader(pair.server)
    assert reader.peek() == 1
    assert take_run(reader) == (900, data)


def direct_run(ring: Ring, stream: int, left: int) -> Any:
    """A ``struct vchan_direct`` for ``left`` bytes of DATA frames of ``stream``
    at the head of ``ring``'s read side (what a session's _announce fills in)."""
    d = ffi.new("struct vchan_direct *")
    d.ring, d.notify, d.max_payload = ring._r, ring._notify, NO_LIMIT
    d.stream, d.flags, d.left, d.offset, d.wake_after = stream, 0, left, 0, 1 << 30
    return d


def direct_take(d: Any, n: int) -> tuple[int, bytes]:
    """vchan_direct_take of ``n`` bytes: (rc, the bytes copied)."""
    buf = ffi.new("char[]", max(n, 1))
    rc = int(lib.vchan_direct_take(d, buf, n))
    return rc, ffi.unpack(buf, max(rc, 0))


def test_direct_take_takes_frames_in_parts_and_consumes_each_with_its_last_byte() -> None:
    pair = Pair(10, 11)
    assert pair.client.write_size == 1024
    advance(pair, 1000)                 # the frames wrap the end of the ring
    data = payload_of(900, 14)
    for i in range(0, 900, 300):
        assert mux_write(pair.client, Frame(DATA, 0, 9, 0, data[i:i + 300])) == 300
    d = direct_run(pair.server, 9, 900)
    got = b""
    for n in (1, 250, 49, 300, 7, 292, 1):
        rc, part = direct_take(d, n)
        assert rc == n
        got += part
        whole = len(got) // 300                 # frames whose last byte is taken
        assert pair.server.data_ready() == (3 - whole) * (HEADER + 300)
        assert (d.left, d.offset) == (900 - len(got), len(got) % 300)
    assert got == data
    assert direct_take(d, 1)[0] == lib.VCHAN_EINVAL     # more than is left


def test_direct_find_looks_in_the_rest_of_the_head_frame_only() -> None:
    pair = Pair(10, 11)
    advance(pair, 1000)                 # the head frame's payload: 8 bytes, then the rest
    first = b"ab\ncd" + b"x" * 25 + b"\n" + b"y" * 20
    assert mux_write(pair.client, Frame(DATA, 0, 9, 0, first)) == len(first)
    assert mux_write(pair.client, Frame(DATA, 0, 9, 0, b"z\n")) == 2
    d = direct_run(pair.server, 9, len(first) + 2)
    nl = ord("\n")
    assert lib.vchan_direct_find(d, nl, 1000) == 3          # in the first piece
    assert lib.vchan_direct_find(d, nl, 1) == 0             # starts beyond the limit
    assert direct_take(d, 3) == (3, b"ab\n")
    assert lib.vchan_direct_find(d, nl, 1000) == 28         # across the end of the ring
    assert lib.vchan_direct_find(d, nl, 27) == 28           # (the limit is where it starts)
    assert lib.vchan_direct_find(d, nl, 26) == 0
    assert direct_take(d, 28)[0] == 28
    assert d.offset == 31
    assert lib.vchan_direct_find(d, nl, 1000) == 0          # not before the next frame
    assert lib.vchan_direct_find(d, ord("y"), 1000) == 1    # (offset past the first piece)
    assert direct_take(d, 20)[0] == 20
    assert lib.vchan_direct_find(d, nl, 1000) == 2


@pytest.mark.parametrize("rewrite", ["shorter", "longer", "stream", "type", "flags"])
def test_direct_take_fails_on_a_frame_rewritten_under_it(rewrite: str) -> None:
    """The peer rewrites the header of a frame the reader is in the middle of."""
    pair = Pair(12, 12)
    at = pair.client._r.wr.own & (pair.client.write_size - 1)
    assert mux_write(pair.client, Frame(DATA, 0, 5, 0, payload_of(100, 15))) == 100
    assert mux_write(pair.client, Frame(DATA, 0, 5, 0, payload_of(100, 16))) == 100
    d = direct_run(pair.server, 5, 200)
    assert direct_take(d, 60) == (60, payload_of(100, 15)[:60])
    wr = pair.client._buffers[5]
    if rewrite == "shorter":
        wr[at + 8:at + 12] = struct.pack("<I", 60)      # no byte left after the offset
    elif rewrite == "longer":
        wr[at + 8:at + 12] = struct.pack("<I", 201)     # beyond what was announced
    elif rewrite == "stream":
        wr[at + 4] = 6
    elif rewrite == "type":
        wr[at] = WINDOW
    else:
        wr[at + 1] = 1
    assert direct_take(d, 10)[0] == EFRAME
    assert lib.vchan_direct_find(d, 0, 1000) == EFRAME


def test_direct_take_takes_nothing_once_the_session_has_ended() -> None:
    pair = Pair(12, 12)
    assert mux_write(pair.client, Frame(DATA, 0, 5, 0, b"abc")) == 3
    d = direct_run(pair.server, 5, 3)
    d.ring = ffi.NULL
    assert direct_take(d, 1)[0] == lib.VCHAN_EINVAL
    assert lib.vchan_direct_find(d, ord("b"), 10) == lib.VCHAN_EINVAL


def test_write_data_never_writes_an_empty_frame() -> None:
    """Every DATA frame carries a byte: a min_payload of 0 counts as 1 (with
    only a header's room left the ring is full, no empty frame goes), and a
    max_payload of 0 is refused (frames of nothing would be no progress)."""
    pair = Pair(10, 11)
    r, notify = pair.client._r, pair.client._notify
    assert pair.client.write_size == 1024
    assert lib.vchan_mux_write_data(r, 1, b"abc", 3, 1, 0, notify) == lib.VCHAN_EINVAL
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, payload_of(1024 - 2 * HEADER))) == \
        1024 - 2 * HEADER                                     # a header's room is left
    assert lib.vchan_mux_write_data(r, 1, b"abc", 3, 0, 100, notify) == FULL
    assert pair.server.data_ready() == 1024 - HEADER          # nothing more was written
    assert lib.vchan_mux_write_data(r, 1, b"", 0, 0, 0, notify) == FULL   # nothing to write


def test_write_data_stops_after_the_frame_the_reader_waits_for() -> None:
    """The reader found the ring empty and asked to be woken: the writer gets
    back control after the first frame, wakes it, then writes the rest."""
    pair = Pair(14, 14)
    reader = Reader(pair.server)
    assert reader.peek() == 0                                   # empty: wake-up armed
    data = payload_of(10_000, 13)
    notify = pair.client._notify
    notify[0] = 0
    k = lib.vchan_mux_write_data(pair.client._r, 4, data, len(data), 100, 1000, notify)
    assert (k, notify[0]) == (1000, 1)
    notify[0] = 0
    k2 = lib.vchan_mux_write_data(pair.client._r, 4, data[k:], len(data) - k, 100, 1000,
                                  notify)
    assert (k2, notify[0]) == (len(data) - k, 0)                # nobody waits: all at once


def test_a_corrupt_producer_index_is_a_ring_error_not_a_frame() -> None:
    pair = Pair(10, 11)
    assert mux_write(pair.client, Frame(DATA, 0, 1, 0, b"abc")) == 3
    interface(pair.page).left.prod = 0x40000000
    assert Reader(pair.server).peek() == lib.VCHAN_EINDEX
    assert Reader(pair.server).peek() == lib.VCHAN_EINDEX     # sticky


# -- C framing: a property test against a model queue ---------------------------------------------

ORDERS = [(10, 11), (11, 10), (12, 12), (13, 12)]


@st.composite
def framing_script(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[Any, ...]]]:
    orders = draw(st.sampled_from(ORDERS))
    write = st.tuples(
        st.just("write"),
        st.integers(0, 3000),                            # payload size
        st.integers(0, 0xFFFFFFFF),                      # stream
        st.integers(0, 0xFFFFFFFF),                      # arg
        st.integers(0, 255),                             # type
        st.one_of(st.none(), st.integers(0, 3000)),      # min_payload (None: all)
        st.one_of(st.just(NO_LIMIT), st.integers(0, 3000)),     # max_payload
    )
    read = st.tuples(st.just("read"), st.booleans())     # take, or pieces + consume
    steps = draw(st.lists(st.one_of(write, read), max_size=60))
    return orders, steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(framing_script())
def test_random_frames_through_small_rings_match_a_model_queue(
        case: tuple[tuple[int, int], list[tuple[Any, ...]]]) -> None:
    (left, right), steps = case
    pair = Pair(left, right)
    size = pair.client.write_size
    reader = Reader(pair.server)
    limit = size - HEADER                                 # as the session reads
    model: deque[Frame] = deque()
    queued = 0                                            # bytes in the ring
    written = 0                                           # bytes ever written
    seq = 0

    def read_one(take: bool) -> None:
        nonlocal queued
        rc = reader.peek(limit)
        if not model:
            assert rc == 0, "read a frame that was never written"
            return
        assert rc == 1, "a whole frame was written but peek says not yet"
        expected = model.popleft()
        a, b = reader.pieces()
        reader.check_pieces_inside_ring()
        got = Frame(reader.f.type, reader.f.flags, reader.f.stream, reader.f.arg, a + b)
        assert got == expected
        if take:
            rc, payload = reader.take()
            assert payload == expected.payload
        else:
            rc = lib.vchan_ring_consume(pair.server._r, HEADER + len(a + b),
                                        pair.server._notify)
        assert rc == HEADER + len(expected.payload)
        queued -= rc

    for step in steps:
        if step[0] == "read":
            read_one(step[1])
            continue
        _, n, stream, arg, kind, min_payload, max_payload = step
        seq += 1
        data = payload_of(n, seq)
        room = size - queued
        need = n if min_payload is None else min(n, min_payload)
        if room < HEADER or room - HEADER < need:
            expected_n = FULL
        else:
            expected_n = min(room - HEADER, n, max_payload)
            # A frame that would wrap ends at the ring's end instead when the
            # piece there holds the header and min(n, min_payload) bytes.
            to_end = min(size - written % size, room)
            if to_end > HEADER and HEADER + expected_n > to_end and to_end - HEADER >= need:
                expected_n = to_end - HEADER
        frame = Frame(kind, 0, stream, arg, data)
        got = mux_write(pair.client, frame, min_payload=min_payload, max_payload=max_payload)
        assert got == expected_n
        if got >= 0:
            model.append(Frame(kind, 0, stream, arg, data[:got]))
            queued += HEADER + got
            written += HEADER + got
        assert pair.server.data_ready() == queued
    while model:
        read_one(True)
    assert reader.peek(limit) == 0
    assert pair.server.data_ready() == 0


# -- C framing: a hostile peer's garbage --------------------------------------------------------


def test_garbage_from_the_peer_never_yields_an_impossible_frame() -> None:
    """Random bytes written raw into the ring, read as frames, for a few seconds at most."""
    rnd = random.Random(20240601)
    allowed = {0, 1, EFRAME} | RING_ERRORS
    frames = eframes = 0
    deadline = time.monotonic() + 4.0
    iterations = 0
    for iteration in itertools.count():
        if iteration >= 10_000 or time.monotonic() > deadline:
            break
        iterations = iteration + 1
        left, right = rnd.choice(ORDERS)
        pair = Pair(left, right)
        size = pair.client.write_size
        reader = Reader(pair.server)
        max_payload = rnd.choice([0, 1, 64, size - HEADER, size, MAX_FRAME, NO_LIMIT])
        advance(pair, rnd.randrange(size))
        for _ in range(rnd.randrange(1, 8)):
            # Garbage, sometimes dressed as plausible headers (small lengths).
            if rnd.random() < 0.5:
                junk = rnd.randbytes(rnd.randrange(1, 200))
            else:
                junk = header(rnd.randrange(256), rnd.randrange(4), rnd.randrange(300),
                              reserved=rnd.choice([0, 0, 0, 1])) + rnd.randbytes(
                                  rnd.randrange(0, 300))
            pair.client.write(junk)
            for _ in range(4):
                rc = reader.peek(max_payload)
                assert rc in allowed, rc
                if rc == 1:
                    frames += 1
                    n = reader.f.length
                    assert n <= max_payload
                    assert reader.alen[0] + reader.blen[0] == n
                    reader.check_pieces_inside_ring()
                    rc, payload = reader.take()
                    assert rc == HEADER + n and len(payload) == n
                elif rc == EFRAME:
                    eframes += 1
                    # A real reader gives up; this one skips a byte to keep fuzzing.
                    assert pair.server.consume(1) == 1
                else:
                    break
    assert iterations >= 500
    assert frames > 100 and eframes > 100


# -- sessions over the emulator ------------------------------------------------------------------

_ports = itertools.count()


@dataclass
class End:
    """One side of a stream: the asyncio streams over it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def transport(self) -> StreamTransport:
        t = self.writer.transport
        assert isinstance(t, StreamTransport)
        return t

    @property
    def session(self) -> Session:
        s = self.transport.get_extra_info("session")
        assert isinstance(s, Session)
        return s


@dataclass
class Conn:
    client: End
    server: End


class Served:
    """An in-process server and client: connections are streams of one session."""

    def __init__(self) -> None:
        self.own = vchan.own_domid()
        self.port = f"mux-{next(_ports)}"
        self.accepted: asyncio.Queue[End] = asyncio.Queue()
        self.server: Any = None
        self.conns: list[Conn] = []

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.put_nowait(End(reader, writer))

    async def start(self, **ring_options: Any) -> None:
        self.server = await vchan.start_server(self._accept, self.port, peers=self.own,
                                               **ring_options)

    async def connect(self) -> Conn:
        reader, writer = await vchan.open_connection(self.own, self.port, timeout=10)
        client = End(reader, writer)
        server = await asyncio.wait_for(self.accepted.get(), 5)
        conn = Conn(client, server)
        self.conns.append(conn)
        if len(self.conns) > 1:
            assert client.session is self.conns[0].client.session, "not one session"
        return conn

    async def close(self) -> None:
        for conn in self.conns:
            for end in (conn.client, conn.server):
                end.transport.abort()
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 10)


async def check_both_ways(conn: Conn, line: bytes, reply: bytes) -> None:
    """``line`` from the client reaches the server, and ``reply`` comes back."""
    conn.client.writer.write(line)
    assert await asyncio.wait_for(conn.server.reader.readline(), 5) == line
    conn.server.writer.write(reply)
    assert await asyncio.wait_for(conn.client.reader.readline(), 5) == reply


@contextlib.asynccontextmanager
async def served(n: int, **ring_options: Any) -> AsyncIterator[Served]:
    """A server with ``n`` working connections of one client session."""
    s = Served()
    await s.start(**ring_options)
    try:
        for i in range(n):
            conn = await s.connect()
            # The stream works both ways before the test does anything to it.
            await check_both_ways(conn, f"ping {i}\n".encode(), f"pong {i}\n".encode())
        yield s
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def hostile(n: int, loop_errors: list[dict[str, Any]]) -> AsyncIterator[Served]:
    """``served(n)`` for a test that breaks the protocol: the loop errors of the
    set-up are forgotten, so the test sees only those it causes."""
    async with served(n) as s:
        loop_errors.clear()
        yield s


class Wakeups:
    """The events ``session`` has sent its peer since this was made (``count``),
    from Python and from its C fast path alike."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._start = int(session._wakes[0])

    @property
    def count(self) -> int:
        return int(self._session._wakes[0]) - self._start


def inject(session: Session, raw: bytes) -> None:
    """Write ``raw`` into ``session``'s write ring as a hostile peer would; wake the peer."""
    ring = session._endpoint.ring
    assert not session.closed
    assert lib.vchan_ring_write(ring._r, raw, len(raw), ring._notify) == len(raw)
    ring._notify[0] = 0
    session._endpoint.notify()


async def push(session: Session, raw: bytes, timeout: float = 10) -> None:
    """Like inject, for more than fits in the ring: as the server makes room."""
    ring = session._endpoint.ring

    async def run() -> None:
        view = memoryview(raw)
        while view and not session.closed:      # (closed: the ring is unmapped)
            k = lib.vchan_ring_write(ring._r, ffi.from_buffer(view), len(view), ring._notify)
            assert k >= 0, k
            view = view[k:]
            ring._notify[0] = 0
            session._endpoint.notify()
            if view:
                await asyncio.sleep(0.001)

    await asyncio.wait_for(run(), timeout)


async def read_outcome(reader: asyncio.StreamReader, timeout: float = 5) -> bytes | BaseException:
    """What reading to the end gives: the bytes, or the exception it raised."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        raise AssertionError("the stream never ended") from None
    except (OSError, RemoteProtocolError) as exc:
        return exc


async def check_session_failed(s: Served, loop_errors: list[dict[str, Any]],
                               match: str, *, victim: str = "server") -> None:
    """Every stream of the session ended: the victim's (the side that read the
    violation) with RemoteProtocolError, the other side's with EOF or a reset."""
    def side(conn: Conn, name: str) -> End:
        return conn.server if name == "server" else conn.client

    other = "client" if victim == "server" else "server"
    failed_session = side(s.conns[0], victim).session
    other_session = side(s.conns[0], other).session
    for conn in s.conns:
        outcome = await read_outcome(side(conn, victim).reader)
        assert isinstance(outcome, RemoteProtocolError), outcome
        assert match in str(outcome)
    for conn in s.conns:
        outcome = await read_outcome(side(conn, other).reader)
        # The peer hears the session end: EOF or reset, never a hang.
        assert outcome == b"" or isinstance(outcome, ConnectionError), outcome
    assert failed_session.closed and not failed_session.streams

    async def other_closed() -> None:
        while not other_session.closed:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(other_closed(), 5)
    reported = [c for c in loop_errors if isinstance(c.get("exception"), RemoteProtocolError)]
    assert len(reported) == 1, [c.get("message") for c in loop_errors]
    assert reported[0].get("session") is failed_session
    assert match in str(reported[0]["exception"])


async def check_violation(violation: tuple[Any, str], loop_errors: list[dict[str, Any]], *,
                          victim: str = "server") -> None:
    """A ``(frames, match)`` of a violation table, written raw into a session of
    three streams by the side that is not the ``victim``: every stream fails
    (:func:`check_session_failed`)."""
    frames, match = violation
    async with hostile(3, loop_errors) as s:
        hostile_end = s.conns[0].client if victim == "server" else s.conns[0].server
        inject(hostile_end.session, frames())
        await check_session_failed(s, loop_errors, match, victim=victim)


def hello_body(window: int = DEFAULT_WINDOW, max_streams: int = 100) -> bytes:
    return struct.pack("<II", window, max_streams)


VIOLATIONS: dict[str, tuple[Any, str]] = {
    # name: (frames to inject, given the stream ids 1..3; what the error says)
    "unknown frame type on the session": (
        lambda: header(99, 0, 0), "unknown frame type 99"),
    "unknown frame type on an open stream": (
        lambda: header(42, 2, 3) + b"abc", "unknown frame type 42"),
    "zero frame type": (lambda: header(0, 1, 0), "unknown frame type 0"),
    "DATA for a stream never opened": (
        lambda: header(DATA, 1000, 5) + b"hello", "stream 1000, never opened"),
    "DATA on stream 0": (lambda: header(DATA, 0, 1) + b"x", "stream 0, never opened"),
    "WINDOW for a stream never opened": (
        lambda: header(WINDOW, 77, 0, 10), "stream 77, never opened"),
    "OPEN reusing an id": (lambda: header(OPEN, 1, 3) + b"abc", "OPEN of stream 1 after 3"),
    "OPEN of the last id again": (lambda: header(OPEN, 3, 0), "OPEN of stream 3 after 3"),
    "OPEN of stream 0": (lambda: header(OPEN, 0, 1) + b"x", "OPEN of stream 0 after 3"),
    "WINDOW update overflowing credit": (
        lambda: header(WINDOW, 2, 0, 0x7FFFFFFF), "window update of 2147483647"),
    "WINDOW update of zero": (lambda: header(WINDOW, 3, 0, 0), "window update of 0"),
    "a second HELLO": (
        lambda: header(HELLO, 0, 8, VERSION) + hello_body(), "a second HELLO"),
    "GOAWAY from a client": (lambda: header(GOAWAY, 0, 0), "GOAWAY from a client"),
    "a frame longer than the ring allows": (
        lambda: header(DATA, 1, MAX_FRAME + 1), "longer than allowed"),
    "a control frame longer than MAX_CONTROL": (
        lambda: header(EOF, 1, 1500) + b"e" * 1500, "frame of 1500 bytes"),
    "nonzero reserved bytes": (
        lambda: header(EOF, 1, 0, reserved=1), "reserved bits"),
}


@pytest.mark.expect_loop_errors
@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_protocol_violation_fails_every_stream_of_the_session(
        name: str, sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    await check_violation(VIOLATIONS[name], loop_errors)


CLIENT_VIOLATIONS: dict[str, tuple[Any, str]] = {
    # frames a server writes that its client must refuse
    "OPEN from a server": (lambda: header(OPEN, 4, 1) + b"x", "OPEN from a server"),
    "unknown frame type": (lambda: header(200, 1, 0), "unknown frame type 200"),
    "DATA for a stream the client never opened": (
        lambda: header(DATA, 4, 2) + b"hi", "DATA for stream 4, never opened"),
    "a second HELLO": (
        lambda: header(HELLO, 0, 8, VERSION) + hello_body(), "a second HELLO"),
    "WINDOW update overflowing credit": (
        lambda: header(WINDOW, 1, 0, 0xFFFFFFFF), "window update of 4294967295"),
}


@pytest.mark.expect_loop_errors
@pytest.mark.parametrize("name", list(CLIENT_VIOLATIONS))
async def test_protocol_violation_by_the_server_fails_every_client_stream(
        name: str, sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    await check_violation(CLIENT_VIOLATIONS[name], loop_errors, victim="client")


@pytest.mark.expect_loop_errors
async def test_data_frames_beyond_the_stream_credit_fail_the_session(
        sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    """Raw DATA frames adding up to one byte more than the window the server gave."""
    async with hostile(3, loop_errors) as s:
        target = s.conns[1]
        target.server.transport.pause_reading()     # no credit comes back
        assert target.server.transport._recv_credit == DEFAULT_WINDOW - len("ping 1\n")
        budget = target.server.transport._recv_credit
        raw = bytearray()
        while budget > 0:
            n = min(MAX_FRAME, (1 << 20) - HEADER, budget)      # what a 1 MiB ring takes
            raw += header(DATA, 2, n) + b"\x55" * n
            budget -= n
        await push(s.conns[0].client.session, bytes(raw))
        # All of that was within the credit: the session still stands.
        await asyncio.sleep(0.05)
        assert not target.server.session.closed and not loop_errors
        inject(s.conns[0].client.session, header(DATA, 2, 1) + b"!")
        await check_session_failed(s, loop_errors, "beyond its credit of 0")


@pytest.mark.expect_loop_errors
async def test_one_frame_longer_than_the_remaining_credit_fails_the_session(
        sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    """The stream's own writes use the credit up; a raw frame then overdraws it."""
    async with hostile(2, loop_errors) as s:
        conn = s.conns[0]
        conn.server.transport.pause_reading()
        conn.client.writer.write(b"\x33" * (DEFAULT_WINDOW - 1000))    # leaves 1,000 - 7

        async def credit_used() -> None:
            while conn.server.transport._recv_credit > 1000:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(credit_used(), 10)
        left = conn.server.transport._recv_credit
        inject(conn.client.session, header(DATA, 1, left + 1) + b"\x44" * (left + 1))
        await check_session_failed(s, loop_errors, f"beyond its credit of {left}")


@pytest.mark.expect_loop_errors
async def test_corrupt_producer_index_fails_every_stream_of_the_session(
        sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    async with hostile(3, loop_errors) as s:
        session = s.conns[0].client.session
        iface = ffi.cast("struct vchan_interface *", session._endpoint.pages[0].pointer)
        shared = iface.left                         # the ring the server reads
        shared.prod = (shared.prod + (1 << 24)) & 0xFFFFFFFF
        session._endpoint.notify()
        await check_session_failed(s, loop_errors, "ring index")


@pytest.mark.expect_loop_errors
async def test_violation_after_a_frame_split_across_two_writes_is_still_seen(
        sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    """Half a hostile frame waits for its other half; then the session fails."""
    async with hostile(2, loop_errors) as s:
        session = s.conns[0].client.session
        raw = header(DATA, 500, 10) + b"0123456789"
        inject(session, raw[:9])
        await asyncio.sleep(0.05)
        assert not s.conns[0].server.session.closed
        inject(session, raw[9:])
        await check_session_failed(s, loop_errors, "stream 500, never opened")


async def test_frames_for_a_stream_already_closed_are_dropped(sim_dir: Path) -> None:
    """Not a violation: the peer may not have heard of the CLOSE yet."""
    async with served(2) as s:
        first, second = s.conns
        first.client.transport.close()
        assert await asyncio.wait_for(first.server.reader.read(), 5) == b""
        session = second.client.session
        inject(session, header(DATA, 1, 4) + b"late" + header(WINDOW, 1, 0, 100)
               + header(EOF, 1, 0) + header(CLOSE, 1, 0) + header(RESET, 1, 3) + b"why")
        second.client.writer.write(b"still here\n")
        assert await asyncio.wait_for(second.server.reader.readline(), 5) == b"still here\n"
        assert not second.server.session.closed


# -- stream semantics over one session ----------------------------------------------------------


async def echo(end: End) -> None:
    """Send back everything read, then EOF."""
    while data := await end.reader.read(65536):
        end.writer.write(data)
        await end.writer.drain()
    end.writer.write_eof()


async def test_three_streams_keep_their_bytes_apart(sim_dir: Path) -> None:
    async with served(3) as s:
        patterns = [payload_of(400_000, 100 + i) for i in range(3)]
        echoes = [asyncio.create_task(echo(c.server)) for c in s.conns]
        rnd = random.Random(11)
        offsets = [0, 0, 0]
        while any(o < len(p) for o, p in zip(offsets, patterns, strict=True)):
            i = rnd.randrange(3)
            n = rnd.choice([1, 100, 4096, 30_000, 100_000])
            chunk = patterns[i][offsets[i]:offsets[i] + n]
            if chunk:
                s.conns[i].client.writer.write(chunk)
                offsets[i] += len(chunk)
            if rnd.random() < 0.3:
                await asyncio.sleep(0)
        for conn in s.conns:
            conn.client.writer.write_eof()
        got = await asyncio.wait_for(
            asyncio.gather(*(c.client.reader.read() for c in s.conns)), 20)
        for i in range(3):
            assert len(got[i]) == len(patterns[i])
            assert got[i] == patterns[i], f"stream {i} got another stream's bytes"
        await asyncio.wait_for(asyncio.gather(*echoes), 5)


async def _digest_reply(end: End) -> None:
    """Read to EOF, then answer with the length and hash of what came."""
    data = await end.reader.read()
    end.writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())
    await end.writer.drain()
    end.writer.close()


def _expected(data: bytes) -> bytes:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


async def test_a_paused_reader_does_not_stop_the_other_streams(sim_dir: Path) -> None:
    async with served(3) as s:
        slow, *others = s.conns
        slow.server.transport.pause_reading()
        big = payload_of(3 * DEFAULT_WINDOW, 20)
        slow.client.writer.write(big)
        slow.client.writer.write_eof()
        # The slow stream's credit runs out; its writer holds the rest.
        await asyncio.sleep(0.1)
        assert slow.client.transport.get_write_buffer_size() > 0

        datas = [payload_of(2 * DEFAULT_WINDOW, 21 + i) for i in range(len(others))]
        tasks = [asyncio.create_task(_digest_reply(c.server)) for c in others]
        for conn, data in zip(others, datas, strict=True):
            conn.client.writer.write(data)
            conn.client.writer.write_eof()
        replies = await asyncio.wait_for(
            asyncio.gather(*(c.client.reader.read() for c in others)), 20)
        assert replies == [_expected(d) for d in datas]
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert slow.client.transport.get_write_buffer_size() > 0, "the paused stream moved"

        slow.server.transport.resume_reading()
        task = asyncio.create_task(_digest_reply(slow.server))
        assert await asyncio.wait_for(slow.client.reader.read(), 20) == _expected(big)
        await asyncio.wait_for(task, 5)


async def test_write_eof_half_closes_one_stream_while_others_go_on(sim_dir: Path) -> None:
    async with served(3) as s:
        half, *others = s.conns
        half.client.writer.write(b"request")
        half.client.writer.write_eof()
        assert await asyncio.wait_for(half.server.reader.read(), 5) == b"request"
        assert half.server.reader.at_eof()
        # The other streams, both ways, after that EOF.
        for i, conn in enumerate(others):
            await check_both_ways(conn, f"more {i}\n".encode(), f"reply {i}\n".encode())
        # The half-closed stream still carries data the other way.
        reply = payload_of(300_000, 30)
        half.server.writer.write(reply)
        half.server.writer.write_eof()
        assert await asyncio.wait_for(half.client.reader.read(), 10) == reply
        # And nobody else saw an EOF.
        for conn in others:
            assert not conn.server.reader.at_eof() and not conn.client.reader.at_eof()
            conn.client.writer.write(b"last\n")
            assert await asyncio.wait_for(conn.server.reader.readline(), 5) == b"last\n"


async def test_close_after_writing_4_mib_delivers_it_all_then_eof(sim_dir: Path) -> None:
    async with served(2) as s:
        conn, other = s.conns
        data = payload_of(4 << 20, 40)
        conn.client.writer.write(data)
        conn.client.writer.close()          # right away: the data is still to be sent
        assert conn.client.transport.get_write_buffer_size() > 0
        got = await asyncio.wait_for(conn.server.reader.read(), 20)
        assert len(got) == len(data)
        assert got == data
        assert conn.server.reader.at_eof()
        await asyncio.wait_for(conn.client.writer.wait_closed(), 5)
        # The session lives on for the other stream.
        other.client.writer.write(b"after\n")
        assert await asyncio.wait_for(other.server.reader.readline(), 5) == b"after\n"


# -- BufferedProtocol streams: the payload goes from the ring into the protocol's buffer ------


class _Collects:
    """What a test protocol received (``data``), and a way to wait for it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()

    async def wait_for_bytes(self, n: int, timeout: float = 10) -> None:
        async def until() -> None:
            while len(self.data) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)


class Sink(_Collects, asyncio.BufferedProtocol):
    """Records what a stream delivers, and whether it was paused at the time."""

    def __init__(self, size: int, pause_on_data: bool) -> None:
        super().__init__()
        self.buf = bytearray(size)
        self.pause_on_data = pause_on_data
        self.paused = False
        self.transport: Any = None
        self.calls: list[tuple[str, bool]] = []     # (callback, paused when called)
        self.made = asyncio.Event()
        self.eof = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.made.set()

    def get_buffer(self, sizehint: int) -> bytearray:
        self.calls.append(("get_buffer", self.paused))
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.calls.append(("buffer_updated", self.paused))
        self.data += self.buf[:nbytes]
        self.changed.set()
        if self.pause_on_data and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof.set()
        return True


@contextlib.asynccontextmanager
async def buffered_stream(size: int, *, pause_on_data: bool = False,
                          ) -> AsyncIterator[tuple[Sink, asyncio.StreamWriter]]:
    """A session stream whose server end is a Sink with a ``size``-byte buffer."""
    own = vchan.own_domid()
    port = f"mux-{next(_ports)}"
    sinks: list[Sink] = []

    def factory() -> Sink:
        sinks.append(Sink(size, pause_on_data))
        return sinks[-1]

    server = await vchan.create_server(factory, port, peers=own)
    try:
        _, writer = await vchan.open_connection(own, port, timeout=10)
        try:
            async def made() -> None:
                while not sinks:
                    await asyncio.sleep(0.005)
                await sinks[0].made.wait()

            await asyncio.wait_for(made(), 5)
            assert isinstance(sinks[0].transport, StreamTransport)
            yield sinks[0], writer
        finally:
            writer.transport.abort()
            for sink in sinks:
                if sink.transport is not None:
                    sink.transport.abort()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def test_buffered_protocol_stream_gets_every_byte_through_a_small_buffer(
        sim_dir: Path) -> None:
    """Frames land in a 777-byte buffer piece by piece, wrapped or not."""
    async with buffered_stream(777) as (sink, writer):
        data = payload_of(3 << 20, 60)
        rnd = random.Random(61)
        i = 0
        while i < len(data):
            n = rnd.choice([1, 500, 777, 5000, 100_000, 300_000])
            writer.write(data[i:i + n])
            i += n
            if rnd.random() < 0.3:
                await asyncio.sleep(0)
        writer.write_eof()
        await asyncio.wait_for(sink.eof.wait(), 20)
        assert len(sink.data) == len(data)
        assert sink.data == data


class Counter(_Collects, asyncio.Protocol):
    """Counts data_received() calls and keeps what they brought."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.types: set[type] = set()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.calls += 1
        self.types.add(type(data))
        self.data += data
        self.changed.set()


async def test_small_writes_reach_a_protocol_in_few_data_received_calls(
        sim_dir: Path) -> None:
    """Small frames that are in the ring together are read in one copy: one
    data_received() of bytes for many writes, in order."""
    own = vchan.own_domid()
    counters: list[Counter] = []

    def factory() -> Counter:
        counters.append(Counter())
        return counters[-1]

    port = f"mux-{next(_ports)}"
    server = await vchan.create_server(factory, port, peers=own)
    try:
        _, writer = await vchan.open_connection(own, port, timeout=10)
        try:
            pieces = [payload_of(random.Random(i).randint(1, 200), i) for i in range(3000)]
            for piece in pieces:            # no await: every one is a frame in the ring
                writer.write(piece)
            expected = b"".join(pieces)
            await asyncio.wait_for(_until(lambda: bool(counters)), 5)
            await counters[0].wait_for_bytes(len(expected))
            assert counters[0].data == expected
            assert counters[0].types == {bytes}
            assert counters[0].calls <= len(pieces) // 20, counters[0].calls
        finally:
            writer.transport.abort()
            for c in counters:
                c.transport.abort()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def _until(cond: Any, step: float = 0.005) -> None:
    while not cond():
        await asyncio.sleep(step)


async def test_small_writes_reach_a_buffered_protocol_in_few_calls(sim_dir: Path) -> None:
    async with buffered_stream(1 << 16) as (sink, writer):
        pieces = [payload_of(random.Random(i).randint(1, 300), i) for i in range(3000)]
        for piece in pieces:
            writer.write(piece)
        expected = b"".join(pieces)
        await sink.wait_for_bytes(len(expected))
        assert sink.data == expected
        updates = sum(1 for name, _ in sink.calls if name == "buffer_updated")
        assert updates <= len(pieces) // 20, updates


async def test_a_large_bytes_write_is_queued_without_a_copy(sim_dir: Path) -> None:
    """What does not fit in the ring waits as the caller's own bytes object; a
    bytearray is copied (the caller may change it after write())."""
    async with served(1) as s:
        conn = s.conns[0]
        transport = conn.client.transport
        conn.server.transport.pause_reading()
        big = payload_of(3 << 20, 90)
        transport.write(big)
        queue = transport._buffer
        assert len(queue) > 0
        assert all(isinstance(c, memoryview) and c.obj is big for c in queue._chunks)
        mutable = bytearray(payload_of(100_000, 91))
        sent = bytes(mutable)
        transport.write(mutable)
        mutable[:] = b"\0" * len(mutable)
        conn.server.transport.resume_reading()
        got = await asyncio.wait_for(conn.server.reader.readexactly(len(big) + len(sent)), 20)
        assert got == big + sent


async def test_a_wake_up_that_fails_ends_the_session_with_the_error(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose wake-up of the peer fails (in the C fast path, then again
    from Python to learn why) fails every stream of the session with that
    error: the data is not left unannounced in the ring."""
    async with served(2) as s:
        session = s.conns[0].client.session
        await asyncio.sleep(0.05)                   # the server sleeps: a write wakes it
        closed = EventChannel()
        closed.close()                              # vk_notify gives -EBADF

        class Failing:
            def notify(self, port: int) -> None:
                raise OSError(errno.EBADF, f"notify port {port}: broken on purpose")

        monkeypatch.setattr(session, "_dev", closed._dev)
        monkeypatch.setattr(session, "_evtchn", Failing())
        s.conns[0].client.writer.write(b"x" * 100)
        assert session.closed
        for conn in s.conns:
            with pytest.raises(OSError, match="broken on purpose"):
                await asyncio.wait_for(conn.client.reader.read(), 5)


async def test_open_and_first_write_wake_the_server_once(sim_dir: Path) -> None:
    """A new stream's OPEN goes with its first write: one wake-up of the server."""
    async with served(1) as s:
        session = s.conns[0].client.session
        await asyncio.sleep(0.05)                   # both sides idle, waiting
        wakes = Wakeups(session)
        _, writer = await vchan.open_connection(s.own, s.port, timeout=10)
        writer.write(b"hello\n")
        server_end = await asyncio.wait_for(s.accepted.get(), 5)
        assert await asyncio.wait_for(server_end.reader.readline(), 5) == b"hello\n"
        await asyncio.sleep(0.01)                   # the deferred wake-up has run
        assert wakes.count == 1
        writer.transport.abort()
        server_end.transport.abort()


async def test_a_connection_through_a_held_session_opens_without_a_loop_turn(
        sim_dir: Path) -> None:
    """Connecting through the session this loop holds is one frame: the
    protocol is made and the transport returned before the loop runs again
    (a callback scheduled before the call has not run yet)."""
    loop = asyncio.get_running_loop()
    async with served(1) as s:
        ran: list[int] = []
        loop.call_soon(ran.append, 1)
        _, writer = await vchan.open_connection(s.own, s.port, timeout=10)
        assert ran == []
        assert writer.transport.get_extra_info("session") is s.conns[0].client.session
        writer.write(b"hello\n")
        server_end = await asyncio.wait_for(s.accepted.get(), 5)
        assert await asyncio.wait_for(server_end.reader.readline(), 5) == b"hello\n"
        writer.transport.abort()
        server_end.transport.abort()


async def test_both_ends_of_a_stream_keep_their_attributes_inline(sim_dir: Path) -> None:
    """A stream's transport looks several of its attributes up on every write
    and every delivery, the server on every accept: kept inline (at most 29
    of them on CPython 3.11), not in a dict of their own."""
    async with served(1) as s:
        assert support.attributes_inline(s.server, "_factory")
        _, writer = await vchan.open_connection(s.own, s.port, timeout=10)
        writer.write(b"hello\n")
        server_end = await asyncio.wait_for(s.accepted.get(), 5)
        assert await asyncio.wait_for(server_end.reader.readline(), 5) == b"hello\n"
        for transport in (writer.transport, server_end.transport):
            assert isinstance(transport, StreamTransport)
            assert support.attributes_inline(transport, "_session")
        writer.transport.abort()
        server_end.transport.abort()


async def test_the_data_sent_with_an_open_reaches_the_server_s_protocol_at_once(
        sim_dir: Path) -> None:
    """The server makes the protocol of a stream while it reads the OPEN, so
    the DATA that came with it is delivered in the same pass: before a
    callback that ``connection_made()`` scheduled (two loop iterations
    sooner than a protocol made from the loop's next turn)."""
    loop = asyncio.get_running_loop()
    own = vchan.own_domid()
    port = f"mux-{next(_ports)}"
    events: list[str] = []
    made: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            events.append("made")
            loop.call_soon(events.append, "next turn")
            assert isinstance(transport, asyncio.Transport)
            made.set_result(transport)

        def data_received(self, data: bytes) -> None:
            events.append(f"data {data!r}")

    server = await vchan.create_server(Server, port, peers=own)
    try:
        _, writer = await vchan.open_connection(own, port, timeout=10)
        writer.write(b"first")
        transport = await asyncio.wait_for(made, 5)
        await asyncio.sleep(0.01)
        assert events == ["made", "data b'first'", "next turn"]
        writer.transport.abort()
        transport.abort()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def test_a_protocol_that_fails_in_connection_made_is_reported_and_reset(
        sim_dir: Path) -> None:
    """A server protocol whose ``connection_made()`` raises: the loop's
    exception handler is told (as for a socket transport) and the client's
    connection ends; the session and the server go on."""
    loop = asyncio.get_running_loop()
    own = vchan.own_domid()
    port = f"mux-{next(_ports)}"
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    fail = [True]

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            if fail[0]:
                raise RuntimeError("boom in connection_made")

        def data_received(self, data: bytes) -> None:
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.write(data)

    server = await vchan.create_server(Server, port, peers=own)
    try:
        reader, writer = await vchan.open_connection(own, port, timeout=10)
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert [c["message"] for c in reported] == \
            ["Fatal error: protocol.connection_made() call failed."]
        assert isinstance(reported[0]["exception"], RuntimeError)
        fail[0] = False
        reader, writer = await vchan.open_connection(own, port, timeout=10)
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"again"
        writer.close()
        await writer.wait_closed()
    finally:
        loop.set_exception_handler(None)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def test_a_stream_that_writes_nothing_still_reaches_the_server(sim_dir: Path) -> None:
    """Server speaks first: the OPEN is not left waiting for a client write."""
    own = vchan.own_domid()
    port = f"mux-{next(_ports)}"

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await vchan.start_server(banner, port, peers=own)
    try:
        for _ in range(3):                          # the first through a new session
            reader, writer = await vchan.open_connection(own, port, timeout=10)
            assert await asyncio.wait_for(reader.readline(), 5) == b"220 ready\n"
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


def test_write_queue_keeps_order_shares_large_bytes_and_gathers_small_writes() -> None:
    from vchan._flow import WriteQueue

    q = WriteQueue()
    big = payload_of(WriteQueue.SHARE_MIN + 100, 1)
    q.extend(b"ab")
    q.extend(bytearray(b"cd"))
    q.extend(memoryview(b"e"))
    q.extend(big)
    q.extend(memoryview(big)[10:])              # the rest of a bytes object: shared too
    q.extend(b"")
    assert len(q) == 5 + len(big) + len(big) - 10
    chunks = list(q._chunks)
    assert bytes(chunks[0]) == b"abcde"         # small writes: one piece
    assert chunks[1].obj is big and chunks[2].obj is big  # type: ignore[union-attr]
    out = bytearray()
    while q:
        head = q.head()
        k = min(len(head), 7777)
        out += bytes(head[:k])
        q.advance(k)
    assert out == b"abcde" + big + big[10:]
    assert len(q) == 0 and not q
    q.extend(bytearray(WriteQueue.TAIL_MAX))
    q.extend(b"x")                              # a full piece is not grown
    assert len(q._chunks) == 2
    q.clear()
    assert not q and len(q._chunks) == 0


# -- small session rings ------------------------------------------------------------------------


async def test_the_eofs_of_many_streams_flushed_at_once_do_not_recurse(sim_dir: Path) -> None:
    """Hundreds of streams each write a little, then write_eof(), in one go: one
    flush of the session sends every stream's data and then its EOF.  Each EOF
    used to kick the session into a flush of its own from within the first, one
    call deeper per stream: a RecursionError and a failed session (the
    benchmark's 10,000 connections on uvloop hit it at 7,754 open streams)."""
    async with served(1) as s:
        conns = [s.conns[0], *[await s.connect() for _ in range(399)]]
        for i, c in enumerate(conns):
            c.client.writer.write(b"%d\n" % i)
            c.client.writer.write_eof()
        for i, c in enumerate(conns):
            assert await asyncio.wait_for(c.server.reader.read(), 10) == b"%d\n" % i


@pytest.mark.parametrize("size", [1024, 2048, 4096])
async def test_writes_larger_than_a_small_session_ring_arrive_both_ways(
        size: int, sim_dir: Path) -> None:
    """In-page and 4 KiB session rings (explicit sizes, or the fallback when grants
    run short) still carry writes of many ring-fulls: no frame asks for more room
    than the ring has (a MIN_CHUNK above ring size - 16 used to stall forever)."""
    async with served(1, read_min=size, write_min=size) as s:
        conn = s.conns[0]
        ring = conn.client.session._endpoint.ring
        assert max(ring.write_size, ring.read_size) <= 4096
        up, down = payload_of(20_000, 80), payload_of(20_000, 81)
        conn.client.writer.write(up)
        conn.server.writer.write(down)
        assert await asyncio.wait_for(conn.server.reader.readexactly(len(up)), 5) == up
        assert await asyncio.wait_for(conn.client.reader.readexactly(len(down)), 5) == down


class _RaisesOnData(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        raise ValueError("x" * 2000)


@pytest.mark.expect_loop_errors
async def test_a_long_reset_reason_does_not_block_a_small_session(
        sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    """A RESET carrying a 2,000-character repr() on a 1 KiB ring is cut to fit: it
    does not sit FULL forever in front of every other stream's frames."""
    async with served(1, read_min=1024, write_min=1024) as s:
        other = s.conns[0]
        assert other.client.session._endpoint.ring.write_size == 1024
        transport, _ = await vchan.create_connection(_RaisesOnData, s.own, s.port, timeout=10)
        try:
            failing = await asyncio.wait_for(s.accepted.get(), 5)
            failing.writer.write(b"trigger")        # the client's protocol raises: RESET
            outcome = await read_outcome(failing.reader, timeout=2)
            assert isinstance(outcome, ConnectionResetError), outcome
            other.client.writer.write(b"other stream\n")
            assert await asyncio.wait_for(other.server.reader.readline(), 2) == \
                b"other stream\n"
        finally:
            transport.abort()
    assert any(isinstance(c.get("exception"), ValueError) for c in loop_errors)


# -- found by these tests and fixed: callbacks that pause or close mid-frame -----------------------


async def test_pause_reading_in_buffer_updated_stops_delivery_mid_frame(sim_dir: Path) -> None:
    async with buffered_stream(100, pause_on_data=True) as (sink, writer):
        data = payload_of(1000, 70)
        writer.write(data)                          # one DATA frame of 1,000 bytes
        await sink.wait_for_bytes(1)
        await asyncio.sleep(0.1)
        delivered_while_paused = [c for c in sink.calls if c[1]]
        assert delivered_while_paused == [], \
            f"{len(delivered_while_paused)} callbacks after pause_reading()"
        assert len(sink.data) == 100
        sink.pause_on_data = False
        sink.paused = False
        sink.transport.resume_reading()
        await sink.wait_for_bytes(len(data))
        assert sink.data == data


async def test_held_bytes_respect_a_pause_made_while_they_are_delivered(
        sim_dir: Path) -> None:
    """Bytes held while paused are handed over a buffer at a time: a protocol
    that pauses again in buffer_updated() gets nothing more until it resumes."""
    async with buffered_stream(100, pause_on_data=True) as (sink, writer):
        data = payload_of(1000, 71)
        writer.write(data)
        await sink.wait_for_bytes(100)
        for step in range(2, 11):
            await asyncio.sleep(0.02)
            assert len(sink.data) == 100 * (step - 1)
            assert not [c for c in sink.calls if c[1]], "a callback while paused"
            sink.paused = False
            sink.transport.resume_reading()
            await sink.wait_for_bytes(100 * step)
        assert sink.data == data


_CLOSE_IN_BUFFER_UPDATED = r"""
import asyncio, faulthandler, sys
import vchan

faulthandler.enable()

class CloseOnData(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf = bytearray(65536)
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()
    def connection_made(self, transport):
        self.transport = transport
    def get_buffer(self, sizehint):
        return self.buf
    def buffer_updated(self, nbytes):
        self.transport.close()              # the last stream of a draining session
    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)

async def main(side):
    own = vchan.own_domid()
    port = "close-in-buffer-updated-" + side
    if side == "server":
        protos = []
        def factory():
            protos.append(CloseOnData())
            return protos[-1]
        server = await vchan.create_server(factory, port, peers=own)
        reader, writer = await vchan.open_connection(own, port, timeout=10)
        writer.write(b"ping")
        while not protos or protos[0].transport is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(protos[0].lost, 5)   # the server got "ping" and closed
        # Again, with the server draining: its session closes with that stream.
        reader, writer = await vchan.open_connection(own, port, timeout=10)
        while len(protos) < 2 or protos[1].transport is None:
            await asyncio.sleep(0.01)
        server.close()                              # GOAWAY
        await asyncio.sleep(0.1)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    else:
        ends = []
        async def handler(reader, writer):
            ends.append(writer)
        server = await vchan.start_server(handler, port, peers=own)
        transport, proto = await vchan.create_connection(CloseOnData, own, port, timeout=10)
        while not ends:
            await asyncio.sleep(0.01)
        server.close()                              # GOAWAY: the client drains
        await asyncio.sleep(0.1)
        ends[0].write(b"response")
        await asyncio.wait_for(proto.lost, 5)
        ends[0].close()
    await asyncio.wait_for(server.wait_closed(), 5)
    print("OK")

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("side", ["server", "client"])
def test_closing_the_last_stream_in_buffer_updated_while_draining_does_not_crash(
        side: str, sim_dir: Path) -> None:
    """Run in a child process: the bug kills the interpreter."""
    proc = subprocess.run([sys.executable, "-c", _CLOSE_IN_BUFFER_UPDATED, side],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ),
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("OK")


# -- a vchan.StreamReader takes its bytes straight from the ring -------------------------------


def _ring_bytes(reader: asyncio.StreamReader) -> int:
    """Bytes ``reader`` was told are in the ring for it."""
    assert isinstance(reader, vchan.StreamReader)
    return reader._ring


def _announced(end: End) -> int:
    """Bytes of ``end``'s stream announced at the head of its session's ring."""
    session = end.session
    return int(session._direct.left) if session._lazy is end.transport else 0


async def test_a_reader_takes_announced_frames_from_the_ring(sim_dir: Path) -> None:
    async with served(1) as s:
        conn = s.conns[0]
        assert isinstance(conn.server.reader, vchan.StreamReader)
        data = payload_of(200_000, 40)
        conn.client.writer.write(data)
        session = conn.server.session
        session._on_event()             # as the wake-up would (it comes next iteration)
        assert _announced(conn.server) > 0
        got = await conn.server.reader.readexactly(len(data))
        assert got == data
        assert session._lazy is None


async def test_announced_frames_a_reader_leaves_are_copied_aside_for_the_others(
        sim_dir: Path) -> None:
    """A stream whose reader does not read holds the ring one loop iteration."""
    async with served(2) as s:
        idle, busy = s.conns
        first = payload_of(50_000, 41)
        idle.client.writer.write(first)
        for i in range(20):
            busy.client.writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(busy.server.reader.readline(), 5) == b"%d\n" % i
        assert idle.server.session._lazy is None
        assert _ring_bytes(idle.server.reader) == 0
        assert await idle.server.reader.readexactly(len(first)) == first


@pytest.mark.parametrize("how", ["abort", "close", "peer-eof"])
async def test_announced_bytes_stay_readable_after_the_stream_ends(
        how: str, sim_dir: Path) -> None:
    async with served(1) as s:
        conn = s.conns[0]
        data = payload_of(70_000, 42)
        conn.client.writer.write(data)
        if how == "peer-eof":
            conn.client.writer.write_eof()
        session = conn.server.session
        session._on_event()
        assert _announced(conn.server) > 0
        if how == "abort":
            conn.server.transport.abort()
        elif how == "close":
            conn.server.transport.close()
        assert _announced(conn.server) == 0 or how == "peer-eof"
        assert await asyncio.wait_for(conn.server.reader.read(), 5) == data
        assert conn.server.reader.at_eof()


async def test_length_prefixed_messages_across_many_ring_wraps(sim_dir: Path) -> None:
    """readexactly() of messages that straddle frames and the end of the ring."""
    async with served(1) as s:
        conn = s.conns[0]
        rnd = random.Random(43)
        messages = [rnd.randbytes(rnd.choice([1, 7, 4000, 7919, 65_537, 200_003]))
                    for _ in range(80)]

        async def send() -> None:
            for m in messages:
                conn.client.writer.write(struct.pack(">I", len(m)) + m)
                await conn.client.writer.drain()

        task = asyncio.create_task(send())
        for m in messages:
            (n,) = struct.unpack(">I", await asyncio.wait_for(
                conn.server.reader.readexactly(4), 10))
            assert await asyncio.wait_for(conn.server.reader.readexactly(n), 10) == m
        await task
        ring = conn.server.session._endpoint.ring
        assert ring._r.rd.own > 3 * ring.read_size, "the ring never wrapped"


@pytest.mark.expect_loop_errors
@pytest.mark.parametrize("where", ["the next frame", "the frame being read"])
async def test_a_peer_rewriting_announced_frames_fails_the_session(
        where: str, sim_dir: Path, loop_errors: list[dict[str, Any]]) -> None:
    async with hostile(2, loop_errors) as s:
        conn, other = s.conns
        client_session, server_session = conn.client.session, conn.server.session
        ring = client_session._endpoint.ring
        sid = conn.client.transport.stream_id
        wr = ring._buffers[5]
        n = GATHER                      # (smaller frames are copied out at once)
        first = ring._r.wr.own & (ring.write_size - 1)
        second = (first + HEADER + n) & (ring.write_size - 1)
        inject(client_session, header(DATA, sid, n) + b"a" * n + header(DATA, sid, n)
               + b"b" * n)
        server_session._on_event()
        assert _announced(conn.server) == 2 * n
        reader = conn.server.reader
        if where == "the next frame":
            wr[second + 4] = other.client.transport.stream_id     # claims another stream
            reading = reader.readexactly(2 * n)
        else:
            assert await reader.read(100) == b"a" * 100           # (the frame, in part)
            assert server_session._direct.offset == 100
            wr[first + 8:first + 12] = struct.pack("<I", 50)      # shorter than taken
            reading = reader.read(100)
        with pytest.raises(RemoteProtocolError, match="rewrote"):
            await reading
        assert server_session.closed
        outcome = await read_outcome(other.server.reader)
        assert isinstance(outcome, RemoteProtocolError), outcome
        reported = [c for c in loop_errors
                    if isinstance(c.get("exception"), RemoteProtocolError)]
        assert len(reported) == 1


async def test_a_session_ending_under_announced_bytes_fails_their_reader(
        sim_dir: Path) -> None:
    async with served(1) as s:
        conn = s.conns[0]
        conn.client.writer.write(payload_of(30_000, 44))
        session = conn.server.session
        session._on_event()
        assert _announced(conn.server) > 0
        session._reset(ConnectionResetError("the peer is gone"))
        assert _ring_bytes(conn.server.reader) == 0    # nothing points into the unmapped ring
        with pytest.raises(ConnectionResetError, match="the peer is gone"):
            await asyncio.wait_for(conn.server.reader.read(), 5)


# -- polling: adaptive by default, busy_poll= fixed, busy_poll=0 never ----------------------


@pytest.mark.parametrize("bad", [-1e-6, 1.5, True, "50us", float("nan")])
async def test_busy_poll_out_of_range_is_refused(bad: Any, sim_dir: Path) -> None:
    own = vchan.own_domid()
    with pytest.raises(ValueError, match="busy_poll must be seconds from 0 to 1"):
        await vchan.open_connection(own, "nowhere", timeout=0, busy_poll=bad)
    with pytest.raises(ValueError, match="busy_poll must be seconds from 0 to 1"):
        await vchan.start_server(lambda r, w: None, "nowhere", peers=own, busy_poll=bad)


async def test_busy_poll_is_for_session_connections(sim_dir: Path) -> None:
    with pytest.raises(ValueError, match="busy_poll is for session connections"):
        await vchan.open_connection(vchan.own_domid(), "nowhere", timeout=0, read_min=4096,
                                    busy_poll=50e-6)


@contextlib.asynccontextmanager
async def _serving(callback: Any, **options: Any) -> AsyncIterator[tuple[Any, str]]:
    """``start_server(callback)`` on a fresh port of our own domain, for
    clients in this process: (server, port); closed after."""
    port = f"mux-{next(_ports)}"
    server = await vchan.start_server(callback, port, peers=vchan.own_domid(), **options)
    try:
        yield server, port
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


@contextlib.asynccontextmanager
async def _echo_counting_wakeups(busy_poll: float | None, client_poll: float | None = None,
                                 ) -> AsyncIterator[tuple[Any, Any, Wakeups]]:
    """A line-echo server (``busy_poll``) and a client (``client_poll``); the
    last counts the client session's wake-ups of the server from the first
    echo on."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
        writer.close()

    async with _serving(echo, busy_poll=busy_poll) as (server, port):
        reader, writer = await vchan.open_connection(vchan.own_domid(), port, timeout=10,
                                                     busy_poll=client_poll)
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
        session = End(reader, writer).session
        wakes = Wakeups(session)
        yield server, End(reader, writer), wakes
        writer.close()
        await writer.wait_closed()


async def _echo_lines(end: End, n: int) -> None:
    for i in range(n):
        end.writer.write(b"%d\n" % i)
        assert await asyncio.wait_for(end.reader.readline(), 5) == b"%d\n" % i


async def test_a_busy_polling_server_spares_the_client_its_notifications(
        sim_dir: Path) -> None:
    async with _echo_counting_wakeups(0.2) as (server, client, wakes):
        await _echo_lines(client, 200)
        # The server looked at its ring the whole time: no wake-up needed.
        assert wakes.count <= 5, wakes.count
        served = [s for s in server._sessions_open if s.peer == vchan.own_domid()]
        assert served and served[0]._polling
        # Polling ends 0.2 s after the last activity; then it sleeps on the
        # event channel again, and still hears the next message.
        await asyncio.sleep(0.4)
        assert not served[0]._polling
        client.writer.write(b"after\n")
        assert await asyncio.wait_for(client.reader.readline(), 5) == b"after\n"
        assert wakes.count >= 1
        client.transport.close()
        await asyncio.sleep(0.05)
        assert served[0]._pollers == {}


async def test_with_busy_poll_0_every_message_wakes_the_server(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the tests above and below: the count they assert is
    low is high here, and neither session ever polls."""
    polls = _count_windows(monkeypatch)
    async with _echo_counting_wakeups(0, client_poll=0) as (server, client, wakes):
        served = _served(server)
        assert not served._polls and not client.session._polls
        await _echo_lines(client, 200)
        assert wakes.count >= 150, wakes.count
        assert polls.get(served, 0) == polls.get(client.session, 0) == 0, polls


def _served(server: Any) -> Session:
    session: Session = next(s for s in server._sessions_open if s.peer == vchan.own_domid())
    return session


def _count_windows(monkeypatch: pytest.MonkeyPatch) -> dict[Session, int]:
    """Poll windows each session opens from now on (it was not polling, then is)."""
    opened: dict[Session, int] = {}
    start = Session._poll_start

    def counting(self: Session) -> None:
        was = self._polling
        start(self)
        if self._polling and not was:
            opened[self] = opened.get(self, 0) + 1

    monkeypatch.setattr(Session, "_poll_start", counting)
    return opened


@pytest.fixture
def long_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adaptive windows of 20 ms, not 50 us (growing to at most 40 ms),
    backing off to at most 8 writes,
    and no sched_yield() while polling: what these tests check is the rule
    (when a window opens, goes on, backs off, comes back).  Both ends share
    one process and loop here, where yielding the CPU helps nobody, and
    under load a yield or a loop iteration alone can take longer than 50 us."""
    monkeypatch.setattr(vchan.mux, "ADAPTIVE_POLL", 20e-3)
    monkeypatch.setattr(vchan.mux, "ADAPTIVE_POLL_MAX", 40e-3)
    monkeypatch.setattr(vchan.mux, "POLL_BACKOFF_MAX", 8)
    monkeypatch.setattr(os, "sched_yield", lambda: None)


async def test_by_default_a_ping_pong_polls_and_spares_the_wakeups(
        sim_dir: Path, long_windows: None) -> None:
    """Adaptive polling (the default): answers that come within the window
    keep both sessions polling, so messages cost no wake-ups."""
    async with _echo_counting_wakeups(None) as (server, client, wakes):
        await _echo_lines(client, 200)
        assert wakes.count <= 100, wakes.count      # (busy_poll=0: >= 150)
        assert _served(server)._backoff <= 2


async def test_adaptive_polling_backs_off_when_nothing_comes_and_returns_when_it_pays(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch, long_windows: None) -> None:
    """Sparse requests: each window the server opens after its answer finds
    nothing, so it opens fewer and fewer (at most one in POLL_BACKOFF_MAX
    writes).  Then back-to-back requests: windows find data again and the
    count of skipped windows halves down to none."""
    polls = _count_windows(monkeypatch)
    async with _echo_counting_wakeups(None) as (server, client, _wakes):
        served = _served(server)
        for i in range(24):         # 1 + 2 + 4 + 8 skipped, and a miss after each
            await asyncio.sleep(0.05)
            client.writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(client.reader.readline(), 5) == b"%d\n" % i
        assert served._backoff == 8      # (the fixture's POLL_BACKOFF_MAX)
        before = polls.get(served, 0)
        for i in range(16):         # 16 writes of the server: at most 2 windows
            await asyncio.sleep(0.05)
            client.writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(client.reader.readline(), 5) == b"%d\n" % i
        assert polls.get(served, 0) - before <= 2, polls.get(served, 0) - before
        await _echo_lines(client, 200)
        assert served._backoff <= 1, served._backoff      # (from 8: windows pay again)
        dense = Wakeups(client.session)
        await _echo_lines(client, 100)
        assert dense.count <= 25, dense.count


async def test_a_window_ends_when_its_answer_comes(sim_dir: Path, long_windows: None) -> None:
    """Found: the window is done at once (the next write opens the next one),
    not spun out to its end, and it is no miss."""
    async with _echo_counting_wakeups(None) as (_server, client, _wakes):
        session = client.session
        for i in range(5):
            client.writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(client.reader.readline(), 5) == b"%d\n" % i
            for _ in range(3):          # (the window's last look: a loop iteration)
                await asyncio.sleep(0)
            assert not session._polling, i      # (a window lasts 20 ms here)
            assert session._poll_hit and session._backoff == 0 and session._skip == 0


async def test_windows_grow_for_answers_that_come_soon_after_and_shrink_for_late_ones(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch, long_windows: None) -> None:
    """An answer that comes after a window ran out, but within
    ADAPTIVE_POLL_MAX of the write, doubles the window (and takes back the
    miss), until windows catch the answers: the client is then not woken.
    Answers later than that halve it again, down to ADAPTIVE_POLL."""
    monkeypatch.setattr(vchan.mux, "ADAPTIVE_POLL", 10e-3)
    monkeypatch.setattr(vchan.mux, "ADAPTIVE_POLL_MAX", 160e-3)

    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            await asyncio.sleep(int(line) / 1000)     # the line: how long to wait (ms)
            writer.write(line)
        writer.close()

    async with _serving(slow_echo) as (server, port):
        reader, writer = await vchan.open_connection(vchan.own_domid(), port, timeout=10)
        client = End(reader, writer)

        async def ask(ms: int) -> None:
            writer.write(b"%d\n" % ms)
            assert await asyncio.wait_for(reader.readline(), 5) == b"%d\n" % ms

        session = client.session
        assert session._window == 10e-3
        for _ in range(6):
            await ask(25)
        assert 25e-3 <= session._window <= 160e-3, session._window
        assert session._backoff <= 1, session._backoff
        woken = Wakeups(_served(server))
        for _ in range(5):
            await ask(25)
        assert woken.count <= 1, woken.count        # (the windows caught them)
        for _ in range(4):
            await ask(200)                          # (beyond ADAPTIVE_POLL_MAX)
        assert session._window == 10e-3, session._window
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("pause", [0, 0.03])
async def test_a_server_s_window_finds_the_next_connection_s_open(
        sim_dir: Path, long_windows: None, pause: float) -> None:
    """A server that speaks first: the window it opens after its greeting
    goes on when the stream closes and finds the next connection's OPEN,
    which is what a server waits for as a client waits for DATA (a window
    that found it is no miss, however long the server then takes to greet:
    ``pause``, longer than the 20 ms window here)."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(pause)
        writer.write(b"hello\n")
        await reader.read()
        writer.close()

    async with _serving(greet) as (server, port):
        for i in range(10 if pause else 30):
            reader, writer = await vchan.open_connection(vchan.own_domid(), port, timeout=10)
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
            writer.close()
            await writer.wait_closed()
            if i == 0:
                woken = Wakeups(End(reader, writer).session)
        assert _served(server)._backoff <= 1, _served(server)._backoff
        assert woken.count <= 5, woken.count


async def test_a_stream_with_busy_poll_0_leaves_its_session_polling_for_the_others(
        sim_dir: Path) -> None:
    async with _echo_counting_wakeups(None) as (_server, client, _):
        session = client.session
        assert session._polls and session._adaptive == 1
        port = client.transport.get_extra_info("peername")[1]
        reader, writer = await vchan.open_connection(vchan.own_domid(), port, busy_poll=0)
        assert End(reader, writer).session is session and session._adaptive == 1
        writer.close()
        await writer.wait_closed()
        client.transport.close()
        await asyncio.sleep(0.05)
        assert session._adaptive == 0 and not session._polls


async def test_a_ping_pong_s_writes_go_at_once_on_both_loops(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small write that is not part of a burst is never corked.  Writes
    80-100 us apart are not a burst (CORK_GAP is 10 us); uvloop's loop.time()
    counts whole milliseconds, and measured with it most of them looked
    like one (each answer waited an extra loop iteration)."""
    corks = [0]
    cork = Session._cork

    def counted(self: Session) -> None:
        corks[0] += 1
        cork(self)

    async with _echo_counting_wakeups(None) as (_, client, _wakes):
        monkeypatch.setattr(Session, "_cork", counted)
        for i in range(200):
            time.sleep(50e-6)           # (blocking: the loop's clock stays put)
            client.writer.write(b"%d\n" % i)
            assert await asyncio.wait_for(client.reader.readline(), 5) == b"%d\n" % i
        assert corks[0] <= 10, corks


async def test_half_a_frame_does_not_keep_a_busy_poller_spinning(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes in the ring that never make a whole frame are not activity."""
    async with _echo_counting_wakeups(0.05) as (server, client, _):
        served = next(s for s in server._sessions_open if s.peer == vchan.own_domid())
        sid = client.transport.stream_id
        frame = header(DATA, sid, 100) + b"x" * 99 + b"\n"
        inject(client.session, frame[:10])                      # half a header...
        await asyncio.sleep(0.01)
        assert served._polling
        await asyncio.sleep(0.3)
        assert not served._polling
        inject(client.session, frame[10:])                      # ...completed at last
        assert await asyncio.wait_for(client.reader.readline(), 5) == frame[HEADER:]


async def test_a_reader_woken_for_bytes_that_vanish_with_the_session_gets_its_error(
        sim_dir: Path) -> None:
    """Woken for announced bytes, the reader runs after its session failed
    (the ring is gone): read() raises the failure, never a false EOF."""
    async with served(1) as s:
        conn = s.conns[0]
        reading = asyncio.ensure_future(conn.server.reader.read(65536))
        await asyncio.sleep(0.01)                   # it waits
        conn.client.writer.write(b"z" * 30_000)
        session = conn.server.session
        session._on_event()                         # announced; the reader runs next
        assert _announced(conn.server) > 0
        session._reset(ConnectionResetError("the peer is gone"))
        with pytest.raises(ConnectionResetError, match="the peer is gone"):
            await asyncio.wait_for(reading, 5)
