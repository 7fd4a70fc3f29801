"""A vchan process whose emulator daemon a test kills or stops (tests/test_emulator_faults.py).

    python emulator_peer.py serve PORT --peers D [--again]
    python emulator_peer.py stream DOMID PORT
    python emulator_peer.py connect DOMID PORT --timeout T

Runs in the emulated domain given by VCHAN_DOMID, on the loop VCHAN_TEST_LOOP
names.  Prints one JSON line per event, each with ``t`` (time.monotonic(),
the same clock in every process, so the test can time what it caused):

* ``{"event": "ready"}`` once serving / connected / waiting;
* ``{"event": "error", "where": ..., "type": ..., "errno": ..., "message": ...}``
  for what failed: ``serve_forever`` (the server stopped), ``connection`` (a
  server's connection), ``read`` (the stream client's reader), ``connect``;
* ``{"event": "flowing", "bytes": n}`` from the stream client once data
  moves both ways;
* ``{"event": "serving again"}``: with ``--again``, after serve_forever()
  failed, the server started anew (on a new emulator daemon) and serves;
* ``{"event": "echoed"}`` from ``connect`` once its connection echoed a byte;
* ``{"event": "exit"}`` last, when stdin closes.

serve: an echo server.  stream: one connection that keeps writing and reading
its echo.  connect: one ``open_connection`` that may wait (a test kills or
stops the daemon while it waits); with a server there, it echoes one byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
from typing import Any

from peer_events import emit_timed as emit
from peer_roles import add_client, add_server, run_on_test_loop

import vchan


def error(where: str, exc: BaseException) -> None:
    emit(event="error", where=where, type=type(exc).__name__,
         errno=getattr(exc, "errno", None), message=str(exc))


async def stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve(args: argparse.Namespace) -> None:
    peers = [int(p) for p in args.peers.split(",")]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except Exception as exc:    # reported to the test
            # The reader holds what the transport died of (drain() only says
            # "Connection lost").
            error("connection", reader.exception() or exc)
        writer.close()

    server = await vchan.start_server(echo, args.port, peers=peers)
    emit(event="ready")
    waiting = asyncio.ensure_future(stdin_closed())
    while True:
        forever = asyncio.ensure_future(server.serve_forever())
        done, _ = await asyncio.wait({forever, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            forever.cancel()
            with contextlib.suppress(BaseException):
                await forever
            break
        exc = forever.exception()
        if exc is None:
            break
        error("serve_forever", exc)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if not args.again:
            await waiting
            break
        # Serve anew: the first use starts a new daemon if the old one is gone.
        while True:
            try:
                server = await vchan.start_server(echo, args.port, peers=peers)
                break
            except Exception as exc2:   # reported to the test
                error("restart", exc2)
                await asyncio.sleep(0.2)
        emit(event="serving again")
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 5)


async def stream(args: argparse.Namespace) -> None:
    reader, writer = await vchan.open_connection(args.domid, args.port, timeout=30)
    emit(event="ready")
    block = os.urandom(65536)
    got = 0

    async def send() -> None:
        while True:
            writer.write(block)
            await writer.drain()

    async def receive() -> None:
        nonlocal got
        said = False
        while data := await reader.read(1 << 20):
            got += len(data)
            if got > 1 << 20 and not said:
                emit(event="flowing", bytes=got)
                said = True
        raise EOFError("the echo server closed the connection")

    sender = asyncio.ensure_future(send())
    try:
        await receive()
    except Exception as exc:        # reported to the test
        error("read", exc)
    sender.cancel()
    with contextlib.suppress(BaseException):
        await sender
    writer.close()
    await stdin_closed()


async def connect(args: argparse.Namespace) -> None:
    emit(event="ready")
    try:
        reader, writer = await vchan.open_connection(args.domid, args.port,
                                                     timeout=args.timeout)
    except Exception as exc:        # reported to the test
        error("connect", exc)
    else:
        writer.write(b"x")
        if await reader.readexactly(1) == b"x":
            emit(event="echoed")
        writer.close()
    await stdin_closed()


def _dump_tasks(*_: object) -> None:
    """SIGUSR1: every task's stack and every thread's, to stderr (a test that
    finds us hanging asks for it)."""
    faulthandler.dump_traceback(all_threads=True)
    loop = _loop
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            task.print_stack(file=sys.stderr)
    sys.stderr.flush()


_loop: asyncio.AbstractEventLoop | None = None


async def _running(coro: Any) -> None:
    global _loop
    _loop = asyncio.get_running_loop()
    await coro


def main() -> None:
    signal.signal(signal.SIGUSR1, _dump_tasks)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_server(sub, "serve", required=True).add_argument("--again", action="store_true")
    add_client(sub, "stream")
    add_client(sub, "connect").add_argument("--timeout", type=float, default=None)
    args = parser.parse_args()
    run_on_test_loop(_running({"serve": serve, "stream": stream, "connect": connect}[args.cmd](
        args)))
    emit(event="exit")


if __name__ == "__main__":
    main()
