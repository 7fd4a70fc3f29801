"""The ring's behaviour at its edges: hostile peers, shutdown, misuse."""

from __future__ import annotations

import mmap

import pytest
from ringpair import Pair
from vchan._native import ffi, lib

from vchan import LocalProtocolError, RemoteProtocolError
from vchan.ring import (
    EINDEX,
    ELIVE,
    EORDER,
    NOTIFY_CLOSED,
    NOTIFY_EOF,
    NOTIFY_HELLO,
    Ring,
    peer_crashed,
    peer_gone_error,
)

LEFT_PROD, RIGHT_CONS, RIGHT_PROD, LEFT_CONS = 4, 8, 12, 0


def _poke32(page: mmap.mmap, off: int, value: int) -> None:
    page[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


def _peek32(page: mmap.mmap, off: int) -> int:
    return int.from_bytes(page[off:off + 4], "little")


def _assert_dead(ring: Ring, code: int) -> None:
    """Once the peer broke the protocol, every call fails the same way."""
    for call in (lambda: ring.read(10), lambda: ring.write(b"x"), ring.data_ready,
                 ring.buffer_space, lambda: ring.send(b"x"), lambda: ring.recv(1),
                 ring.peer_live, ring.write_eof):
        with pytest.raises(RemoteProtocolError) as info:
            call()
        assert info.value.code == code
    assert ring.error is not None and ring.error.code == code
    assert "error=" in repr(ring)


@pytest.mark.parametrize("orders", [(10, 11), (12, 16), (20, 11)])
def test_producer_index_beyond_the_ring_is_an_error(orders: tuple[int, int]) -> None:
    pair = Pair(*orders)
    size = pair.server.read_size
    _poke32(pair.page, LEFT_PROD, size + 1)         # more data than fits
    with pytest.raises(RemoteProtocolError, match="ring index") as info:
        pair.server.read(100)
    assert info.value.code == EINDEX
    _assert_dead(pair.server, EINDEX)


def test_producer_index_far_away_is_an_error() -> None:
    pair = Pair(12, 12)
    _poke32(pair.page, LEFT_PROD, 0x80000000)
    with pytest.raises(RemoteProtocolError):
        pair.server.data_ready()


def test_producer_index_moving_backwards_is_an_error() -> None:
    pair = Pair(12, 12)
    assert pair.client.write(b"a" * 100) == 100
    assert pair.server.data_ready() == 100
    _poke32(pair.page, LEFT_PROD, 50)               # "unwrite" 50 bytes
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.read(10)
    assert info.value.code == EINDEX


def test_consumer_index_ahead_of_producer_is_an_error() -> None:
    pair = Pair(12, 12)
    assert pair.server.write(b"a" * 10) == 10
    _poke32(pair.page, RIGHT_CONS, 20)              # consumed more than written
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.write(b"b")
    assert info.value.code == EINDEX
    _assert_dead(pair.server, EINDEX)


def test_consumer_index_moving_backwards_is_an_error() -> None:
    pair = Pair(12, 12)
    assert pair.server.write(b"a" * 100) == 100
    assert pair.client.read(100) == b"a" * 100
    assert pair.server.buffer_space() == 4096
    _poke32(pair.page, RIGHT_CONS, 40)
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.buffer_space()
    assert info.value.code == EINDEX


def test_client_sees_corrupt_server_indices_too() -> None:
    pair = Pair(10, 11)
    _poke32(pair.page, RIGHT_PROD, 5000)            # client's read ring is 2 KiB
    with pytest.raises(RemoteProtocolError):
        pair.client.read(1)


@pytest.mark.parametrize("offset", [16, 18])
def test_changed_order_is_an_error(offset: int) -> None:
    pair = Pair(12, 13)
    pair.page[offset:offset + 2] = (14).to_bytes(2, "little")
    for ring in (pair.server, pair.client):
        with pytest.raises(RemoteProtocolError, match="ring order") as info:
            ring.write(b"x")
        assert info.value.code == EORDER
        _assert_dead(ring, EORDER)


@pytest.mark.parametrize("value", [3, 0x80, 0xFF])
def test_live_byte_out_of_range_is_an_error(value: int) -> None:
    pair = Pair(10, 11)
    pair.page[20] = value                            # cli_live, read by the server
    with pytest.raises(RemoteProtocolError, match="live byte") as info:
        pair.server.peer_live()
    assert info.value.code == ELIVE
    pair.page[21] = value                            # srv_live, read by the client
    with pytest.raises(RemoteProtocolError, match="live byte"):
        pair.client.peer_live()


def test_live_bytes_through_a_connection() -> None:
    page = mmap.mmap(-1, 4096)
    server = Ring.server(page, 10, 11)
    assert server.peer_live() == 2                   # client not yet connected
    client = Ring.client(page)
    assert server.peer_live() == 1 and client.peer_live() == 1
    client.close()
    assert client.take_notify()
    assert server.peer_live() == 0
    server.close()
    assert page[21] == 0


def test_data_written_before_close_is_still_readable() -> None:
    pair = Pair(10, 11)
    assert pair.client.write(b"last words") == 10
    pair.client.close()
    assert pair.server.peer_live() == 0
    assert pair.server.read(100) == b"last words"


def test_half_close_is_seen_after_the_data() -> None:
    pair = Pair(12, 12)
    assert pair.server.write(b"data") == 4
    assert not pair.client.peer_eof()
    pair.server.write_eof()
    assert pair.server.take_notify()                 # the peer is always woken
    assert pair.client.peer_eof()
    assert pair.client.read(10) == b"data"
    # The other direction still works.
    assert pair.client.write(b"reply") == 5
    assert pair.server.read(10) == b"reply"
    assert not pair.server.peer_eof()


def test_half_close_bit_survives_libxenvchan_notify_handling() -> None:
    """A libxenvchan peer only clears bits 0x1/0x2 of its own notify byte."""
    pair = Pair(10, 11)
    pair.server.write_eof()
    assert pair.page[22] & 0x80                      # in cli_notify
    pair.page[22] &= ~0x1 & 0xFF                     # what libxenvchan's send_notify does
    assert pair.client.peer_eof()


def test_write_after_write_eof_is_a_local_error() -> None:
    pair = Pair(10, 11)
    pair.client.write_eof()
    with pytest.raises(LocalProtocolError, match="closed for writing"):
        pair.client.write(b"x")
    with pytest.raises(LocalProtocolError):
        pair.client.send(b"x")
    with pytest.raises(LocalProtocolError):
        pair.client.writev([b"x"])
    assert pair.client.read(1) == b""                # reading still works


def test_write_after_close_is_a_local_error() -> None:
    pair = Pair(10, 11)
    pair.server.close()
    with pytest.raises(LocalProtocolError):
        pair.server.write(b"x")


def test_send_and_recv_larger_than_the_ring() -> None:
    pair = Pair(10, 11)
    with pytest.raises(ValueError, match="larger than the ring"):
        pair.client.send(b"x" * 1025)               # client writes left = 1 KiB
    with pytest.raises(ValueError, match="larger than the ring"):
        pair.client.recv(2049)


def test_all_or_nothing() -> None:
    pair = Pair(10, 11)
    assert pair.client.send(b"a" * 1000) == 1000
    assert pair.client.send(b"b" * 100) == 0         # only 24 bytes free
    assert pair.server.recv(1001) == b""
    assert pair.server.recv(1000) == b"a" * 1000


def test_stream_write_is_partial() -> None:
    pair = Pair(10, 11)
    assert pair.client.write(b"a" * 5000) == 1024
    assert pair.client.write(b"b") == 0
    assert pair.server.read(5000) == b"a" * 1024


def test_writev_gathers_in_order() -> None:
    pair = Pair(12, 12)
    assert pair.client.writev([b"ab", b"", memoryview(b"cde"), bytearray(b"f")]) == 6
    assert pair.server.read(10) == b"abcdef"
    assert pair.client.writev([b"x" * 3000, b"y" * 3000]) == 4096
    assert pair.server.read(5000) == b"x" * 3000 + b"y" * 1096


def test_buffers_must_be_big_enough() -> None:
    page = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError, match="smaller than a ring of order 13"):
        Ring.server(page, 13, 11, bytearray(4096), None)
    with pytest.raises(ValueError, match="needs its own write buffer"):
        Ring.server(page, 10, 12)
    with pytest.raises(ValueError, match="control page must be at least 4096"):
        Ring.server(bytearray(100), 10, 11)
    with pytest.raises(ValueError, match="same in-page slot"):
        Ring.server(page, 10, 10)
    with pytest.raises(ValueError, match=r"read_order must be an int in 10\.\.20"):
        Ring.server(page, 21, 11)


def test_ring_cannot_be_built_directly() -> None:
    with pytest.raises(TypeError, match=r"Ring\.server"):
        Ring()


def test_read_into_a_memoryview_slice() -> None:
    pair = Pair(10, 11)
    pair.client.write(b"0123456789")
    buf = bytearray(20)
    assert pair.server.read_into(memoryview(buf)[5:9]) == 4
    assert bytes(buf[5:9]) == b"0123"


def test_peek_then_consume_reads_without_copying_twice() -> None:
    pair = Pair(10, 11)
    assert pair.client.write(b"x" * 1000) == 1000
    assert pair.server.read(1000) == b"x" * 1000            # move the index near the end
    assert pair.client.write(b"abcdefghij" * 10) == 100        # wraps the 1 KiB ring
    pieces = pair.server.peek()
    assert len(pieces) == 2 and b"".join(pieces) == b"abcdefghij" * 10
    assert pair.server.consume(30) == 30
    assert b"".join(pair.server.peek()) == (b"abcdefghij" * 10)[30:]
    with pytest.raises(ValueError, match="invalid argument"):
        pair.server.consume(71)                               # more than was peeked
    assert pair.server.consume(70) == 70
    assert pair.server.peek() == []


def test_consume_without_a_peek_is_refused() -> None:
    pair = Pair(10, 11)
    pair.client.write(b"abc")
    with pytest.raises(ValueError):
        pair.server.consume(1)                                # nothing validated yet


def test_extension_bits_tell_close_from_crash() -> None:
    pair = Pair(12, 12)
    assert pair.server.peer_speaks_extensions and pair.client.peer_speaks_extensions
    pair.client.close()
    assert pair.server.peer_live() == 0
    assert pair.server.peer_flags() & NOTIFY_CLOSED          # a graceful close
    crashed = Pair(12, 12)
    crashed.page[20] = 0                                      # what unmap-notify does
    assert crashed.server.peer_live() == 0
    assert not crashed.server.peer_flags() & NOTIFY_CLOSED   # a crash


def test_peer_gone_error_tells_close_from_crash() -> None:
    """The one reading of a peer gone, for Vchan and the transport alike."""
    crash = peer_gone_error(NOTIFY_HELLO, (1, "p"))
    assert isinstance(crash, ConnectionResetError) and "(1, 'p')" in str(crash)
    assert isinstance(peer_gone_error(NOTIFY_HELLO | NOTIFY_CLOSED), BrokenPipeError)
    assert isinstance(peer_gone_error(0), BrokenPipeError)    # plain libxenvchan: a close
    assert "3 bytes of ours" in str(peer_gone_error(NOTIFY_HELLO | NOTIFY_CLOSED, unsent=3))
    assert peer_crashed(NOTIFY_HELLO | NOTIFY_EOF)
    assert not peer_crashed(NOTIFY_HELLO | NOTIFY_CLOSED) and not peer_crashed(0)


def test_plain_libxenvchan_peer_does_not_speak_extensions() -> None:
    page = mmap.mmap(-1, 4096)
    server = Ring.server(page, 10, 11)
    # A libxenvchan client connects with plain stores: cli_live = 1 and
    # srv_notify = WRITE, no extension bits.
    page[20] = 1
    page[23] = 1
    assert server.peer_live() == 1
    assert not server.peer_speaks_extensions


def _commit_quiet(ring: Ring, data: bytes) -> None:
    """Write ``data`` with a quiet commit (published, the peer not woken)."""
    a, alen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
    b, blen = ffi.new("uint8_t **"), ffi.new("uint32_t *")
    assert lib.vchan_ring_reserve(ring._r, a, alen, b, blen) >= len(data)
    ffi.memmove(a[0], data, len(data))
    assert lib.vchan_ring_commit_quiet(ring._r, len(data)) == len(data)


def test_publish_wakes_for_quiet_commits_only_until_an_ordinary_one_covers_them() -> None:
    """``vchan_ring_publish`` (a session's deferred wake-up) sends an event for
    quiet commits the peer has not been woken for, and none once an ordinary
    commit has woken it (or found it awake): a reader that took everything
    and went back to sleep is not woken again for nothing."""
    pair = Pair(12, 12)
    server, client = pair.server, pair.client
    assert client.read(10) == b""                   # waits: asks to be told on write
    _commit_quiet(server, b"abc")
    assert not server.take_notify()
    assert lib.vchan_ring_publish(server._r, server._notify) == 0
    assert server.take_notify()                      # the quiet bytes need the event
    assert client.read(10) == b"abc"
    assert client.read(10) == b""                   # asleep again

    _commit_quiet(server, b"def")                   # quiet, then an ordinary write ...
    assert server.write(b"ghi") == 3
    assert server.take_notify()                      # ... wakes the reader for both
    assert client.read(10) == b"defghi"
    assert client.read(10) == b""                   # asleep again, nothing new
    assert lib.vchan_ring_publish(server._r, server._notify) == 0
    assert not server.take_notify()                  # nothing to wake it for


def test_publish_wakes_nobody_for_quiet_commits_the_peer_took_already() -> None:
    """A peer that looked without being woken (a session polling its ring)
    and took the quiet bytes is not woken for them; its request to be told
    on write stays for the next ordinary write."""
    pair = Pair(12, 12)
    server, client = pair.server, pair.client
    assert client.read(10) == b""                   # asks to be told on write
    _commit_quiet(server, b"abc")
    assert client.read(10) == b"abc"                # took them unwoken (and asks again)
    assert lib.vchan_ring_publish(server._r, server._notify) == 0
    assert not server.take_notify()                  # nothing new to wake it for
    assert server.write(b"d") == 1
    assert server.take_notify()                      # the next ordinary write does
    assert client.read(10) == b"d"
