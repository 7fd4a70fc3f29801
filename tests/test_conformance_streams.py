"""Stream conformance: the streams API over vchan, with TCP and Unix controls.

The streams-level part of the conformance suite (``test_conformance.py`` is
the transport-level part).  Each test states one behaviour of asyncio
streams and checks it over three kinds of connection, in one process:

* ``vchan``: :func:`vchan.start_server` / :func:`vchan.open_connection`, so
  a :class:`vchan.StreamReader` over a stream of a session (many connections
  on one 1 MiB ring, ``vchan.mux``): the reader takes its bytes straight
  from the ring, or from the pieces the session copied aside when it did not
  take them within a loop iteration, and small writes are corked (merged
  until the end of the loop iteration);
* ``tcp`` and ``unix``: :func:`asyncio.start_server` /
  :func:`asyncio.open_connection` and their Unix-socket twins, the controls:
  they show each test says what asyncio's own streams do.

Every test runs on both loops (conftest.py).  Every wait is bounded, every
byte is checked, exceptions are checked by type (and message where asyncio
fixes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from test_conformance import KINDS, _payload

import vchan
from vchan.errors import LocalProtocolError
from vchan.mux_stream import StreamTransport
from vchan.pool import close_sessions

T = TypeVar("T")
WAIT = 20.0                         # bound on any single wait, seconds
_ports = itertools.count()


async def bounded(aw: Awaitable[T], timeout: float = WAIT) -> T:
    """``aw``, or TimeoutError: no test waits without bound."""
    return await asyncio.wait_for(aw, timeout)


@dataclass
class Pair:
    """Both ends of one connection: the client's reader and writer, and the
    server's (``peer_reader``, ``peer_writer``)."""

    kind: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_reader: asyncio.StreamReader
    peer_writer: asyncio.StreamWriter


class OpenPair(Protocol):
    kind: str

    def __call__(self, limit: int = ..., peer_limit: int = ...) -> Awaitable[Pair]: ...


@pytest.fixture(params=KINDS)
async def streams(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenPair]:
    """``await streams(limit=, peer_limit=)``: a connected Pair of the kind
    (the readers' limits: the client's, the server's)."""
    kind: str = request.param
    if kind == "vchan":
        request.getfixturevalue("sim_dir")
    servers: list[Any] = []
    pairs: list[Pair] = []

    async def open_pair(limit: int = 2**16, peer_limit: int = 2**16) -> Pair:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            loop.create_future()

        def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not accepted.done():
                accepted.set_result((r, w))

        n = next(_ports)
        server: Any
        if kind == "vchan":
            own = vchan.own_domid()
            port = f"conformance-streams-{n}"
            server = await vchan.start_server(on_client, port, peers=own, limit=peer_limit)
            servers.append(server)
            reader, writer = await vchan.open_connection(own, port, limit=limit, timeout=10)
        elif kind == "tcp":
            server = await asyncio.start_server(on_client, "127.0.0.1", 0, limit=peer_limit)
            servers.append(server)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.sockets[0].getsockname()[1], limit=limit)
        else:
            path = str(tmp_path / f"streams-{n}.sock")
            server = await asyncio.start_unix_server(on_client, path, limit=peer_limit)
            servers.append(server)
            reader, writer = await asyncio.open_unix_connection(path, limit=limit)
        peer_reader, peer_writer = await bounded(accepted, 10)
        pair = Pair(kind, reader, writer, peer_reader, peer_writer)
        pairs.append(pair)
        if kind == "vchan":
            # What this suite is about: vchan's reader, over a session stream.
            for r, w in ((reader, writer), (peer_reader, peer_writer)):
                assert isinstance(r, vchan.StreamReader)
                assert isinstance(w.transport, StreamTransport)
        return pair

    open_pair.kind = kind  # type: ignore[attr-defined]
    yield open_pair  # type: ignore[misc]
    for pair in pairs:
        for w in (pair.writer, pair.peer_writer):
            if not w.transport.is_closing():
                w.transport.abort()
        for w in (pair.writer, pair.peer_writer):
            with contextlib.suppress(ConnectionError):
                await bounded(w.wait_closed(), 10)
    for server in servers:
        server.close()
        await bounded(server.wait_closed(), 10)
    if kind == "vchan":
        await close_sessions()


def small_writes(writer: asyncio.StreamWriter, n: int, seed: int, *,
                 largest: int = 100) -> bytes:
    """``n`` writes of 1..``largest`` bytes in this loop iteration (vchan
    corks all but the first: one merged batch), some through writelines();
    what was written."""
    rnd = random.Random(seed)
    data = _payload(n * largest, seed)
    i = 0
    for _ in range(n):
        k = rnd.randint(1, largest)
        if rnd.random() < 0.1:
            writer.writelines([data[i:i + k // 2], memoryview(data)[i + k // 2:i + k]])
        else:
            writer.write(data[i:i + k])
        i += k
    return data[:i]


async def read_outcome(aw: Awaitable[bytes]) -> bytes | BaseException:
    """What a read returns or raises (bounded: never a hang)."""
    try:
        return await bounded(aw)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return exc


# -- close, write_eof, abort in the middle of a coalesced batch ------------------------------


@pytest.mark.parametrize("end", ["close", "write_eof"])
async def test_small_writes_then_close_or_eof_arrive_whole_then_eof(
        streams: OpenPair, end: str) -> None:
    """Many small writes and close()/write_eof() in one loop iteration: the
    peer, already waiting in read(), gets exactly those bytes, then EOF;
    after write_eof() the other direction still works."""
    p = await streams()
    reading = asyncio.ensure_future(p.peer_reader.read())
    await asyncio.sleep(0.01)                   # the peer waits in read()
    sent = small_writes(p.writer, 3000, seed=1)
    getattr(p.writer, end)()
    got = await bounded(reading)
    assert len(got) == len(sent)
    assert got == sent
    assert p.peer_reader.at_eof()
    assert await bounded(p.peer_reader.read()) == b""
    assert await bounded(p.peer_reader.readline()) == b""
    if end == "write_eof":
        with pytest.raises(RuntimeError, match=r"write\(\) after write_eof\(\)"):
            p.writer.write(b"more")
        # Half-closed: the peer still answers, and its close ends ours.
        p.peer_writer.write(b"reply")
        p.peer_writer.close()
        assert await bounded(p.reader.read()) == b"reply"
        assert p.reader.at_eof()
        p.writer.close()
    await bounded(p.writer.wait_closed())


async def test_write_after_close_never_disturbs_the_bytes_before_it(streams: OpenPair) -> None:
    """A write() right after close() (a batch of small writes still queued)
    cannot disturb what was written before: the peer gets those bytes whole,
    then EOF.  The late write itself: vchan refuses it (LocalProtocolError, a
    RuntimeError: documented in vchan.errors); asyncio's transports accept it
    silently and send it when their buffer was not empty yet (a Unix socket
    here: each small write is its own skb), else drop it."""
    p = await streams()
    sent = small_writes(p.writer, 300, seed=2)
    p.writer.close()
    if streams.kind == "vchan":
        with pytest.raises(LocalProtocolError, match="after close"):
            p.writer.write(b"late")
        late = b""
    else:
        p.writer.write(b"late")
        late = b"late"
    got = await bounded(p.peer_reader.read())
    assert got[:len(sent)] == sent
    assert got[len(sent):] in (b"", late)
    assert p.peer_reader.at_eof()
    await bounded(p.writer.wait_closed())


async def test_burst_then_close_and_wait_closed_loses_nothing(streams: OpenPair) -> None:
    """5,000 tiny writes, close(), wait_closed(): all of it reaches a peer
    that only starts reading later (the bytes sit in the ring, announced and
    copied aside, or in the socket buffers), then EOF."""
    p = await streams()

    async def late_reader() -> bytes:
        await asyncio.sleep(0.05)
        return await p.peer_reader.read()

    reading = asyncio.ensure_future(late_reader())
    sent = small_writes(p.writer, 5000, seed=3, largest=64)
    p.writer.close()
    await bounded(p.writer.wait_closed())
    got = await bounded(reading)
    assert len(got) == len(sent)
    assert got == sent
    assert p.peer_reader.at_eof()


@pytest.mark.parametrize("peer", ["waiting", "late"])
async def test_abort_in_a_coalesced_batch_gives_the_peer_a_prefix_then_eof_or_reset(
        streams: OpenPair, peer: str) -> None:
    """abort() right after a batch of small writes: the peer reads some
    prefix of the bytes (none may be made up or reordered) and then EOF or
    ConnectionResetError, whether it was waiting in readexactly() or only
    reads later; the aborting side's own reader sees EOF."""
    p = await streams()
    want = 10**6
    if peer == "waiting":
        reading = asyncio.ensure_future(p.peer_reader.readexactly(want))
        await asyncio.sleep(0.01)
    sent = small_writes(p.writer, 2000, seed=4)
    assert len(sent) < want
    p.writer.transport.abort()
    if peer == "late":
        await asyncio.sleep(0.05)
        reading = asyncio.ensure_future(p.peer_reader.readexactly(want))
    got = await read_outcome(reading)
    if isinstance(got, asyncio.IncompleteReadError):
        assert got.expected == want
        assert sent.startswith(got.partial)
        assert p.peer_reader.at_eof()
        assert await bounded(p.peer_reader.read()) == b""
    else:
        assert isinstance(got, ConnectionResetError), repr(got)
        with pytest.raises(ConnectionResetError):
            await bounded(p.peer_reader.read())
    assert await bounded(p.reader.read()) == b""


async def test_peer_abort_in_a_coalesced_batch_ends_the_writer_without_a_hang(
        streams: OpenPair) -> None:
    """The peer aborts in the same loop iteration as our batch of small
    writes: our reader sees EOF or ConnectionResetError, drain() and
    wait_closed() return or raise a ConnectionError -- none of them hangs.
    (Seen: vchan gives EOF, TCP and Unix ConnectionResetError: the peer
    dropped bytes it had not read.)"""
    p = await streams()
    small_writes(p.writer, 2000, seed=5)
    p.peer_writer.transport.abort()
    got = await read_outcome(p.reader.read())
    assert got == b"" or isinstance(got, ConnectionResetError), repr(got)
    for wait in (p.writer.drain, p.writer.wait_closed):
        with contextlib.suppress(ConnectionError):
            await bounded(wait())


async def test_peer_abort_while_we_wait_in_drain(streams: OpenPair) -> None:
    """A writer blocked in drain() (the peer does not read) when the peer
    aborts: that drain() returns or raises a ConnectionError, and the next
    drain() raises a ConnectionError -- within a bounded time, never a hang.
    (Seen: TCP and Unix raise ConnectionResetError both times, vchan
    BrokenPipeError "vchan peer closed with N bytes of ours not yet sent".)"""
    p = await streams(peer_limit=2**14)
    block = b"d" * 65536
    for _ in range(2000):
        p.writer.write(block)
        draining = asyncio.ensure_future(p.writer.drain())
        done, _ = await asyncio.wait({draining}, timeout=0.1)
        if not done:
            break
        draining.result()
    else:
        pytest.fail("drain() never blocked on a peer that does not read")
    p.peer_writer.transport.abort()
    with contextlib.suppress(ConnectionError):
        await bounded(draining)
    with pytest.raises(ConnectionError):
        await bounded(p.writer.drain())


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_closing_our_end_keeps_what_our_reader_already_has(
        streams: OpenPair, how: str) -> None:
    """We close() or abort() our end while the peer's bytes are arriving
    (vchan: some announced to our reader, still in the ring): our reader
    then returns a prefix of them, none made up or reordered, then EOF."""
    for iterations in range(6):                 # how far the bytes got
        p = await streams()
        data = _payload(2_000_000, seed=iterations)
        p.writer.write(data)
        for _ in range(iterations):
            await asyncio.sleep(0)
        getattr(p.peer_writer.transport, how)()
        got = await read_outcome(p.peer_reader.read())
        assert isinstance(got, bytes), repr(got)
        assert data.startswith(got), f"after {iterations} iterations"
        assert p.peer_reader.at_eof()
        assert await bounded(p.peer_reader.read()) == b""


# -- small writes under flow control, ping-pong ------------------------------------------------


async def test_small_writes_with_drain_to_a_slow_reader_arrive_in_order(
        streams: OpenPair) -> None:
    """20,000 small writes (drain() every 50) to a reader with a 16 KiB limit
    that reads pieces of awkward sizes and sometimes sleeps: the writer is
    held back and let go again many times (vchan: merged batches, a full
    ring), and every byte arrives in order."""
    p = await streams(peer_limit=2**14)
    rnd = random.Random(11)
    data = _payload(2_000_000, seed=11)

    async def send() -> int:
        i = 0
        for k in range(20_000):
            n = rnd.randint(1, 150)
            p.writer.write(data[i:i + n])
            i += n
            if k % 50 == 49:
                await bounded(p.writer.drain())
        p.writer.write_eof()
        return i

    sending = asyncio.ensure_future(send())
    got = bytearray()
    r = p.peer_reader
    while True:
        try:
            got += await bounded(r.readexactly(rnd.choice([1, 10, 999, 4096, 5003, 40_000])))
        except asyncio.IncompleteReadError as exc:
            got += exc.partial
            break
        if rnd.random() < 0.05:
            await asyncio.sleep(0.002)
    total = await bounded(sending)
    assert len(got) == total
    assert got == data[:total]


async def test_ping_pong_of_messages_written_in_parts(streams: OpenPair) -> None:
    """Request and answer, each written as three small writes in one
    iteration: no write waits for a later one to be sent (vchan: the batch
    is flushed at the end of the iteration), 300 round trips in order."""
    p = await streams()

    async def serve() -> int:
        count = 0
        while line := await p.peer_reader.readline():
            assert line == b"ping %d\n" % count
            p.peer_writer.write(b"pong ")
            p.peer_writer.write(b"%d" % count)
            p.peer_writer.write(b"\n")
            count += 1
        p.peer_writer.close()
        return count

    serving = asyncio.ensure_future(serve())
    for i in range(300):
        p.writer.write(b"ping ")
        p.writer.write(b"%d" % i)
        p.writer.write(b"\n")
        assert await bounded(p.reader.readline(), 5) == b"pong %d\n" % i
    p.writer.write_eof()
    assert await bounded(serving) == 300
    assert await bounded(p.reader.read()) == b""


async def test_a_second_waiting_read_is_refused(streams: OpenPair) -> None:
    """While one coroutine waits for data, another read raises RuntimeError
    (asyncio's message); the first one gets the data."""
    p = await streams()
    r = p.peer_reader
    first = asyncio.ensure_future(r.read(100))
    await asyncio.sleep(0.01)
    for call in (r.readexactly(1), r.readline(), r.read(5)):
        with pytest.raises(RuntimeError,
                           match="called while another coroutine is already waiting"):
            await bounded(call)
    p.writer.write(b"data")
    assert await bounded(first) == b"data"


# -- readexactly: messages straddling pieces and the ring's wrap ------------------------------


# The session ring is 1 MiB: > 3 MiB in messages of awkward sizes wraps it
# several times, every message straddles the reader's pieces (64 KiB frames
# and runs of small ones), one is larger than the ring itself.
MESSAGE_SIZES = [1, 7919, 65537, 200003] * 6 + [1_500_007] + [200003, 65537, 7919, 1] * 6


@pytest.mark.parametrize("reader", ["keeping_up", "sleeping"])
async def test_readexactly_length_prefixed_messages_across_the_ring_wrap(
        streams: OpenPair, reader: str) -> None:
    """Length-prefixed messages read with readexactly() come back whole and
    in order, with the reader keeping up or sleeping between reads (its
    bytes then wait, copied aside, behind what it has not taken)."""
    p = await streams()
    messages = [_payload(n, seed=100 + i) for i, n in enumerate(MESSAGE_SIZES)]
    assert sum(MESSAGE_SIZES) > 3 * 2**20

    async def send() -> None:
        w = p.writer
        for i, m in enumerate(messages):
            header = struct.pack(">I", len(m))
            if i % 3 == 0:
                w.write(header + m)
            elif i % 3 == 1:
                w.write(header)                 # header and body: two writes
                w.write(m)
            else:
                cut = len(m) // 2               # the body in two iterations
                w.write(header)
                w.write(m[:cut])
                await asyncio.sleep(0)
                w.write(m[cut:])
            await w.drain()
        w.write_eof()

    sending = asyncio.ensure_future(send())
    r = p.peer_reader
    for i, m in enumerate(messages):
        if reader == "sleeping":
            await asyncio.sleep(0.003)
        (n,) = struct.unpack(">I", await bounded(r.readexactly(4)))
        assert n == len(m), f"message {i}"
        if reader == "sleeping" and i % 2:
            await asyncio.sleep(0.003)          # between a header and its body too
        body = await bounded(r.readexactly(n))
        assert body == m, f"message {i} ({n} bytes) differs"
    await bounded(sending)
    with pytest.raises(asyncio.IncompleteReadError) as exc:
        await bounded(r.readexactly(4))
    assert (exc.value.partial, exc.value.expected) == (b"", 4)
    assert r.at_eof()


@pytest.mark.parametrize("then", ["readexactly", "read"])
@pytest.mark.parametrize("limit", [16 * 1024, 2**16])
async def test_a_cancelled_large_readexactly_loses_nothing(
        streams: OpenPair, then: str, limit: int) -> None:
    """readexactly(n) of a large n, cancelled while its bytes come (part
    of them taken, the rest still to be sent): every byte is there for the
    next calls, in order, whether those read the message again or read();
    the reader's limit (below the bytes given back) only pauses reading."""
    p = await streams(peer_limit=limit)
    n = 700_001
    data = _payload(n + 5_000, seed=77)
    r = p.peer_reader
    reading = asyncio.ensure_future(r.readexactly(n))
    p.writer.write(data[:300_000])
    await bounded(p.writer.drain())
    await asyncio.sleep(0.05)                   # (taken, for vchan: into the answer)
    assert not reading.done()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    p.writer.write(data[300_000:])
    p.writer.write_eof()
    if then == "readexactly":
        assert await bounded(r.readexactly(n)) == data[:n]
        assert await bounded(r.read()) == data[n:]
    else:
        got = bytearray()
        while chunk := await bounded(r.read(65536)):
            got += chunk
        assert got == data
    assert r.at_eof()


# -- writelines: frames gathered from the pieces --------------------------------------------


@pytest.mark.parametrize("shape", ["framed", "pieces", "many"])
@pytest.mark.parametrize("reader", ["keeping_up", "sleeping"])
async def test_writelines_arrives_whole_and_in_order(
        streams: OpenPair, shape: str, reader: str) -> None:
    """writelines() of [header, payload] messages, of 16 pieces of 4 KiB
    or of 100 pieces of odd sizes (vchan: a list or tuple of up to 64
    bytes goes into the ring in one C call, frames gathered across pieces;
    more, or other types, the Python way), as a list, a tuple or a
    generator, several times what the ring holds, with the reader keeping
    up or sleeping (the ring and the credit run out in the middle of a
    call: the rest waits): every byte arrives, in order."""
    p = await streams()
    rnd = random.Random(f"{shape}-{reader}")
    sent = bytearray()

    def call(i: int) -> list[bytes | memoryview]:
        if shape == "framed":
            body = _payload(rnd.choice([65_532, 20_000, 100_000]), seed=i)
            return [struct.pack(">I", len(body)), body]
        if shape == "pieces":
            block = _payload(65_536, seed=i)
            return [block[k:k + 4096] for k in range(0, len(block), 4096)]
        pieces: list[bytes | memoryview] = [_payload(rnd.randint(0, 3000), seed=i * 100 + k)
                                            for k in range(100)]
        pieces[7] = memoryview(bytes(pieces[7]))
        return pieces

    async def send() -> None:
        for i in range(60):
            pieces = call(i)
            for piece in pieces:
                sent.extend(piece)
            kind = i % 3
            p.writer.writelines(pieces if kind == 0 else tuple(pieces) if kind == 1
                                else iter(pieces))
            if i % 16 == 15:                    # (1 MiB or more a time)
                await bounded(p.writer.drain())
        p.writer.write_eof()

    sending = asyncio.ensure_future(send())
    got = bytearray()
    while chunk := await bounded(p.peer_reader.read(100_000)):
        got += chunk
        if reader == "sleeping" and rnd.random() < 0.2:
            await asyncio.sleep(0.002)
    await bounded(sending)
    assert len(got) == len(sent)
    assert got == sent


@pytest.mark.parametrize("end", ["close", "write_eof", "abort"])
async def test_writelines_larger_than_the_ring_then_the_end(streams: OpenPair, end: str) -> None:
    """writelines() of 4 MiB in one call (vchan: what fits goes in at once,
    the rest waits), then close() or write_eof() in the same iteration:
    the peer reads every byte, then EOF; abort() instead: a prefix of the
    bytes (none made up), then EOF or ConnectionResetError."""
    p = await streams()
    block = _payload(4 << 20, seed=9)
    p.writer.writelines([block[k:k + 65_536] for k in range(0, len(block), 65_536)])
    if end == "close":
        p.writer.close()
    elif end == "write_eof":
        p.writer.write_eof()
    else:
        p.writer.transport.abort()
    reading = asyncio.ensure_future(p.peer_reader.read())
    if end == "abort":
        got = await read_outcome(reading)
        if isinstance(got, bytes):
            assert block.startswith(got)
        else:
            assert isinstance(got, ConnectionResetError), repr(got)
        return
    got = await bounded(reading)
    assert len(got) == len(block)
    assert got == block
    assert p.peer_reader.at_eof()


# -- readuntil / readline -------------------------------------------------------------------


async def test_separators_split_across_writes_in_different_iterations(
        streams: OpenPair) -> None:
    """A separator that arrives in two (or three) pieces is found; at EOF
    readuntil() raises IncompleteReadError with what is left and readline()
    returns it."""
    p = await streams()
    r, w = p.peer_reader, p.writer
    pieces = [b"first\r", b"\nsecond<E", b"N", b"D>third", b"\n", b"fourth\r", b"\n",
              b"tail-a", b"nd-more"]
    for piece in pieces:                        # each in its own iteration
        w.write(piece)
        await bounded(w.drain())
        await asyncio.sleep(0.005)
    w.write_eof()
    assert await bounded(r.readuntil(b"\r\n")) == b"first\r\n"
    assert await bounded(r.readuntil(b"<END>")) == b"second<END>"
    assert await bounded(r.readline()) == b"third\n"
    assert await bounded(r.readuntil(b"\r\n")) == b"fourth\r\n"
    with pytest.raises(asyncio.IncompleteReadError) as exc:
        await bounded(r.readuntil(b"\n"))
    assert (exc.value.partial, exc.value.expected) == (b"tail-and-more", None)
    assert r.at_eof()
    assert await bounded(r.readline()) == b""


async def test_separator_waited_for_arrives_split(streams: OpenPair) -> None:
    """A reader already waiting in readuntil() when the separator's first
    byte comes, and the rest comes in the next iteration."""
    p = await streams()
    r, w = p.peer_reader, p.writer
    for sep, head, tail in [(b"\r\n", b"line\r", b"\n"), (b"<END>", b"x<E", b"ND>"),
                            (b"\n", b"no-newline-yet", b"\n")]:
        waiting = asyncio.ensure_future(r.readuntil(sep))
        w.write(head)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        w.write(tail)
        assert await bounded(waiting) == head + tail


async def test_readuntil_finds_separators_split_between_pieces(streams: OpenPair) -> None:
    """Records ending in a 6-byte separator, written so that the separator
    is cut between the pieces the reader receives: by a 64 KiB frame
    boundary inside one large write, between two writes in one iteration,
    or between two iterations.  Each readuntil() returns exactly one record."""
    p = await streams(peer_limit=2**20)
    sep = b"\r\n--\r\n"
    letters = bytes(b"abcdefgh"[i % 8] for i in range(256))
    rnd = random.Random(7)
    plan: list[tuple[bytes, int | None, bool]] = []     # record, where to cut it, pause
    for k in range(48):
        j = rnd.randint(1, len(sep) - 1)               # bytes of the separator before the cut
        style = k % 4
        if style == 0:      # one write; 64 KiB frames end inside the separator
            n, cut, pause = 65536 * rnd.randint(1, 3) - j, None, False
        elif style == 1:    # two writes in two iterations
            n = rnd.randint(0, 3000)
            cut, pause = n + j, True
        elif style == 2:    # two writes in one iteration
            n = rnd.randint(0, 70000)
            cut, pause = n + j, False
        else:               # small ones, merged with their neighbours
            n, cut, pause = rnd.randint(0, 50), None, False
        plan.append((random.Random(k).randbytes(n).translate(letters) + sep, cut, pause))

    async def send() -> None:
        w = p.writer
        for k, (record, cut, pause) in enumerate(plan):
            if cut is None:
                w.write(record)
            else:
                w.write(record[:cut])
                if pause:
                    await w.drain()
                    await asyncio.sleep(0.002)
                w.write(record[cut:])
            if k % 4 == 3:
                await w.drain()
        w.write_eof()

    sending = asyncio.ensure_future(send())
    for k, (record, _, _) in enumerate(plan):
        got = await bounded(p.peer_reader.readuntil(sep))
        assert got == record, f"record {k}"
    await bounded(sending)
    assert await bounded(p.peer_reader.read()) == b""


LIMIT = 1024


@pytest.mark.parametrize("arrival", ["one_write", "pieces"])
async def test_lines_at_the_limit_as_asyncio(streams: OpenPair, arrival: str) -> None:
    """With limit L: a line of L-1 or L bytes (before the separator) is
    read; one of L+1 makes readline() raise ValueError and drops that line,
    and readuntil() raise LimitOverrunError (consumed = where the separator
    is) leaving the bytes to read; L+10 bytes with no separator make
    readuntil() raise LimitOverrunError (consumed = all of them) and
    readline() drop them.  The reader goes on reading afterwards.  The same
    whether each case's bytes came in one write or in pieces (written in
    different iterations: several pieces in the reader's buffer)."""
    p = await streams(peer_limit=LIMIT)
    r, w = p.peer_reader, p.writer
    L = LIMIT

    async def send(data: bytes) -> None:
        # Every byte of a case is in the reader's buffer before it reads
        # (each case is at most 2 L + 1 bytes: the reader pauses above 2 L).
        cuts = [0, len(data)] if arrival == "one_write" else \
            [0, len(data) // 3, len(data) // 3 + 1, len(data)]
        for i, j in itertools.pairwise(cuts):
            w.write(data[i:j])
            await bounded(w.drain())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)

    await send(b"a" * (L - 1) + b"\n" + b"b" * L + b"\n")
    assert await bounded(r.readline()) == b"a" * (L - 1) + b"\n"
    assert await bounded(r.readline()) == b"b" * L + b"\n"

    await send(b"c" * (L + 1) + b"\n" + b"ok\n")
    with pytest.raises(ValueError, match="Separator is found, but chunk is longer than limit"):
        await bounded(r.readline())             # drops that line
    assert await bounded(r.readline()) == b"ok\n"

    await send(b"d" * (L + 1) + b"\n")
    with pytest.raises(asyncio.LimitOverrunError,
                       match="Separator is found, but chunk is longer than limit") as over:
        await bounded(r.readuntil(b"\n"))
    assert over.value.consumed == L + 1
    assert await bounded(r.readexactly(L + 2)) == b"d" * (L + 1) + b"\n"

    await send(b"e" * (L + 10))
    with pytest.raises(asyncio.LimitOverrunError,
                       match="Separator is not found, and chunk exceed the limit") as over:
        await bounded(r.readuntil(b"\n"))
    assert over.value.consumed == L + 10
    with pytest.raises(ValueError, match="Separator is not found, and chunk exceed the limit"):
        await bounded(r.readline())             # drops the L+10 bytes
    await send(b"fine\n")
    assert await bounded(r.readline()) == b"fine\n"

    await send(b"g" * (L + 5) + b"<E")
    with pytest.raises(asyncio.LimitOverrunError) as over:
        await bounded(r.readuntil(b"<END>"))
    assert over.value.consumed == L + 7 + 1 - len(b"<END>")
    assert await bounded(r.readexactly(over.value.consumed)) == b"g" * (L + 3)
    w.write(b"ND>last")
    w.write_eof()
    assert await bounded(r.readuntil(b"<END>")) == b"gg<END>"
    assert await bounded(r.readline()) == b"last"
    assert await bounded(r.readline()) == b""
    assert r.at_eof()


async def test_readuntil_with_a_tuple_of_separators(streams: OpenPair) -> None:
    """readuntil((sep, ...)) returns the shortest data that ends in one of
    them (Python 3.13's reader; vchan's on every version)."""
    if streams.kind != "vchan" and sys.version_info < (3, 13):
        pytest.skip("asyncio's readuntil() takes a tuple from Python 3.13")
    p = await streams()
    r, w = p.peer_reader, p.writer
    for piece in [b"ab\r", b"\ncd\nEN", b"D", b"efEND\r\n"]:
        w.write(piece)
        await asyncio.sleep(0.005)
    w.write_eof()
    seps: Any = (b"\r\n", b"END", b"\n")
    assert await bounded(r.readuntil(seps)) == b"ab\r\n"
    assert await bounded(r.readuntil(seps)) == b"cd\n"
    assert await bounded(r.readuntil(seps)) == b"END"
    assert await bounded(r.readuntil(seps)) == b"efEND"
    assert await bounded(r.readuntil(seps)) == b"\r\n"
    with pytest.raises(asyncio.IncompleteReadError) as exc:
        await bounded(r.readuntil(seps))
    assert (exc.value.partial, exc.value.expected) == (b"", None)


# -- read(n), at_eof, the limit ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 100, 65536, -1])
async def test_read_n_returns_every_byte_in_order(streams: OpenPair, n: int) -> None:
    """read(n) returns at least one and at most n bytes until EOF, then b"";
    together they are exactly what was sent; at_eof() only at the end."""
    p = await streams()
    size = 20_000 if n == 1 else 2_000_000
    data = _payload(size, seed=n & 0xFFFF)
    rnd = random.Random(n)

    async def send() -> None:
        # (first more than the ring holds: the writer waits for room while
        # the reader takes)
        i = 0 if n == 1 else 1_200_000
        p.writer.write(data[:i])
        while i < size:
            k = rnd.choice([1, 7, 100, 1000, 65536, 300_000])
            p.writer.write(data[i:i + k])
            i += k
            if rnd.random() < 0.3:
                await p.writer.drain()
        p.writer.close()

    r = p.peer_reader
    assert not r.at_eof()
    sending = asyncio.ensure_future(send())
    got = bytearray()
    while True:
        part = await bounded(r.read(n))
        if not part:
            break
        assert n < 0 or len(part) <= n
        got += part
    assert r.at_eof()
    assert len(got) == size
    assert got == data
    assert await bounded(r.read(n)) == b""
    await bounded(sending)


BLOCK = 65536
_FILL = b"\x5a" * (BLOCK - 8)


def _block(i: int) -> bytes:
    return i.to_bytes(8, "big") + _FILL


async def _read_blocks(r: asyncio.StreamReader, first: int, count: int) -> None:
    for i in range(first, first + count):
        got = await bounded(r.readexactly(BLOCK))
        assert got[:8] == i.to_bytes(8, "big"), f"block {i} out of order"
        assert got[8:] == _FILL


def _tcp_buffers_max() -> int:
    """The most a TCP loopback connection's socket buffers may hold (both ends)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            total += 64 << 20
    return total


@pytest.mark.parametrize("limit", [2**14, 2**24], ids=["16KiB", "16MiB"])
async def test_a_reader_that_does_not_read_pauses_the_writer(
        streams: OpenPair, limit: int) -> None:
    """A peer whose reader does not read stops our writer: drain() blocks once
    its reader holds more than twice its limit (and whatever the path holds:
    socket buffers, or the ring and the stream's credit), stays blocked, and
    returns once the reader reads; every block then arrives, in order."""
    p = await streams(peer_limit=limit)
    w = p.writer
    sent = 0
    # (seen before it blocks: 2 x limit + 4 MiB over vchan -- the ring and
    # the stream's 4 MiB of credit --, 2 x limit + 384 KiB over Unix, and
    # over TCP 2 x limit + its socket buffers: about 4 MiB usually, but they
    # autotune up to the kernel's tcp_rmem and tcp_wmem maximums (36 MiB on
    # the machine this was written on, where one run took 2 x limit + 16 MiB
    # and drain() still returned at once)
    for _ in range((2 * limit + (16 << 20) + _tcp_buffers_max()) // BLOCK):
        w.write(_block(sent))
        sent += 1
        draining = asyncio.ensure_future(w.drain())
        done, _ = await asyncio.wait({draining}, timeout=0.05)
        if not done:
            # Blocked -- or only slow: it must stay blocked a while longer.
            done, _ = await asyncio.wait({draining}, timeout=0.25)
            if not done and sent * BLOCK > 2 * limit:
                break
            # The reader buffers up to twice its limit before it stops
            # reading: below that a drain() is only slow (a loaded machine),
            # and one that never returns fails here.
            await bounded(draining)
        draining.result()
    else:
        pytest.fail(f"drain() never blocked ({sent} blocks sent)")
    more = 50
    reading = asyncio.ensure_future(_read_blocks(p.peer_reader, 0, sent + more))
    await bounded(draining)
    for i in range(sent, sent + more):
        w.write(_block(i))
        await bounded(w.drain())
    await bounded(reading)
    w.close()
    assert await bounded(p.peer_reader.read()) == b""


# -- EOF behind data not yet read --------------------------------------------------------------


@pytest.mark.parametrize("size", [300_000, 3_000_000])
@pytest.mark.parametrize("peer", ["reading", "late"])
async def test_eof_behind_unread_data_comes_after_all_of_it(
        streams: OpenPair, size: int, peer: str) -> None:
    """Data then close() in one iteration, while the peer reads or only
    later (the data and the EOF behind it wait in the ring, announced to the
    reader, copied aside, or in socket buffers): readexactly(size + 1) raises
    IncompleteReadError with every byte as partial, then read() gives b""."""
    p = await streams()
    data = _payload(size, seed=size)

    async def read_all() -> asyncio.IncompleteReadError:
        if peer == "late":
            await asyncio.sleep(0.1)
        try:
            await p.peer_reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as exc:
            return exc
        raise AssertionError("readexactly(size + 1) returned")

    reading = asyncio.ensure_future(read_all())
    if peer == "reading":
        await asyncio.sleep(0.01)
    p.writer.write(data[:100])
    p.writer.write(data[100:200_000])
    small_end = 200_000 + 50 * 100
    for i in range(200_000, small_end, 100):
        p.writer.write(data[i:i + 100])
    p.writer.write(data[small_end:])
    p.writer.close()
    exc = await bounded(reading)
    assert exc.expected == size + 1
    assert len(exc.partial) == size
    assert exc.partial == data
    assert p.peer_reader.at_eof()
    assert await bounded(p.peer_reader.read()) == b""
    await bounded(p.writer.wait_closed())

