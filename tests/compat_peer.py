"""vchan's side of the compatibility tests with C libxenvchan peers.

    python compat_peer.py client SERVER PORT --send FILE --expect FILE --closer WHO
    python compat_peer.py server PEER PORT --send FILE --expect FILE --closer WHO
                          [--read-min N --write-min N]

Runs in the emulated domain VCHAN_DOMID, as a separate process from the
test (tests/test_compat.py).  It makes its domain exist at once, says
``{"ready": domid}`` and then:

client  waits for a line on stdin, then ``vchan.open_connection(SERVER, PORT)``;
server  ``vchan.start_server(..., peers=PEER, raw=True)``: a raw libxenvchan
        server for one connection.

Once connected it says ``{"connected": {"read_size", "write_size"}}`` (the
ring sizes, i.e. the orders the server chose), then at once writes the
contents of SEND and reads exactly as many bytes as EXPECT holds, and says
``{"received": n, "match": bool}``.  Then, ``--closer self``: waits for a
line on stdin if ``--go-to-close``, closes, says ``{"closed": true}``;
``--closer peer``: reads to end of stream, says ``{"eof": true, "extra": n}``
(n bytes that came after EXPECT), and closes.  An exception is
``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from peer_events import emit

import vchan
from vchan.devices import GrantMapper


async def stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   args: argparse.Namespace) -> None:
    ring = writer.transport.get_extra_info("endpoint").ring
    emit(connected={"read_size": ring.read_size, "write_size": ring.write_size})
    with open(args.send, "rb") as f:
        send = f.read()
    with open(args.expect, "rb") as f:
        expect = f.read()

    async def write() -> None:
        writer.write(send)
        await writer.drain()

    _, got = await asyncio.gather(write(), reader.readexactly(len(expect)))
    emit(received=len(got), match=got == expect)
    if args.closer == "self":
        if args.go_to_close:
            await stdin_line()
        writer.close()
        await writer.wait_closed()
        emit(closed=True)
    else:
        extra = 0
        while data := await reader.read(65536):
            extra += len(data)
        emit(eof=True, extra=extra)
        writer.close()
        await writer.wait_closed()


async def client(args: argparse.Namespace) -> None:
    await stdin_line()
    reader, writer = await vchan.open_connection(args.domid, args.port, timeout=30)
    await exchange(reader, writer, args)


async def server(args: argparse.Namespace) -> None:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await exchange(reader, writer, args)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        if not done.done():
            done.set_result(None)

    srv = await vchan.start_server(handle, args.port, peers=args.domid, raw=True,
                                   read_min=args.read_min, write_min=args.write_min)
    try:
        await done
    finally:
        srv.close()
        await srv.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client", "server"])
    parser.add_argument("domid", type=int, help="the server's (client) or the peer's domain")
    parser.add_argument("port")
    parser.add_argument("--send", required=True)
    parser.add_argument("--expect", required=True)
    parser.add_argument("--closer", choices=["self", "peer"], required=True)
    parser.add_argument("--go-to-close", action="store_true")
    parser.add_argument("--read-min", type=int, default=None)
    parser.add_argument("--write-min", type=int, default=None)
    args = parser.parse_args()
    presence = GrantMapper()        # our domain exists from now on
    emit(ready=vchan.own_domid())
    try:
        asyncio.run(client(args) if args.role == "client" else server(args))
    except Exception as exc:  # reported to the test
        emit(error=f"{type(exc).__name__}: {exc}")
    finally:
        presence.close()


if __name__ == "__main__":
    main()
