"""asyncio streams over vchan: ``open_connection`` and ``start_server``.

Built exactly as ``asyncio.streams`` builds its own: a ``StreamReader``, a
``StreamReaderProtocol`` and a ``StreamWriter`` over a transport from
:func:`vchan.create_connection` / :func:`vchan.create_server`.  Code written
for TCP streams moves to vchan by changing the call that opens them::

    reader, writer = await asyncio.open_connection("10.0.0.2", 8080)
    reader, writer = await vchan.open_connection(2, 8080)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

from ._stream_reader import _DEFAULT_LIMIT, StreamReader
from ._writer import ClientConnected, StreamWriter, _our_writer
from .client import _create_connection, create_connection
from .server import Peers, Server, create_server

if TYPE_CHECKING:
    from .dropin import DropinServer

__all__ = ["StreamReader", "StreamWriter", "open_connection", "start_server"]


@overload
async def open_connection(
    domid: int, port: int | str, *, limit: int = _DEFAULT_LIMIT, timeout: float | None = None,
    read_min: int | None = None, write_min: int | None = None, dedicated: bool | None = None,
    busy_poll: float | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


@overload
async def open_connection(
    host: str, port: int, /, *, limit: int = _DEFAULT_LIMIT, timeout: float | None = None,
    ssl: Any = None, family: int = 0, proto: int = 0, flags: int = 0, sock: Any = None,
    local_addr: tuple[str, int] | None = None, server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None, ssl_shutdown_timeout: float | None = None,
    happy_eyeballs_delay: float | None = None, interleave: int | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


async def open_connection(
    domid: int | str, port: int | str, *, limit: int = _DEFAULT_LIMIT,
    timeout: float | None = None, **options: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to vchan ``port`` of domain ``domid``; a (reader, writer) pair.

    ``limit`` is the reader's buffer limit, as in :func:`asyncio.open_connection`;
    ``timeout``, ``read_min``, ``write_min``, ``dedicated`` and ``busy_poll``
    are those of :func:`vchan.create_connection`.

    With a host name or address (a str) instead of a domid and a TCP port,
    as :func:`asyncio.open_connection`: vchan when a co-resident domain
    serves that address as a drop-in server (and proves it), else TCP;
    the other keyword arguments then go to
    :meth:`asyncio.loop.create_connection`, and ``timeout`` (if given)
    bounds the whole connection set-up.
    """
    loop = asyncio.get_running_loop()
    reader = StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    if isinstance(domid, str):
        if not isinstance(port, int):
            raise TypeError(f"connecting to host {domid!r}: the TCP port must be an int, "
                            f"not {type(port).__name__}")
        connecting = create_connection(lambda: protocol, domid, port, **options)
        transport, _ = await asyncio.wait_for(connecting, timeout)
    else:
        # (the vchan form's keywords are create_connection's: a typo is a TypeError)
        transport, _ = await _create_connection(lambda: protocol, domid, port,
                                                timeout=timeout, **options)
    writer = StreamWriter(transport, protocol, reader, loop)
    return reader, writer


@overload
async def start_server(
    client_connected_cb: ClientConnected, port: int | str, *, peers: Peers,
    limit: int = _DEFAULT_LIMIT, raw: bool = False, read_min: int | None = None,
    write_min: int | None = None, accept_timeout: float = 30.0, start_serving: bool = True,
    sessions: bool = True, busy_poll: float | None = None,
) -> Server: ...


@overload
async def start_server(
    client_connected_cb: ClientConnected, host: str | Sequence[str] | None, port: int, *,
    limit: int = _DEFAULT_LIMIT, **tcp_options: Any,
) -> DropinServer: ...


async def start_server(
    client_connected_cb: ClientConnected, *args: Any, limit: int = _DEFAULT_LIMIT,
    **options: Any,
) -> Server | DropinServer:
    """Serve vchan ``port``; ``client_connected_cb(reader, writer)`` per client:
    ``start_server(cb, port, peers=...)``.  Or serve a TCP address and vchan
    to co-resident domains at once (drop-in): ``start_server(cb, host, port)``.

    The callback may be a plain function or a coroutine function (run as a
    task), as with :func:`asyncio.start_server`; ``limit`` is each reader's
    buffer limit.  ``peers``, ``raw``, ``read_min``, ``write_min``,
    ``accept_timeout``, ``start_serving``, ``sessions`` and ``busy_poll`` are
    those of :func:`vchan.create_server` (for the drop-in form ``grace`` and
    :meth:`asyncio.loop.create_server`'s).
    """
    loop = asyncio.get_running_loop()
    connected = _our_writer(client_connected_cb)

    def factory() -> asyncio.StreamReaderProtocol:
        reader = StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, connected, loop=loop)

    server: Server | DropinServer = await create_server(factory, *args, **options)
    return server
