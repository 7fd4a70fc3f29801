"""The proxy's engine: :class:`vchan.proxy.SocketSplice` forwarding in C.

Each test builds one forwarded connection in-process (emulated domain
talking to itself): a socket end (TCP or Unix, wrapped in asyncio streams)
<-> SocketSplice <-> a vchan end (vchan streams).  The splice is the vchan
client (an accepted socket handed over, as ``proxy --listen``) or the vchan
server (its socket opened on connection, as ``proxy --listen-vchan``).
The command itself, with 100 connections and C peers, is in test_cli.py
and test_compat.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vchan._native import ffi

import vchan
from vchan.proxy import SocketListener, SocketSplice


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def _pair(family: str) -> tuple[socket.socket, socket.socket]:
    return socket.socketpair() if family == "unix" else _tcp_pair()


@dataclass
class Forwarded:
    sock_r: asyncio.StreamReader      # the socket end
    sock_w: asyncio.StreamWriter
    vchan_r: asyncio.StreamReader     # the vchan end
    vchan_w: asyncio.StreamWriter
    splice: SocketSplice
    raw: socket.socket                # the socket the splice owns


CASES = pytest.mark.parametrize(("side", "family"), [
    (side, family) for side in ("splice-client", "splice-server") for family in ("unix", "tcp")])


@contextlib.asynccontextmanager
async def forwarded(side: str, family: str) -> AsyncIterator[Forwarded]:
    """One forwarded connection; both ends closed and the splice gone at the end."""
    own = vchan.own_domid()
    port = f"splice{os.getpid()}"
    mine, theirs = _pair(family)
    splice: SocketSplice
    vchan_end: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.get_running_loop().create_future()

    if side == "splice-client":
        def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            vchan_end.set_result((r, w))
        server = await vchan.start_server(accepted, port, peers=own)
        splice = SocketSplice(theirs, name="test")
        await vchan.create_connection(lambda: splice, own, port, timeout=10, dedicated=True)
    else:
        async def connect() -> socket.socket:
            return theirs
        splice = SocketSplice(connect=connect, name="test")
        server = await vchan.create_server(lambda: splice, port, peers=own, sessions=False)
        vchan_end.set_result(await vchan.open_connection(own, port, timeout=10))
    vr, vw = await asyncio.wait_for(vchan_end, 10)
    server.close()      # (wait_closed() waits for the connection too)
    sr, sw = await asyncio.open_connection(sock=mine)
    try:
        yield Forwarded(sr, sw, vr, vw, splice, theirs)
    finally:
        for w in (sw, vw):
            w.close()
    await asyncio.wait_for(splice.wait_closed(), 10)
    for w in (sw, vw):
        with contextlib.suppress(ConnectionError, vchan.VchanError):
            await w.wait_closed()
    await asyncio.wait_for(server.wait_closed(), 10)


async def _send(writer: asyncio.StreamWriter, seed: int, n: int, eof: bool = True) -> str:
    rnd = __import__("random").Random(seed)
    h = hashlib.sha256()
    sent = 0
    while sent < n:
        block = rnd.randbytes(min(n - sent, rnd.choice([1, 100, 4096, 65536, 300_000])))
        h.update(block)
        writer.write(block)
        await writer.drain()
        sent += len(block)
    if eof:
        writer.write_eof()
    return h.hexdigest()


async def _send_to_eof(writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                       data: bytes) -> None:
    """``data`` and then EOF, written at one end of the proxy, are what the
    other end reads to its end."""
    writer.write(data)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == data


async def _recv(reader: asyncio.StreamReader) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(1 << 20):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


@CASES
async def test_both_directions_at_once_arrive_intact(
        side: str, family: str, sim_dir: Path) -> None:
    """16 MiB each way, random chunks, through ring<->socket splicing."""
    async with forwarded(side, family) as fwd:
        n = 16 << 20
        up, down, got_up, got_down = await asyncio.wait_for(asyncio.gather(
            _send(fwd.sock_w, 1, n), _send(fwd.vchan_w, 2, n),
            _recv(fwd.vchan_r), _recv(fwd.sock_r)), 60)
        assert got_up == (n, up)
        assert got_down == (n, down)
        await asyncio.wait_for(fwd.splice.wait_closed(), 10)
        assert fwd.splice.error is None
        assert fwd.raw.fileno() == -1, "the splice closes its socket when both sides are done"


@CASES
async def test_socket_eof_is_a_vchan_half_close(
        side: str, family: str, sim_dir: Path) -> None:
    async with forwarded(side, family) as fwd:
        await _send_to_eof(fwd.sock_w, fwd.vchan_r, b"request")
        # The other direction still works after the half-close.
        await _send_to_eof(fwd.vchan_w, fwd.sock_r, b"response after EOF")
        await asyncio.wait_for(fwd.splice.wait_closed(), 10)


@CASES
async def test_vchan_eof_is_a_socket_shutdown(
        side: str, family: str, sim_dir: Path) -> None:
    async with forwarded(side, family) as fwd:
        await _send_to_eof(fwd.vchan_w, fwd.sock_r, b"x" * 100_000)
        assert not fwd.splice._closed.is_set(), "half-closed, not closed"
        await _send_to_eof(fwd.sock_w, fwd.vchan_r, b"still talking")
        await asyncio.wait_for(fwd.splice.wait_closed(), 10)


@CASES
async def test_a_slow_socket_reader_holds_back_the_vchan_writer(
        side: str, family: str, sim_dir: Path) -> None:
    """Back-pressure end to end, with nothing piling up in the proxy."""
    async with forwarded(side, family) as fwd:
        block = os.urandom(1 << 20)
        fwd.vchan_w.transport.set_write_buffer_limits(high=1 << 20)
        total = 0
        for _ in range(64):         # far more than ring + socket buffers hold
            fwd.vchan_w.write(block)
            total += len(block)
            try:
                await asyncio.wait_for(fwd.vchan_w.drain(), 0.3)
            except TimeoutError:
                break
        else:
            pytest.fail("64 MiB written without the unread socket pushing back")
        # The splice keeps no buffer of its own: what is not in the writer's
        # buffer is in the ring or the socket.
        assert fwd.vchan_w.transport.get_write_buffer_size() > 0
        fwd.vchan_w.write_eof()
        expect = hashlib.sha256(block * (total // len(block))).hexdigest()
        drain = asyncio.ensure_future(fwd.vchan_w.drain())
        assert await asyncio.wait_for(_recv(fwd.sock_r), 60) == (total, expect)
        await drain


@CASES
async def test_a_slow_vchan_reader_holds_back_the_socket_writer(
        side: str, family: str, sim_dir: Path) -> None:
    async with forwarded(side, family) as fwd:
        block = os.urandom(1 << 20)
        fwd.vchan_r._transport.pause_reading()  # type: ignore[attr-defined]
        total = 0
        for _ in range(64):
            fwd.sock_w.write(block)
            total += len(block)
            try:
                await asyncio.wait_for(fwd.sock_w.drain(), 0.3)
            except TimeoutError:
                break
        else:
            pytest.fail("64 MiB written without the paused vchan reader pushing back")
        fwd.sock_w.write_eof()
        fwd.vchan_r._transport.resume_reading()  # type: ignore[attr-defined]
        drain = asyncio.ensure_future(fwd.sock_w.drain())
        expect = hashlib.sha256(block * (total // len(block))).hexdigest()
        assert await asyncio.wait_for(_recv(fwd.vchan_r), 60) == (total, expect)
        await drain


@pytest.mark.expect_loop_errors
@CASES
async def test_a_corrupt_ring_resets_the_socket(
        side: str, family: str, sim_dir: Path) -> None:
    """The vchan peer scribbles an impossible index: the socket end hears of it."""
    async with forwarded(side, family) as fwd:
        transport: Any = fwd.splice._transport
        endpoint = transport._endpoint
        iface = ffi.cast("struct vchan_interface *", endpoint.pages[0].pointer)
        # The producer index of the ring the splice reads, far past its size.
        shared = iface.right if not endpoint.is_server else iface.left
        shared.prod = (shared.prod + (1 << 24)) & 0xFFFFFFFF
        # Wake the splice without touching an index.
        fwd.vchan_w.transport._endpoint.notify()  # type: ignore[attr-defined]
        await asyncio.wait_for(fwd.splice.wait_closed(), 10)
        assert isinstance(fwd.splice.error, vchan.RemoteProtocolError)
        if family == "tcp":
            # A TCP peer is reset (SO_LINGER 0), not told a clean EOF.
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(fwd.sock_r.read(), 10)
        else:
            assert await asyncio.wait_for(fwd.sock_r.read(), 10) == b""


async def test_splice_refuses_other_transports() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="not both"):
            SocketSplice()
        splice = SocketSplice(a)
        _, w = await asyncio.open_connection(sock=b)
        with pytest.raises(TypeError, match="vchan transports only"):
            splice.connection_made(w.transport)
        w.close()


async def test_listener_hands_over_raw_sockets() -> None:
    got: asyncio.Queue[socket.socket] = asyncio.Queue()
    sock = socket.create_server(("127.0.0.1", 0))
    listener = SocketListener([sock], lambda conn, addr: got.put_nowait(conn))
    async with listener:
        assert listener.is_serving()
        port = sock.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        conns = [await asyncio.wait_for(got.get(), 10) for _ in clients]
        for c in conns:
            assert isinstance(c, socket.socket)
            c.close()
        for c in clients:
            c.close()
    assert not listener.is_serving()
    assert sock.fileno() == -1
