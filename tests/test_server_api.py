"""``vchan.Server`` has what ``asyncio.Server`` has on the running Python, and
behaves as it does: each scenario runs once on a TCP ``asyncio.Server`` (the
control) and once on a vchan server, and the two traces must be equal.

The one difference kept on purpose: on Python 3.11, asyncio's
``wait_closed()`` returns at once after ``close()``; vchan's waits for the
connections as asyncio's does from 3.12 on (so that part of the trace is
only compared from 3.12).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import vchan

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Start = Callable[..., Awaitable[Any]]

_ports = itertools.count(1)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _kinds(sim_dir: Path) -> dict[str, tuple[Start, Callable[[Any], Connect]]]:
    """(start a server with a callback, connect to it) for TCP and for vchan."""

    async def tcp_start(cb: Any, **kw: Any) -> asyncio.Server:
        return await asyncio.start_server(cb, "127.0.0.1", 0, **kw)

    def tcp_connect(server: Any) -> Connect:
        port = server.sockets[0].getsockname()[1]
        return lambda: asyncio.open_connection("127.0.0.1", port)

    async def vchan_start(cb: Any, **kw: Any) -> vchan.Server:
        port = f"api{next(_ports)}"
        server: vchan.Server = await vchan.start_server(cb, port, peers=vchan.own_domid(), **kw)
        return server

    def vchan_connect(server: Any) -> Connect:
        domid, port = server.sockets[0].getsockname()
        return lambda: vchan.open_connection(domid, port, timeout=10)

    return {"tcp": (tcp_start, tcp_connect), "vchan": (vchan_start, vchan_connect)}


def test_every_public_name_of_asyncio_server_is_there_in_the_same_form() -> None:
    names = [n for n in dir(asyncio.Server) if not n.startswith("_")] + [
        "__aenter__", "__aexit__"]
    if sys.version_info >= (3, 13):
        assert {"close_clients", "abort_clients"} <= set(names)
    for name in names:
        theirs = inspect.getattr_static(asyncio.Server, name)
        ours = inspect.getattr_static(vchan.Server, name, None)
        assert ours is not None, f"vchan.Server lacks {name}"
        assert isinstance(ours, property) == isinstance(theirs, property), name
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        if callable(theirs) and not isinstance(theirs, property):
            # The same parameters (asyncio's are all positional-or-keyword).
            assert list(inspect.signature(ours).parameters) == \
                list(inspect.signature(theirs).parameters), name


async def _lifecycle(start: Start, connect_to: Callable[[Any], Connect]) -> list[Any]:
    trace: list[Any] = []
    loop = asyncio.get_running_loop()
    server = await start(_echo)
    connect = connect_to(server)
    trace += ["serving", server.is_serving(), server.get_loop() is loop, len(server.sockets)]
    reader, writer = await connect()
    writer.write(b"ping")
    trace += ["echo", await reader.readexactly(4)]
    server.close()
    trace += ["closed", server.is_serving(), len(server.sockets)]
    writer.write(b"still")          # close() leaves accepted connections open
    trace += ["open connection", await reader.readexactly(5)]
    waiting = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0.1)
    if sys.version_info >= (3, 12):
        trace += ["wait_closed waits for connections", not waiting.done()]
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(waiting, 10)
    trace += ["wait_closed done", waiting.done()]
    with pytest.raises(RuntimeError, match="is closed"):
        await server.serve_forever()
    return trace


async def _serve_forever(start: Start, connect_to: Callable[[Any], Connect]) -> list[Any]:
    trace: list[Any] = []
    server = await start(_echo, start_serving=False)
    trace += ["not started", server.is_serving()]
    task = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0.1)
    trace += ["serving", server.is_serving()]
    with pytest.raises(RuntimeError, match="already being awaited"):
        await server.serve_forever()
    reader, writer = await connect_to(server)()
    writer.write(b"x")
    trace += ["echo", await reader.readexactly(1)]
    writer.close()
    await writer.wait_closed()
    task.cancel()
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.CancelledError:
        trace += ["cancelled"]
    trace += ["closed by the cancel", server.is_serving(), len(server.sockets)]
    # async with: closes on the way out.
    async with await start(_echo) as other:
        trace += ["in async with", other.is_serving()]
    trace += ["after async with", other.is_serving()]
    return trace


async def _wait_closed_before_close(start: Start, connect_to: Callable[[Any], Connect]
                                    ) -> list[Any]:
    server = await start(_echo)
    waiting = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0.1)
    trace: list[Any] = ["waits for close()", not waiting.done()]
    server.close()
    await asyncio.wait_for(waiting, 10)
    return [*trace, "then returns", waiting.done()]


async def _clients(start: Start, connect_to: Callable[[Any], Connect], how: str) -> list[Any]:
    server = await start(_echo)
    reader, writer = await connect_to(server)()
    writer.write(b"hi")
    trace: list[Any] = [await reader.readexactly(2)]
    getattr(server, how)()
    try:
        trace += ["peer sees the end", await asyncio.wait_for(reader.read(10), 10)]
    except ConnectionResetError:
        trace += ["peer sees the end", b""]     # an abort may arrive as a reset
    writer.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)
    return trace


@pytest.mark.parametrize("scenario", [_lifecycle, _serve_forever, _wait_closed_before_close])
async def test_vchan_server_behaves_as_asyncio_server(sim_dir: Path, scenario: Any) -> None:
    traces = {kind: await scenario(start, connect) for kind, (start, connect)
              in _kinds(sim_dir).items()}
    assert traces["vchan"] == traces["tcp"]


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
async def test_close_and_abort_clients(sim_dir: Path, how: str) -> None:
    """asyncio has them from 3.13; vchan on every version (compared from 3.13)."""
    kinds = _kinds(sim_dir)
    ours = await _clients(*kinds["vchan"], how)
    assert ours == [b"hi", "peer sees the end", b""]
    if sys.version_info >= (3, 13):
        assert await _clients(*kinds["tcp"], how) == ours


def test_sockets_stand_for_the_served_address() -> None:
    address = vchan.server.ServerAddress(3, "web")
    assert address.getsockname() == (3, "web")
    assert address.fileno() == -1
    with pytest.raises(OSError, match="no peer"):
        address.getpeername()
    assert address == vchan.server.ServerAddress(3, "web")
    assert "domid=3" in repr(address)


# -- typed keyword arguments: a typo is an error for mypy and at run time --------

_TYPOS = {
    "open_connection": "vchan.open_connection(1, 80, read_mn=4096)",
    "start_server": "vchan.start_server(cb, 80, peers=2, read_mn=4096)",
    "create_connection": "vchan.create_connection(asyncio.Protocol, 1, 80, read_mn=4096)",
    "create_server": "vchan.create_server(asyncio.Protocol, 80, peers=2, read_mn=4096)",
}


@pytest.mark.parametrize("call", sorted(_TYPOS))
async def test_a_misspelt_option_is_a_type_error(call: str) -> None:
    def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    with pytest.raises(TypeError, match="read_mn"):
        await eval(_TYPOS[call], {"vchan": vchan, "asyncio": asyncio, "cb": cb})


def test_a_misspelt_option_is_a_mypy_error(tmp_path: Path) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    lines = ["import asyncio", "import vchan", "",
             "def cb(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None: ...", "",
             "async def main() -> None:"]
    lines += [f"    await {expr}" for expr in _TYPOS.values()]
    lines += ["    await vchan.open_connection(1, 80, read_min=4096, busy_poll=50e-6)",
              "    await vchan.start_server(cb, 80, peers=2, raw=True, accept_timeout=5.0)"]
    (tmp_path / "typo.py").write_text("\n".join(lines) + "\n")
    out, _, status = mypy_api.run(["--strict", "--no-incremental", "--follow-imports=silent",
                                   str(tmp_path / "typo.py")])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1
    # One error or more on each typo's line (an overloaded function may add
    # "no overload variant matches"), none on the last two lines.
    lines_with_errors = {int(e.split(":")[1]) for e in errors}
    typo_lines = set(range(7, 7 + len(_TYPOS)))
    assert lines_with_errors == typo_lines, out
    assert 'Unexpected keyword argument "read_mn"' in out, out
