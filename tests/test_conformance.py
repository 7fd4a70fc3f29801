"""Transport conformance: one suite, run over vchan and over TCP and Unix sockets.

The TCP and Unix-socket runs are the controls: they show the tests say what
asyncio transports really do, so vchan passing them means it behaves like
the transports asyncio code already relies on.  (As trio's
``check_one_way_stream`` does for its streams.)  Every test runs on the
default loop and on uvloop (see conftest.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import vchan

KINDS = ["vchan", "tcp", "unix"]


class _Recording:
    """Records everything the transport tells a protocol."""

    def __init__(self, keep_open_on_eof: bool = False) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: list[BaseException | None] = []
        self.keep_open_on_eof = keep_open_on_eof
        self.made = asyncio.Event()
        self.got_eof = asyncio.Event()
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("made")
        self.made.set()

    def _record(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert "eof" not in self.events, "data after eof_received"
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.got_eof.set()
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.writable.clear()

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.writable.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)
        self.closed.set()
        self.writable.set()

    async def wait_for_bytes(self, n: int, timeout: float = 20.0) -> None:
        async def until() -> None:
            while len(self.data) < n:
                self.changed.clear()
                if self.closed.is_set():
                    raise AssertionError(f"closed after {len(self.data)} of {n} bytes")
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)


class Recorder(_Recording, asyncio.Protocol):
    """A plain Protocol that records."""

    def data_received(self, data: bytes) -> None:
        self._record(data)


class BufferedRecorder(_Recording, asyncio.BufferedProtocol):
    """The same, as a BufferedProtocol reading into its own buffer."""

    def __init__(self, keep_open_on_eof: bool = False) -> None:
        super().__init__(keep_open_on_eof)
        self.buf = bytearray(32 * 1024)
        self.sizes: list[int] = []

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.sizes.append(nbytes)
        self._record(bytes(self.buf[:nbytes]))


class StreamClient(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol that also keeps what the fixture looks at."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.transport: Any = None
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        super().connection_lost(exc)


@dataclass
class Conn:
    """Both ends of one connection."""

    server: Any
    client: Any
    cleanup: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def st(self) -> Any:
        return self.server.transport

    @property
    def ct(self) -> Any:
        return self.client.transport


async def _vchan_pair(server_proto: Any, client_proto: Any, tmp: Path) -> Conn:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[None] = loop.create_future()

    def factory() -> Any:
        if not accepted.done():
            accepted.set_result(None)
        return server_proto

    server = await vchan.create_server(factory, "conformance", peers=vchan.own_domid())
    await vchan.create_connection(lambda: client_proto, vchan.own_domid(), "conformance",
                                  timeout=10)
    await asyncio.wait_for(accepted, 10)
    await asyncio.wait_for(server_proto.made.wait(), 10)
    server.close()
    return Conn(server_proto, client_proto, [server.wait_closed])


async def _socket_pair(kind: str, server_proto: Any, client_proto: Any,
                       tmp: Path) -> Conn:
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer
    if kind == "tcp":
        server = await loop.create_server(lambda: server_proto, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await loop.create_connection(lambda: client_proto, "127.0.0.1", port)
    else:
        path = str(tmp / "conformance.sock")
        server = await loop.create_unix_server(lambda: server_proto, path)
        await loop.create_unix_connection(lambda: client_proto, path)
    await asyncio.wait_for(server_proto.made.wait(), 10)
    server.close()
    return Conn(server_proto, client_proto, [server.wait_closed])


@pytest.fixture(params=KINDS)
async def connect(request: pytest.FixtureRequest, tmp_path: Path
                  ) -> AsyncIterator[Callable[..., Any]]:
    kind = request.param
    if kind == "vchan":
        request.getfixturevalue("sim_dir")
    conns: list[Conn] = []

    async def make(server: Any = None, client: Any = None) -> Conn:
        server = server or Recorder()
        client = client or Recorder()
        if kind == "vchan":
            conn = await _vchan_pair(server, client, tmp_path)
        else:
            conn = await _socket_pair(kind, server, client, tmp_path)
        conns.append(conn)
        return conn

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    for conn in conns:
        for proto in (conn.server, conn.client):
            if proto.transport is not None and not proto.closed.is_set():
                proto.transport.abort()
                await asyncio.wait_for(proto.closed.wait(), 10)
        for fn in conn.cleanup:
            await fn()


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- data integrity -------------------------------------------------------------


async def test_bytes_arrive_in_order_both_ways(connect: Any) -> None:
    conn = await connect()
    rnd = random.Random(5)
    up, down = _payload(3_000_000, 1), _payload(2_000_000, 2)
    i = j = 0
    while i < len(up) or j < len(down):
        n = rnd.choice([1, 7, 100, 4096, 65536, 300_000])
        if i < len(up):
            conn.ct.write(up[i:i + n])
            i += n
        if j < len(down):
            conn.st.write(down[j:j + n])
            j += n
        if rnd.random() < 0.3:
            await asyncio.sleep(0)
    await conn.server.wait_for_bytes(len(up))
    await conn.client.wait_for_bytes(len(down))
    assert hashlib.sha256(conn.server.data).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(conn.client.data).digest() == hashlib.sha256(down).digest()


async def test_one_large_write(connect: Any) -> None:
    conn = await connect()
    data = _payload(16 * 1024 * 1024, 3)
    conn.ct.write(data)
    await conn.server.wait_for_bytes(len(data), timeout=60)
    assert conn.server.data == data


async def test_many_tiny_writes(connect: Any) -> None:
    conn = await connect()
    data = _payload(20_000, 4)
    for k in range(len(data)):
        conn.ct.write(data[k:k + 1])
    conn.ct.writelines([b"a", b"bc", memoryview(b"def")])
    await conn.server.wait_for_bytes(len(data) + 6)
    assert conn.server.data == data + b"abcdef"


async def test_writelines_of_large_and_small_pieces_keeps_their_order(connect: Any) -> None:
    conn = await connect()
    big, other = _payload(100_000, 41), _payload(70_000, 42)
    pieces: list[Any] = [b"hdr", big, memoryview(b"xyz"), bytearray(b"q" * 20_000), other,
                         b"", b"end"]
    conn.ct.writelines(pieces)
    conn.ct.writelines(iter([b"after", big]))           # any iterable, as asyncio's
    expected = b"".join(bytes(p) for p in pieces) + b"after" + big
    await conn.server.wait_for_bytes(len(expected))
    assert conn.server.data == expected


async def test_buffered_protocol_reads_into_its_buffer(connect: Any) -> None:
    conn = await connect(server=BufferedRecorder())
    data = _payload(1_000_000, 6)
    conn.ct.write(data)
    await conn.server.wait_for_bytes(len(data))
    assert conn.server.data == data
    server = conn.server
    assert isinstance(server, BufferedRecorder)
    assert server.sizes and max(server.sizes) <= len(server.buf)


async def test_empty_write_is_a_no_op(connect: Any) -> None:
    conn = await connect()
    conn.ct.write(b"")
    conn.ct.write(b"x")
    await conn.server.wait_for_bytes(1)
    assert conn.server.data == b"x"


async def test_write_rejects_non_bytes(connect: Any) -> None:
    conn = await connect()
    with pytest.raises(TypeError, match="bytes-like"):
        conn.ct.write("text")


# -- flow control -----------------------------------------------------------------


async def test_clogged_peer_pauses_writing_until_it_reads(connect: Any) -> None:
    conn = await connect()
    conn.st.pause_reading()
    assert not conn.st.is_reading()
    conn.ct.set_write_buffer_limits(high=64 * 1024)
    assert conn.ct.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
    chunk = _payload(64 * 1024, 7)
    sent = 0
    # Fill whatever the path can hold (ring or socket buffers), then ours.
    for _ in range(2000):
        conn.ct.write(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)
        if not conn.client.writable.is_set():
            break
    assert "pause_writing" in conn.client.events
    assert conn.ct.get_write_buffer_size() > 64 * 1024
    await asyncio.sleep(0.05)
    assert not conn.client.writable.is_set(), "resumed while the peer was not reading"
    conn.st.resume_reading()
    await asyncio.wait_for(conn.client.writable.wait(), 20)
    assert conn.client.events.count("resume_writing") == 1
    await conn.server.wait_for_bytes(sent, timeout=60)
    assert conn.server.data == chunk * (sent // len(chunk))


async def test_drain_waits_for_a_clogged_peer(connect: Any) -> None:
    """StreamWriter.drain() blocks while the peer does not read."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)
    client = StreamClient(reader)
    conn = await connect(client=client)
    writer = asyncio.StreamWriter(conn.client.transport, client, reader, loop)
    conn.st.pause_reading()
    drained = 0
    block = b"z" * 65536
    for _ in range(200):
        writer.write(block)
        try:
            await asyncio.wait_for(writer.drain(), 0.2)
        except TimeoutError:
            break
        drained += 1
    else:
        pytest.fail("drain() never blocked on a peer that does not read")
    conn.st.resume_reading()
    await asyncio.wait_for(writer.drain(), 20)
    await conn.server.wait_for_bytes((drained + 1) * len(block))
    writer.close()      # (a StreamWriter left open warns when it is collected)


async def test_pause_reading_holds_data_back(connect: Any) -> None:
    conn = await connect()
    conn.st.pause_reading()
    conn.ct.write(b"held back")
    await asyncio.sleep(0.1)
    assert conn.server.data == b""
    conn.st.pause_reading()                    # idempotent
    conn.st.resume_reading()
    await conn.server.wait_for_bytes(9)
    assert conn.server.data == b"held back"
    assert conn.st.is_reading()


async def test_bad_buffer_limits_are_refused(connect: Any) -> None:
    conn = await connect()
    with pytest.raises(ValueError, match="high"):
        conn.ct.set_write_buffer_limits(high=10, low=20)


# -- half-close, EOF, close, abort ----------------------------------------------------


async def test_eof_comes_after_all_data(connect: Any) -> None:
    conn = await connect()
    data = _payload(500_000, 8)
    conn.ct.write(data)
    conn.ct.close()
    await asyncio.wait_for(conn.server.closed.wait(), 20)
    assert conn.server.data == data
    assert conn.server.events[-2:] == ["eof", "lost"]
    assert conn.server.lost == [None]
    await asyncio.wait_for(conn.client.closed.wait(), 20)
    assert conn.client.lost == [None]


async def test_close_delivers_buffered_data_to_a_slow_reader(connect: Any) -> None:
    conn = await connect()
    conn.st.pause_reading()
    data = _payload(3_000_000, 9)
    conn.ct.write(data)
    conn.ct.close()
    assert conn.ct.is_closing()
    await asyncio.sleep(0.05)
    conn.st.resume_reading()
    await asyncio.wait_for(conn.server.closed.wait(), 30)
    assert conn.server.data == data
    assert conn.client.lost == [None]


async def test_half_close_keeps_the_other_direction(connect: Any) -> None:
    conn = await connect(server=Recorder(keep_open_on_eof=True))
    assert conn.ct.can_write_eof()
    conn.ct.write(b"request")
    conn.ct.write_eof()
    await asyncio.wait_for(conn.server.got_eof.wait(), 10)
    assert conn.server.data == b"request"
    with pytest.raises(RuntimeError, match="write_eof"):
        conn.ct.write(b"more")
    conn.st.write(b"response")
    conn.st.close()
    await conn.client.wait_for_bytes(8)
    await asyncio.wait_for(conn.client.closed.wait(), 10)
    assert conn.client.data == b"response"
    assert "eof" in conn.client.events


async def test_eof_received_false_closes_the_transport(connect: Any) -> None:
    conn = await connect()
    conn.ct.write_eof()
    await asyncio.wait_for(conn.server.closed.wait(), 10)
    assert conn.server.events == ["made", "eof", "lost"]


async def test_connection_lost_exactly_once(connect: Any) -> None:
    conn = await connect()
    conn.ct.close()
    conn.ct.close()
    conn.ct.abort()
    await asyncio.wait_for(conn.client.closed.wait(), 10)
    await asyncio.wait_for(conn.server.closed.wait(), 10)
    await asyncio.sleep(0.05)
    assert conn.client.events.count("lost") == 1
    assert conn.server.events.count("lost") == 1


async def test_abort_does_not_wait_for_the_buffer(connect: Any) -> None:
    conn = await connect()
    conn.st.pause_reading()
    for _ in range(200):
        conn.ct.write(b"q" * 65536)
        if conn.ct.get_write_buffer_size():
            break
        await asyncio.sleep(0)
    assert conn.ct.get_write_buffer_size() > 0
    conn.ct.abort()
    await asyncio.wait_for(conn.client.closed.wait(), 5)
    assert conn.client.lost == [None]
    conn.st.resume_reading()
    await asyncio.wait_for(conn.server.closed.wait(), 10)
    assert conn.server.events.count("lost") == 1


async def test_extra_info(connect: Any) -> None:
    conn = await connect()
    assert conn.ct.get_extra_info("peername") is not None
    assert conn.st.get_extra_info("peername") is not None
    assert conn.ct.get_extra_info("nonexistent", "default") == "default"
    if connect.kind == "vchan":
        own = vchan.own_domid()
        assert conn.ct.get_extra_info("peername") == (own, "conformance")
        assert conn.ct.get_extra_info("sockname")[0] == own
        assert conn.ct.get_extra_info("endpoint") is not None
