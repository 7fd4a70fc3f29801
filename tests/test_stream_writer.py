"""vchan.StreamWriter's drain() behaves exactly as asyncio.StreamWriter's.

``drain()`` with nothing to wait for returns one shared awaitable that is
over at once (``vchan._reader.DONE``) instead of making two coroutines.
These tests put both writers in every state a drain can meet and require
the same outcome after the same number of loop iterations, and require the
shared awaitable to be taken by asyncio as the coroutine it stands for.
"""

from __future__ import annotations

import asyncio
import collections.abc
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from domains import DomainProcess

import vchan
from vchan import _reader
from vchan.streams import StreamReader, StreamWriter

pytestmark = pytest.mark.asyncio


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def _writer(cls: type[asyncio.StreamWriter]) -> tuple[Any, Any, Any]:
    loop = asyncio.get_running_loop()
    reader = StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return cls(transport, protocol, reader, loop), protocol, transport


# Each state: what is done to (protocol, transport, reader) before drain();
# and what happens after the first loop iteration (a paused writer resumed).
STATES: dict[str, tuple[Callable[[Any, Any, Any], object], Callable[[Any], object]]] = {
    "fresh": (lambda p, t, r: None, lambda p: None),
    "paused, then resumed": (lambda p, t, r: p.pause_writing(), lambda p: p.resume_writing()),
    "paused and resumed before": (lambda p, t, r: (p.pause_writing(), p.resume_writing()),
                                  lambda p: None),
    "paused, then lost": (lambda p, t, r: p.pause_writing(), lambda p: p.connection_lost(None)),
    "reader exception": (lambda p, t, r: r.set_exception(ValueError("boom")), lambda p: None),
    "transport closing": (lambda p, t, r: setattr(t, "closing", True), lambda p: None),
    "connection lost": (lambda p, t, r: p.connection_lost(None), lambda p: None),
    "connection lost with an error": (
        lambda p, t, r: p.connection_lost(OSError("gone")), lambda p: None),
}


async def _drain_outcome(cls: type[asyncio.StreamWriter], state: str) -> tuple[Any, ...]:
    before, after_first = STATES[state]
    writer, protocol, transport = _writer(cls)
    before(protocol, transport, writer._reader)
    task = asyncio.ensure_future(writer.drain())
    iterations = 0
    try:
        while not task.done() and iterations < 5:
            await asyncio.sleep(0)
            iterations += 1
            if iterations == 1:
                after_first(protocol)
        if not task.done():
            task.cancel()
            return ("pending", iterations)
        exc = task.exception()
        return (iterations, None if exc is None else (type(exc), str(exc)))
    finally:
        writer.close()


@pytest.mark.parametrize("state", list(STATES))
async def test_drain_is_asyncios_in_every_state(state: str) -> None:
    assert await _drain_outcome(StreamWriter, state) == \
        await _drain_outcome(asyncio.StreamWriter, state)


async def test_a_drain_with_nothing_to_wait_for_makes_nothing() -> None:
    writer, protocol, _ = _writer(StreamWriter)
    assert writer.drain() is _reader.DONE
    protocol.pause_writing()
    waiting = writer.drain()
    assert waiting is not _reader.DONE          # asyncio's coroutine, which waits
    protocol.resume_writing()
    assert await waiting is None
    writer.close()


async def test_the_done_drain_is_a_coroutine_to_asyncio() -> None:
    writer, _, _ = _writer(StreamWriter)
    done: Any = writer.drain()
    assert isinstance(writer.drain(), collections.abc.Coroutine)
    assert asyncio.iscoroutine(writer.drain())
    assert await done is None and await done is None      # shared: awaited any number of times
    assert await asyncio.create_task(writer.drain()) is None
    assert await asyncio.wait_for(writer.drain(), 1) is None
    assert list(await asyncio.gather(writer.drain(), writer.drain())) == [None, None]
    # The coroutine protocol, as a coroutine that has not started.
    with pytest.raises(StopIteration):
        done.send(None)
    with pytest.raises(KeyError):
        done.throw(KeyError("k"))
    with pytest.raises(KeyError):
        done.throw(KeyError)
    assert done.close() is None
    assert done.cr_await is None
    assert done.__qualname__ == "StreamWriter.drain"
    assert "drain" in repr(asyncio.ensure_future(writer.drain()))
    assert list(done.__await__()) == []
    writer.close()


async def test_writes_and_drains_in_a_loop_reach_the_transport() -> None:
    writer, _, transport = _writer(StreamWriter)
    for i in range(100):
        writer.write(b"%d," % i)
        await writer.drain()
    assert b"".join(transport.written) == b"".join(b"%d," % i for i in range(100))
    writer.close()


# -- the writers open_connection() and start_server() give ------------------------------

_domids = itertools.count(390)


@pytest.fixture
def server(sim_dir: Path) -> Iterator[DomainProcess]:
    with DomainProcess(next(_domids)) as proc:
        proc("import asyncio, threading, vchan\n"
             "loop = asyncio.new_event_loop()\n"
             "threading.Thread(target=loop.run_forever, daemon=True).start()\n"
             "async def tell(r, w):\n"
             "    await r.read(1)\n"
             "    w.write(type(w).__module__.encode() + b'.' + type(w).__name__.encode())\n"
             "    await w.drain(); w.close(); await w.wait_closed()\n"
             "srv = asyncio.run_coroutine_threadsafe(vchan.start_server(tell, 'writer', "
             "peers=0), loop).result()")
        yield proc
        proc("asyncio.run_coroutine_threadsafe(srv.__aexit__(None, None, None), loop).result()")


async def test_open_connection_and_start_server_give_vchan_writers(
        server: DomainProcess) -> None:
    assert vchan.StreamWriter is StreamWriter and issubclass(StreamWriter, asyncio.StreamWriter)
    reader, writer = await vchan.open_connection(server.domid, "writer", timeout=30)
    assert type(writer) is StreamWriter
    writer.write(b"?")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b"vchan._writer.StreamWriter"
    writer.close()
    await writer.wait_closed()
