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
from collections.abc import Awaitable, Callable
from typing import Any

from .client import create_connection
from .server import Peers, Server, create_server

__all__ = ["open_connection", "start_server"]

_DEFAULT_LIMIT = 2**16   # asyncio.streams' own default

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


async def open_connection(
    domid: int, port: int | str, *, limit: int = _DEFAULT_LIMIT, timeout: float | None = None,
    **ring_options: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to vchan ``port`` of domain ``domid``; a (reader, writer) pair.

    ``timeout`` bounds the wait for a server that is not there yet;
    ``ring_options`` (``read_min``, ``write_min``) go to
    :func:`vchan.create_connection`.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, domid, port, timeout=timeout,
                                           **ring_options)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(
    client_connected_cb: ClientConnected, port: int | str, *, peers: Peers,
    limit: int = _DEFAULT_LIMIT, **ring_options: Any,
) -> Server:
    """Serve vchan ``port``; ``client_connected_cb(reader, writer)`` per client.

    The callback may be a plain function or a coroutine function (run as a
    task), as with :func:`asyncio.start_server`.  ``peers`` and
    ``ring_options`` (``raw``, ``read_min``, ``write_min``,
    ``accept_timeout``) go to :func:`vchan.create_server`.
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, port, peers=peers, **ring_options)
