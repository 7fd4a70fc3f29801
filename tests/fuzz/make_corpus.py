"""Seed corpus for tests/fuzz/ring_fuzz.c.

Writes a few structured inputs (one endpoint, orders, then operations) in
the byte format ring_fuzz.c parses, so the fuzzer starts from deep, valid
states -- wrap-arounds, full and empty rings, EOF, close -- and from each
kind of hostile rewrite.  The committed files in tests/fuzz/corpus/ are its
output::

    python tests/fuzz/make_corpus.py tests/fuzz/corpus

tests/test_fuzz.py also calls :func:`write_seeds` into its temporary corpus,
so the seeds exist even where the binary files were not shipped.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

# Operation codes (ring_fuzz.c: switch (op % 30)).
NOPS = 30
WRITE, READ, SEND, RECV, WRITEV = 0, 2, 4, 5, 6
DATA_READY, BUFFER_SPACE, PEER_LIVE, PEER_EOF, WRITE_EOF = 7, 8, 9, 10, 11
ERROR = 12
PEER_FLAGS = 12 + NOPS * 2  # 12 with bit 6 set (0x42)
CLOSE = 12 + NOPS * 5  # 12 with bit 7 set (0x93)
PRODUCE, CONSUME, POKE_PAGE, POKE_INDEX, POKE_RING = 13, 15, 17, 18, 19
REQUEST, POKE_LIVE, POKE_ORDER, SERVER_ORDERS = 20, 21, 22, 23
PEEK, RING_CONSUME = 24, 26
RESERVE, COMMIT, SPLICE = 27, 28, 29
assert PEER_FLAGS & 0x40 and not PEER_FLAGS & 0x80 and CLOSE & 0x80

NOTIFY_WRITE, NOTIFY_READ, NOTIFY_EOF = 0x1, 0x2, 0x80

# Offsets in page 0.
LEFT_CONS, LEFT_PROD, RIGHT_CONS, RIGHT_PROD = 0, 4, 8, 12
LEFT_ORDER, RIGHT_ORDER = 16, 18


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def length(n: int) -> bytes:
    """get_len() encoding of an exact length."""
    if n < 32:
        return bytes([n << 3])
    if n < 256:
        return bytes([1, n])
    if n < 65536:
        return bytes([2]) + u16(n)
    if n < 1 << 32:
        return bytes([6]) + u32(n)
    return bytes([7]) + struct.pack("<Q", n)


def huge(i: int) -> bytes:
    """get_len() case 5: SIZE_MAX, SIZE_MAX-1, SIZE_MAX/2, INT_MAX, ..."""
    return bytes([5 | (i << 3)])


def order(o: int) -> bytes:
    """order_from(): 8 + b % 14 for b < 0x80, else a raw int16."""
    if 8 <= o <= 21:
        return bytes([o - 8])
    return bytes([0x80]) + u16(o)


def server(rd: int, wr: int, page_seed: int = 0) -> bytes:
    return bytes([0]) + order(rd) + order(wr) + u32(page_seed)


def client_fresh(left: int, right: int, page_seed: int = 0) -> bytes:
    """A client attaching to a freshly initialised server page."""
    return bytes([1, 1]) + u32(page_seed) + order(left) + order(right)


def client_raw(header: bytes, page_seed: int = 0) -> bytes:
    """A client attaching to a page whose 24-byte header is anything."""
    assert len(header) == 24
    return bytes([1, 2]) + u32(page_seed) + header


def write(n: int, src: int = 0, notify: int = 0) -> bytes:
    return bytes([WRITE]) + length(n) + u32(src) + bytes([notify])


def send(n: int, src: int = 0) -> bytes:
    return bytes([SEND]) + length(n) + u32(src) + bytes([0])


def read(n: int, notify: int = 0) -> bytes:
    return bytes([READ]) + length(n) + bytes([notify])


def recv(n: int) -> bytes:
    return bytes([RECV]) + length(n) + bytes([0])


def writev(*lens: bytes) -> bytes:
    out = bytes([WRITEV, len(lens)])
    for i, enc in enumerate(lens):
        out += enc + u32(1000 * i)
    return out + bytes([0])


def ring_consume(mode: int, small: int = 0) -> bytes:
    """vchan_ring_consume: mode 0 all validated, 1 one too many, 2 min(small,
    validated)."""
    return bytes([RING_CONSUME, (small << 3) | (mode << 1)])


def reserve(fill: int, src: int = 0) -> bytes:
    """vchan_ring_reserve, then fill min(fill, reserved) bytes through the pieces."""
    return bytes([RESERVE]) + u16(fill) + u32(src)


def commit(mode: int, small: int = 0, src: int = 0, write: bool = True,
           n: int = 0, notify: int = 0) -> bytes:
    """vchan_ring_commit: mode 0 all validated space, 1 one too many,
    2 min(small, validated), 3 n; the harness writes the bytes first unless
    write is False."""
    k = ((small & 15) << 3) | (mode << 1) | (notify & 1) | (0 if write else 0x80)
    out = bytes([COMMIT, k]) + u32(src)
    return out + u32(n) if mode == 3 else out


def splice_to_fd(max_len: bytes, pipe: bool = False, full: bool = False) -> bytes:
    """vchan_splice_to_fd into an empty (or full) socket or pipe."""
    k = 1 | (2 if pipe else 0) | (12 if full else 0)
    return bytes([SPLICE, k]) + max_len


def splice_from_fd(max_len: bytes, queued: int = 0, pipe: bool = False,
                   eof: bool = False, src: int = 0) -> bytes:
    """vchan_splice_from_fd with `queued` bytes waiting (0: EAGAIN) or at EOF."""
    k = (2 if pipe else 0) | (12 if eof else 0)
    return bytes([SPLICE, k]) + max_len + u16(queued) + u32(src)


def produce(n: int, src: int = 0) -> bytes:
    return bytes([PRODUCE]) + u32(src) + u32(n)


def consume(n: int) -> bytes:
    return bytes([CONSUME]) + u32(n)


def poke_page(offset: int, data: bytes) -> bytes:
    assert 1 <= len(data) <= 16
    return bytes([POKE_PAGE]) + u16(offset) + bytes([len(data) - 1]) + data


def poke_index_small(which: int, delta: int) -> bytes:
    """Index `which` (0 left.cons, 1 left.prod, 2 right.cons, 3 right.prod)
    set to its current value + delta (-128..127)."""
    return bytes([POKE_INDEX, which | 0x10]) + bytes([delta & 0xFF])


def request(bits: int, peer_byte: bool = False, assign: bool = False) -> bytes:
    b = 0x80 | (0x40 if peer_byte else 0) | (0x20 if assign else 0)
    return bytes([REQUEST, b, bits])


def poke_live(value: int, own: bool = False) -> bytes:
    return bytes([POKE_LIVE, 0x80 | (0x40 if own else 0), value])


def poke_order(right: bool, value: int) -> bytes:
    return bytes([POKE_ORDER, 0x80 | (1 if right else 0)]) + u16(value)


def server_orders(rmin: bytes, wmin: bytes) -> bytes:
    return bytes([SERVER_ORDERS]) + rmin + wmin + bytes([0xF6])


def seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}

    # In-page rings: fill, drain, wrap, would-block, EOF, close.
    s["server_inpage_stream"] = (
        server(10, 11)
        + produce(100) + read(50) + read(100) + read(1)
        + write(2048) + write(1) + consume(1000) + write(2000, 7) + consume(5000)
        + bytes([DATA_READY, BUFFER_SPACE, PEER_LIVE])
        + request(NOTIFY_EOF) + bytes([PEER_EOF])
        + bytes([WRITE_EOF, 1]) + write(10) + bytes([BUFFER_SPACE, CLOSE, PEER_LIVE])
        + produce(3) + read(3)
    )
    # Zero-copy reads: peek in two pieces across the wrap, partial consumes,
    # a consume beyond what was validated, flags after a close.
    s["server_peek_consume"] = (
        server(12, 10)
        + bytes([PEEK]) + produce(4000) + bytes([PEEK]) + ring_consume(2, 31)
        + ring_consume(0) + produce(500) + bytes([PEEK]) + ring_consume(1)
        + ring_consume(0) + bytes([PEEK]) + produce(4096) + bytes([PEEK])
        + bytes([PEER_FLAGS]) + request(0x40 | 0x20 | NOTIFY_EOF) + bytes([PEER_FLAGS])
        + bytes([CLOSE, PEER_FLAGS])
    )
    # Zero-copy writes: reserve in two pieces across the wrap, partial and
    # over-long commits, commits of what reserve filled, after EOF.
    s["server_reserve_commit"] = (
        server(10, 12)
        + reserve(100, 1) + commit(2, 15, 2) + consume(15) + reserve(5000, 3)
        + commit(0, src=4, write=False) + reserve(0) + consume(4000) + reserve(50)
        + commit(1) + commit(2, 7, 5) + bytes([BUFFER_SPACE]) + commit(0, src=6, notify=1)
        + request(NOTIFY_WRITE, assign=False) + consume(4096) + reserve(4096, 7)
        + commit(3, n=0xFFFFFFFF) + commit(3, n=4096) + bytes([WRITE_EOF, 0])
        + reserve(1) + commit(0)
    )
    s["client_inpage_reserve_commit"] = (
        client_fresh(11, 10)
        + write(1500) + consume(1500) + reserve(2048, 8) + commit(2, 9) + commit(0, src=9)
        + consume(100) + reserve(100) + commit(0, write=False) + poke_index_small(0, 100)
        + reserve(1) + commit(0)
    )
    # Ring <-> descriptor: socket and pipe, empty, full, end of file.
    s["server_splice"] = (
        server(12, 12)
        + splice_to_fd(length(100)) + produce(4000) + splice_to_fd(length(0))
        + splice_to_fd(length(1000)) + splice_to_fd(huge(0), pipe=True)
        + produce(4096) + splice_to_fd(huge(0), full=True)
        + splice_to_fd(huge(0), pipe=True, full=True) + splice_to_fd(huge(0))
        + splice_from_fd(huge(0)) + splice_from_fd(huge(0), 3000, src=11)
        + splice_from_fd(length(500), 3000, pipe=True, src=12)
        + splice_from_fd(huge(0), 4096, src=13) + consume(4096)
        + splice_from_fd(huge(0), 60000, pipe=True, src=14)
        + splice_from_fd(huge(0), eof=True) + consume(100)
        + splice_from_fd(huge(0), eof=True) + splice_from_fd(huge(0), 10, eof=True, pipe=True)
        + splice_from_fd(huge(0), 5, src=15)
        + bytes([WRITE_EOF, 0]) + splice_from_fd(huge(0), 5)
    )
    s["client_inpage_splice"] = (
        client_fresh(10, 11)
        + produce(2000) + splice_to_fd(huge(0), pipe=True) + splice_from_fd(huge(0), 2000)
        + consume(1000) + splice_from_fd(huge(0), 2000, pipe=True)
        + poke_index_small(3, -5) + splice_to_fd(huge(0))
    )
    # Separate pages, many wrap-arounds with odd sizes.
    body = b""
    for i in range(12):
        body += produce(3000 + 17 * i, i) + read(2900 + i) + write(3001 + i, i) + consume(3100)
    s["server_sep_wrap"] = server(12, 13) + body + bytes([DATA_READY, BUFFER_SPACE])
    # All-or-nothing calls, including too-large ones.
    s["server_send_recv"] = (
        server(12, 12)
        + send(4096) + send(1) + consume(100) + send(100) + send(4097)
        + produce(4000) + recv(4001) + recv(4000) + recv(4097) + recv(0) + send(0)
        + bytes([DATA_READY])
    )
    # Gathered writes: empty, small, over the ring, absurd.
    s["server_writev"] = (
        server(11, 10)
        + writev() + writev(length(0), length(3), length(0))
        + writev(length(700), length(700), length(700))
        + consume(1024) + writev(length(5), huge(3), length(9))
        + consume(1024) + writev(huge(2), huge(2))
    )
    # A client on a fresh server page, both directions, large rings.
    s["client_fresh"] = (
        client_fresh(16, 14)
        + write(70000) + consume(65536) + write(1) + produce(16384) + read(20000)
        + bytes([DATA_READY, BUFFER_SPACE, PEER_LIVE])
        + poke_live(0) + bytes([PEER_LIVE]) + request(NOTIFY_EOF) + bytes([PEER_EOF])
    )
    s["client_largest"] = (
        client_fresh(20, 10)
        + write(1 << 20) + consume(12345) + write(1 << 20) + produce(1024) + read(1024)
    )
    # A client whose page has indices far from zero (starts mid-stream).
    header = u32(0xFFFFFF00) + u32(0xFFFFFF00) + u32(0xFFFFFFF0) + u32(0x10)
    header += u16(11) + u16(10) + bytes([2, 1, NOTIFY_WRITE, 0])
    s["client_midstream_wrap"] = (
        client_raw(header)
        + read(16) + read(16) + read(16) + write(500) + consume(500) + write(2048)
    )
    # Hostile rewrites: each remote error, then sticky.
    s["hostile_index_backward"] = (
        server(12, 12) + produce(100) + read(10) + poke_index_small(1, -50)
        + read(10) + write(10) + bytes([DATA_READY, PEER_LIVE, WRITE_EOF, 0])
    )
    s["hostile_index_forward"] = (
        server(12, 12) + write(100) + poke_index_small(0 + 2, 127) + write(10) + read(1)
    )
    s["hostile_order"] = (
        server(10, 11) + produce(10) + poke_order(False, 12) + read(10) + write(1)
        + poke_order(False, 10) + read(10)
    )
    s["hostile_live"] = server(10, 11) + poke_live(9) + bytes([PEER_LIVE]) + read(1) + write(1)
    s["hostile_page_bytes"] = (
        server(11, 10) + poke_page(0, bytes(range(1, 17))) + poke_page(16, b"\x0b\x00\x0a\x00\x07")
        + read(5) + write(5) + poke_page(4090, b"\xff" * 6)
    )
    s["hostile_ring_data"] = (
        server(12, 10)
        + bytes([POKE_RING, 1]) + u32(4000) + u16(500) + u32(0)   # scribble on our write ring
        + bytes([POKE_RING, 0]) + u32(0) + u16(4096) + u32(77)    # peer fills our read ring
        + produce(4096) + read(4096) + write(1000)
    )
    # Client orders: invalid ones must be refused.
    s["client_bad_orders_same_inpage"] = client_fresh(10, 10)
    s["client_bad_orders_too_big"] = client_fresh(21, 12)
    s["client_bad_orders_raw"] = bytes([1, 1]) + u32(0) + order(-1) + order(0x7FFF)
    # Server order choice for assorted sizes.
    s["server_orders"] = (
        server(10, 11)
        + server_orders(length(0), length(0)) + server_orders(length(1024), length(1 << 20))
        + server_orders(length(2048), length(1025)) + server_orders(length(5000), length(70000))
        + server_orders(length((1 << 20) + 1), length(1)) + server_orders(huge(0), huge(4))
    )
    return s


def write_seeds(directory: str | Path) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sorted(seeds().items()):
        path = out / f"seed_{name}"
        path.write_bytes(data)
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("corpus"))
    for p in write_seeds(target):
        print(p)
