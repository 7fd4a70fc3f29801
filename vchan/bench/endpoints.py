"""Listening and connecting on each transport the suite compares.

One place for the four ways in: vchan by ``(domid, port)``, a Unix socket,
TCP on 127.0.0.1 (``TCP_NODELAY``) and vchan's drop-in by host and port.
A server child listens (:func:`listen`), says ready with its address, and
waits for its measurement's result (:func:`serve_until`); a client child
connects to that address (:func:`connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .common import BACKLOG, BenchError, Json

#: A streams server's callback.
StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport (asyncio and uvloop set it too; be sure)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def listen(cmd: Json, factory: Callable[[], asyncio.BaseProtocol] | None,
                 callback: StreamCallback | None) -> tuple[Any, Json]:
    """Listen on the command's transport: with a protocol factory, or streams."""
    transport = cmd["transport"]
    loop = asyncio.get_running_loop()
    if transport == "vchan":
        import vchan

        port, peer = cmd["port"], cmd["peer"]
        ring = cmd.get("ring_size")
        sizes = {"read_min": ring, "write_min": ring} if ring else {}
        if callback is not None:
            vserver = await vchan.start_server(callback, port, peers=peer, **sizes,
                                               busy_poll=cmd.get("busy_poll"))
        else:
            assert factory is not None
            vserver = await vchan.create_server(factory, port, peers=peer, **sizes)
        return vserver, {"domid": vserver.own, "port": port}
    if transport == "dropin":
        import vchan

        dserver: Any
        if callback is not None:
            dserver = await vchan.start_server(callback, "127.0.0.1", 0)
        else:
            assert factory is not None
            dserver = await vchan.create_server(factory, "127.0.0.1", 0)
        return dserver, {"host": "127.0.0.1", "port": dserver.port}
    server: asyncio.Server
    if transport == "unix":
        path = cmd["path"]
        if callback is not None:
            server = await asyncio.start_unix_server(callback, path, backlog=BACKLOG)
        else:
            assert factory is not None
            server = await loop.create_unix_server(factory, path, backlog=BACKLOG)
        return server, {"path": path}
    if callback is not None:
        server = await asyncio.start_server(callback, "127.0.0.1", 0, backlog=BACKLOG)
    else:
        assert factory is not None
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=BACKLOG)
    return server, {"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1]}


async def serve_until(cmd: Json, emit: Callable[..., None], done: asyncio.Future[Json],
                      listening: Awaitable[tuple[Any, Json]]) -> Json:
    """Listen (``listening``: a server and its address), say ready, wait for
    ``done``; then stop listening and tidy up."""
    server, address = await listening
    try:
        emit(ready=True, address=address)
        return await done
    finally:
        server.close()
        await server.wait_closed()
        if cmd["transport"] == "unix":
            with contextlib.suppress(OSError):
                os.unlink(cmd["path"])


def one_connection(done: asyncio.Future[Json],
                   handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                    Awaitable[Json]]) -> StreamCallback:
    """A streams server callback that measures one connection: ``handle``'s
    result (or its error) goes to ``done``; later connections are closed."""
    async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if done.done():             # one connection per measurement
            writer.close()
            return
        try:
            nodelay(writer.transport)
            result = await handle(reader, writer)
            writer.close()
            await writer.wait_closed()
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            writer.close()
            raise
        if not done.done():
            done.set_result(result)

    return callback


async def _unix_connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A Unix-socket connection, waiting while the server's listen backlog is full.

    There a non-blocking connect() fails with EAGAIN (not EINPROGRESS: nothing
    is under way), which asyncio's selector loop takes for a connect in
    progress: the socket turns writable at once with no error and is handed
    over unconnected (its first write fails with ENOTCONN or EINVAL).  A
    client opening thousands at once tries again, as a blocking connect()
    would wait.
    """
    delay = 1e-4
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.01)
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock)


async def connect(cmd: Json) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the address a server child gave, on the command's transport."""
    transport, address = cmd["transport"], cmd["address"]
    if transport == "vchan":
        import vchan

        return await vchan.open_connection(address["domid"], address["port"],
                                           timeout=cmd["timeout"],
                                           dedicated=cmd.get("dedicated", False),
                                           busy_poll=cmd.get("busy_poll"))
    if transport == "unix":
        return await _unix_connect(address["path"])
    if transport in ("dropin", "dropin-tcp"):
        import vchan

        # (no timeout: as asyncio.open_connection is called for plain TCP;
        # the whole measurement is bounded by the command's timeout)
        reader, writer = await vchan.open_connection(address["host"], address["port"])
        if transport == "dropin" and vchan.dropin.via(writer) != "vchan":
            raise BenchError("a drop-in connection to a drop-in server did not upgrade")
        nodelay(writer.transport)
        return reader, writer
    reader, writer = await asyncio.open_connection(address["host"], address["port"])
    nodelay(writer.transport)
    return reader, writer
