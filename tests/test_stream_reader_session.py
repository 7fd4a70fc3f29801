"""vchan.StreamReader over a session stream: two defects found while writing
the streams conformance suite (tests/test_conformance_streams.py), kept as
regression tests.

Each test states the behaviour the code documents (vchan/mux.py, the
"frames a vchan StreamReader takes from the ring itself" section, and
StreamTransport._data).
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

from test_mux import header, inject, payload_of, served

import vchan
from vchan.mux_frames import DATA, EOF, GATHER


async def test_a_waiting_reader_takes_its_bytes_from_the_ring(sim_dir: Path) -> None:
    """The documented path: the session announces the frames at the head of
    the ring, the reader is woken "and runs in the next loop iteration;
    whatever it has not taken by the end of that iteration is copied aside".
    A reader already waiting in read() takes them from the ring itself:
    nothing is copied aside (Session._take_lazy)."""
    async with served(1) as s:
        conn = s.conns[0]
        session = conn.server.session
        aside: list[int] = []
        take = session._take_lazy

        def counted() -> bytes:
            data = take()
            aside.append(len(data))
            return data

        session._take_lazy = counted  # type: ignore[method-assign]
        reading = asyncio.ensure_future(conn.server.reader.read(65536))
        await asyncio.sleep(0.01)               # it waits for data
        data = b"q" * 30_000                    # one DATA frame
        conn.client.writer.write(data)
        assert await asyncio.wait_for(reading, 5) == data
        assert not aside, "bytes were copied aside before the waiting reader ran"


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


async def test_small_reads_take_frames_in_parts_straight_from_the_ring(sim_dir: Path) -> None:
    """read(4096), readexactly() and readline() take the announced frames from
    the ring in parts (nothing is copied aside into the reader's buffer), also
    where a line or message straddles two frames or the end of the ring."""
    async with served(1) as s:
        conn = s.conns[0]
        reader, session = conn.server.reader, conn.server.session
        assert isinstance(reader, vchan.StreamReader)
        rnd = random.Random(46)
        lines = [b"%d " % i + b"x" * rnd.choice([0, 10, 4000, 9000]) + b"\n"
                 for i in range(400)]
        data = payload_of(900_000, 47)
        messages = [rnd.randbytes(rnd.choice([1, 3000, 70_000])) for _ in range(30)]

        async def send() -> None:
            w = conn.client.writer
            for piece in (data, *lines,
                          *(struct.pack(">I", len(m)) + m for m in messages)):
                w.write(piece)
                await w.drain()

        task = asyncio.create_task(send())
        got = bytearray()
        parts = direct = 0
        while len(got) < len(data):
            want = min(4096, len(data) - len(got))
            chunk = await reader.read(want)
            assert 0 < len(chunk) <= want
            got += chunk
            parts += session._direct.offset > 0
            direct += not reader._chunks
        assert got == data
        assert parts > 100 and direct > 0.9 * len(got) / 4096
        for line in lines:
            assert await reader.readline() == line
        for m in messages:
            (n,) = struct.unpack(">I", await reader.readexactly(4))
            assert await reader.readexactly(n) == m
        await task
        ring = session._endpoint.ring
        assert ring._r.rd.own > 2 * ring.read_size, "the ring never wrapped"


async def test_small_reads_of_a_small_ring_wake_the_writer(sim_dir: Path) -> None:
    """A writer waiting for room in a 64 KiB session ring is woken as the reader
    takes frames in parts (it would wait forever otherwise)."""
    async with served(1, read_min=1 << 16, write_min=1 << 16) as s:
        conn = s.conns[0]
        assert conn.server.session._endpoint.ring.read_size == 1 << 16
        data = payload_of(3_000_000, 48)
        conn.client.writer.write(data)
        got = bytearray()
        parts = 0
        while len(got) < len(data):
            got += await conn.server.reader.read(1000)
            parts += conn.server.session._direct.offset > 0
        assert got == data
        assert parts > 1000


async def test_a_frame_taken_in_part_is_copied_aside_from_where_the_reader_stopped(
        sim_dir: Path) -> None:
    """The reader takes part of a frame, then lets the loop run: the session
    copies the rest of the run aside (the frames behind it must not wait),
    from where the reader stopped, and the reader goes on from its pieces."""
    async with served(1) as s:
        conn = s.conns[0]
        reader, session = conn.server.reader, conn.server.session
        assert isinstance(reader, vchan.StreamReader)
        data = payload_of(200_000, 49)
        conn.client.writer.write(data)
        first = await reader.read(1000)
        assert session._direct.offset == len(first) == 1000
        for _ in range(5):
            await asyncio.sleep(0)          # past the end of the next loop iteration
        assert session._lazy is None and reader._ring == 0
        assert reader._chunks                # the rest, copied aside
        rest = await asyncio.wait_for(reader.readexactly(len(data) - len(first)), 5)
        assert first + rest == data


async def test_a_waiting_large_read_takes_one_frame_and_leaves_the_run_in_the_ring(
        sim_dir: Path) -> None:
    """A read(1 MiB) that waited for data takes from the ring the rest of its
    head frame, not the whole run into the reader's pieces (which copied
    every frame twice and faulted fresh heap pages in: 2-3x slower)."""
    async with served(1) as s:
        conn = s.conns[0]
        reader = conn.server.reader
        assert isinstance(reader, vchan.StreamReader)

        async def read_and_look() -> tuple[bytes, int, int]:
            data = await reader.read(1 << 20)
            return data, len(reader._chunks), reader._ring     # (before the loop runs on)

        reading = asyncio.ensure_future(read_and_look())
        await asyncio.sleep(0.01)               # it waits for data
        data = payload_of(600_000, 50)
        conn.client.writer.write(data)
        first, pieces, ring = await asyncio.wait_for(reading, 5)
        assert 0 < len(first) <= 1 << 16
        assert pieces == 0, "the run was copied into the reader's pieces"
        assert ring > 0
        rest = await asyncio.wait_for(reader.readexactly(len(data) - len(first)), 5)
        assert first + rest == data
