"""vchan.StreamWriter: asyncio's StreamWriter with a drain() that makes nothing
when there is nothing to wait for (docs/streams.md)."""

from __future__ import annotations

import asyncio
import collections.abc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import _reader

__all__ = ["StreamWriter"]

# What start_server() calls per client (asyncio's client_connected_cb).
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]

# What drain() returns with nothing to wait for: over at once, shared by every
# call (vchan/_reader.c); create_task(), wait_for() and gather() take it as the
# coroutine it stands for.
collections.abc.Coroutine.register(_reader.Done)


class StreamWriter(asyncio.StreamWriter):
    """An :class:`asyncio.StreamWriter` whose ``drain()`` costs no coroutine
    when there is nothing to wait for.

    asyncio's ``drain()`` is a coroutine that awaits another
    (``_drain_helper()``): two coroutine objects and their frames on every
    call, about 0.4 us here, most of a small write's cost when the writer
    is not paused.  This one checks what those two check (the reader's
    exception, a closing transport, a lost connection, a paused protocol)
    and, when none holds, returns one shared awaitable that is over at once
    (``vchan._reader.DONE``); otherwise it is asyncio's ``drain()``.
    ``open_connection()`` and ``start_server()`` give writers of this class.
    """

    _protocol: Any              # (asyncio's attributes, which typeshed leaves out)
    _reader: Any
    _transport: asyncio.WriteTransport

    def drain(self) -> Coroutine[Any, Any, None]:
        """Wait until it is appropriate to resume writing (asyncio's drain())."""
        protocol = self._protocol
        reader = self._reader
        if not protocol._paused and not protocol._connection_lost \
                and (reader is None or reader._exception is None) \
                and not self._transport.is_closing():
            return _reader.DONE
        return super().drain()


def _our_writer(connected: ClientConnected) -> ClientConnected:
    """``connected``, given a :class:`StreamWriter` (asyncio's protocol makes
    an ``asyncio.StreamWriter``; same layout, so its class can change)."""

    def give(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if type(writer) is asyncio.StreamWriter:
            writer.__class__ = StreamWriter
        return connected(reader, writer)

    return give
