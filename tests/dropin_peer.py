"""A process in one emulated domain for the drop-in tests (tests/test_dropin.py).

    python dropin_peer.py serve --kind dropin|plain [--host H] [--app echo|greet]
    python dropin_peer.py connect HOST PORT [--app echo|greet] [--nbytes N] [--count C]
    python dropin_peer.py advertise PORT ADDRESS

Runs in the domain VCHAN_DOMID, on the loop VCHAN_TEST_LOOP.  Prints JSON
lines on stdout.  ``serve`` prints ``{"ready": tcp port, ...}``, then one
``{"conn": {...}}`` per connection, until stdin closes.  ``connect`` prints
one ``{"result": {...}}`` per connection.  ``advertise`` plays a third
domain that claims somebody else's address in XenStore and serves the vchan
port a client would be sent to: it prints ``{"ready": ...}`` and, for every
vchan stream that reaches it, ``{"contacted": {"peer": domid, "bytes": n}}``
once the stream ends; it answers a claim with an ACCEPT of its own making.

Apps: ``echo`` (the client sends N pseudo-random bytes and reads them back
at once; both report SHA-256) and ``greet`` (server-first: the server says
``220 hello`` at once, the client answers one line, the server echoes it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
import time
from typing import Any

from peer_events import emit
from peer_roles import duplex, run_on_test_loop

import vchan
from vchan import dropin, upgrade
from vchan.xenstore import Perm


def _describe(writer: asyncio.StreamWriter) -> dict[str, Any]:
    return {"via": dropin.via(writer), "extra_via": writer.get_extra_info("vchan_via"),
            "peername": writer.get_extra_info("peername"),
            "sockname": writer.get_extra_info("sockname"),
            "vchan_peer": writer.get_extra_info("vchan_peer")}


async def _stdin_closed() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve(args: argparse.Namespace) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = _describe(writer)
        try:
            if args.app == "greet":
                writer.write(b"220 hello\r\n")
                line = await reader.readline()
                info["first"] = line.decode("latin-1")
                writer.write(b"250 " + line)
            else:
                digest, n = hashlib.sha256(), 0
                first = b""
                while data := await reader.read(1 << 16):
                    if not first:
                        first = data[:32]
                    digest.update(data)
                    n += len(data)
                    writer.write(data)
                    await writer.drain()
                info.update(received=n, received_sha256=digest.hexdigest(),
                            first=first.decode("latin-1"))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except Exception as exc:  # reported to the test
            info["error"] = f"{type(exc).__name__}: {exc}"
        emit(conn=info)

    if args.kind == "plain":
        server: Any = await asyncio.start_server(handle, args.host, 0)
        port = server.sockets[0].getsockname()[1]
        emit(ready=port)
    else:
        server = await vchan.start_server(handle, args.host, 0, grace=args.grace)
        emit(ready=server.port, vchan_port=server.vchan_port, advertised=server.advertised,
             vchan_error=repr(server.vchan_error) if server.vchan_error else None)
    async with server:
        await _stdin_closed()


async def connect_parallel(args: argparse.Namespace) -> None:
    """``count`` connections at once, each echoing its own bytes; one report."""
    t0 = time.perf_counter()
    pairs = await asyncio.gather(*(vchan.open_connection(args.host, args.port)
                                   for _ in range(args.count)))
    opened = time.perf_counter() - t0
    results = await asyncio.gather(*(duplex(r, w, args.nbytes, seed=i, close=False)
                                     for i, (r, w) in enumerate(pairs)))
    vias = [dropin.via(w) for _, w in pairs]
    for _, w in pairs:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in pairs))
    emit(result={"vias": vias, "open_seconds": opened,
                 "intact": sum(r["sent_sha256"] == r["received_sha256"] and
                               r["received"] == args.nbytes for r in results)})


async def connect(args: argparse.Namespace) -> None:
    if args.parallel:
        await connect_parallel(args)
        return
    for i in range(args.count):
        t0 = time.perf_counter()
        try:
            reader, writer = await vchan.open_connection(args.host, args.port)
        except Exception as exc:  # reported to the test
            emit(error=f"{type(exc).__name__}: {exc}")
            continue
        info = _describe(writer)
        info["connect_seconds"] = time.perf_counter() - t0
        if args.app == "greet":
            info["greeting"] = (await reader.readline()).decode("latin-1")
            writer.write(b"HELO client\r\n")
            info["answer"] = (await reader.readline()).decode("latin-1")
        else:
            info.update(await duplex(reader, writer, args.nbytes, seed=i, close=False))
        writer.close()
        await writer.wait_closed()
        emit(result=info)


async def advertise(args: argparse.Namespace) -> None:
    """Claim ``address`` port ``port`` in XenStore as a drop-in server would,
    and catch whatever vchan streams come to the port it would serve."""
    from vchan.hub import _loop_state

    async with _loop_state() as state:
        own = state.own
        assert own is not None
        claim = f"/local/domain/{own}/data/vchan-dropin/{args.port}"
        await state.xs.write(claim, args.address)
        await state.xs.set_perms(claim, [Perm(own, "r")])
        entry = f"{dropin.INDEX}/{own}-{args.port}"
        await state.xs.write(entry, "")
        await state.xs.set_perms(entry, [Perm(own, "r")])

    class Thief(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.bytes = 0

        def data_received(self, data: bytes) -> None:
            if not self.bytes:
                # Accept whatever claim comes: the nonce is the client's secret.
                self.transport.write(upgrade.Accept(secrets.token_bytes(16)).encode())
            self.bytes += len(data)

        def connection_lost(self, exc: Exception | None) -> None:
            emit(contacted={"peer": self.transport.get_extra_info("peername")[0],
                            "bytes": self.bytes})

    peers = [int(p) for p in args.peers.split(",")]
    server = await vchan.create_server(Thief, upgrade.dropin_port(args.port), peers=peers)
    emit(ready=own)
    async with server:
        await _stdin_closed()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--kind", choices=["dropin", "plain"], default="dropin")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--app", choices=["echo", "greet"], default="echo")
    s.add_argument("--grace", type=float, default=dropin.GRACE)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--app", choices=["echo", "greet"], default="echo")
    c.add_argument("--nbytes", type=int, default=100_000)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--parallel", action="store_true", help="the connections at once")
    a = sub.add_parser("advertise")
    a.add_argument("port", type=int)
    a.add_argument("address")
    a.add_argument("--peers", default="2")
    args = parser.parse_args()
    run_on_test_loop({"serve": serve, "connect": connect, "advertise": advertise}[args.cmd](args))


if __name__ == "__main__":
    main()
