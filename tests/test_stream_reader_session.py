"""vchan.StreamReader over a session stream: two defects found while writing
the streams conformance suite (tests/test_conformance_streams.py), kept as
regression tests.

Each test states the behaviour the code documents (vchan/mux.py, the
"frames a vchan StreamReader takes from the ring itself" section, and
StreamTransport._data).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_mux import header, inject, served

import vchan
from vchan.mux_frames import DATA, EOF, GATHER


async def test_a_waiting_reader_takes_its_bytes_from_the_ring(sim_dir: Path) -> None:
    """The documented path: the session announces the frames at the head of
    the ring, the reader is woken "and runs in the next loop iteration;
    whatever it has not taken by the end of that iteration is copied aside".
    A reader already waiting in read() must then take at least the first
    piece itself (StreamTransport._ring_take)."""
    async with served(1) as s:
        conn = s.conns[0]
        transport = conn.server.transport
        took: list[int] = []
        take = transport._ring_take

        def counted() -> bytes:
            data = take()
            took.append(len(data))
            return data

        transport._ring_take = counted  # type: ignore[method-assign]
        reading = asyncio.ensure_future(conn.server.reader.read(65536))
        await asyncio.sleep(0.01)               # it waits for data
        data = b"q" * 30_000                    # one DATA frame
        conn.client.writer.write(data)
        assert await asyncio.wait_for(reading, 5) == data
        assert took, "every byte was copied aside before the waiting reader ran"


async def test_data_after_the_peers_eof_is_dropped_for_a_stream_reader(sim_dir: Path) -> None:
    """DATA a peer sends after its EOF is dropped, as StreamTransport._data
    drops it for a plain Protocol ("the bytes are dropped, as a socket
    does"): a StreamReader that has seen EOF stays at EOF."""
    async with served(1) as s:
        conn = s.conns[0]
        sid = conn.client.transport.stream_id
        reader = conn.server.reader
        inject(conn.client.session, header(EOF, sid, 0))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert reader.at_eof()
        extra = b"x" * GATHER                   # a frame large enough to be announced
        inject(conn.client.session, header(DATA, sid, len(extra)) + extra)
        await asyncio.sleep(0.05)
        assert reader.at_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_protocol_that_overrides_data_received_sees_every_byte(sim_dir: Path) -> None:
    """A StreamReaderProtocol subclass that looks at the data in its own
    ``data_received`` gets every byte through it, small pieces and large
    runs alike: the reader takes from the ring itself (and the session feeds
    it directly) only when ``data_received`` would do nothing but feed it."""
    seen: list[int] = []
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    class Counting(asyncio.StreamReaderProtocol):
        def data_received(self, data: bytes) -> None:
            seen.append(len(data))
            super().data_received(data)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done.set_result(await reader.read())
        writer.close()

    loop = asyncio.get_running_loop()
    port = "counting-protocol"

    def factory() -> asyncio.StreamReaderProtocol:
        return Counting(vchan.StreamReader(loop=loop), serve, loop=loop)

    server = await vchan.create_server(factory, port, peers=vchan.own_domid())
    try:
        _, writer = await vchan.open_connection(vchan.own_domid(), port, timeout=10)
        payload = bytes(range(256)) * 4096          # 1 MiB: frames the session would announce
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i:i + 100_000])
        writer.write(b"tail")                       # and a small one
        writer.write_eof()
        await writer.drain()
        assert await asyncio.wait_for(done, 20) == payload + b"tail"
        assert sum(seen) == len(payload) + 4
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
