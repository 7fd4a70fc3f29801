"""A vchan peer process for cross-process tests.

    python vchan_peer.py serve PORT --peers D[,D...] [--raw] [--mode M] [--nbytes N]
    python vchan_peer.py connect DOMID PORT [--mode M] [--nbytes N] [--count C]

Runs in the emulated domain given by VCHAN_DOMID.  Prints JSON lines on
stdout: {"ready": ...} once serving, then one {"result": ...} per
connection.  Modes:

duplex  send N pseudo-random bytes in random chunk sizes while receiving
        everything the peer sends; report SHA-256 of both directions
echo    (server) send back what arrives, until EOF
hold    (client) connect C connections at once, report, keep them until stdin
        closes
many    (client, against an echo server) open C connections at once, send a
        distinct message of N bytes on each, check each echo, close all;
        report the time each phase took and this process's RSS growth
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import time
from typing import Any

import vchan

BLOCK = random.Random(42).randbytes(1 << 20)


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


async def duplex(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nbytes: int,
                 seed: int, *, close: bool = True) -> dict[str, Any]:
    """Send ``nbytes`` pseudo-random bytes (pieces of random sizes, then EOF)
    while reading back what comes until EOF; sizes and SHA-256 of both.
    ``close``: close the writer after."""
    rnd = random.Random(seed)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    t0 = time.perf_counter()

    async def send() -> int:
        sent = 0
        while sent < nbytes:
            n = min(nbytes - sent, rnd.choice([1, 100, 4096, 65536, 1 << 20]),
                    rnd.randrange(1, 1 << 20))
            start = rnd.randrange(0, len(BLOCK) - n + 1)
            chunk = BLOCK[start:start + n]
            writer.write(chunk)
            sent_hash.update(chunk)
            sent += n
            await writer.drain()
        writer.write_eof()
        return sent

    async def receive() -> int:
        got = 0
        while data := await reader.read(1 << 20):
            recv_hash.update(data)
            got += len(data)
        return got

    sent, got = await asyncio.gather(send(), receive())
    dt = time.perf_counter() - t0
    if close:
        writer.close()
        await writer.wait_closed()
    return {"sent": sent, "received": got, "sent_sha256": sent_hash.hexdigest(),
            "received_sha256": recv_hash.hexdigest(), "seconds": dt}


async def serve(args: argparse.Namespace) -> None:
    peers: Any = "any" if args.peers == "any" else [int(p) for p in args.peers.split(",")]
    if args.raw:
        peers = peers[0]
    done = asyncio.Event()
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        me = count
        try:
            if args.mode == "echo":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()
                await writer.wait_closed()
                emit(result={"echoed": me})
            else:
                emit(result=await duplex(reader, writer, args.nbytes, seed=1000 + me))
        except Exception as exc:  # reported to the test
            emit(error=f"{type(exc).__name__}: {exc}")
        if args.connections and me >= args.connections:
            done.set()

    server = await vchan.start_server(handle, args.port, peers=peers, raw=args.raw,
                                      read_min=args.ring, write_min=args.ring)
    emit(ready=vchan.own_domid(), addresses=server.addresses)
    async with server:
        if args.connections:
            await done.wait()
        else:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def many(args: argparse.Namespace) -> dict[str, Any]:
    rss0 = _rss()
    t0 = time.perf_counter()
    pairs = await asyncio.gather(*(
        vchan.open_connection(args.domid, args.port, timeout=args.timeout)
        for _ in range(args.count)))
    t1 = time.perf_counter()
    rss1 = _rss()
    messages = [(b"%08d" % i) * (args.nbytes // 8) for i in range(args.count)]
    for (_, w), message in zip(pairs, messages, strict=True):
        w.write(message)
    echoed = await asyncio.gather(*(r.readexactly(len(m))
                                    for (r, _), m in zip(pairs, messages, strict=True)))
    t2 = time.perf_counter()
    intact = sum(e == m for e, m in zip(echoed, messages, strict=True))
    for _, w in pairs:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in pairs))
    t3 = time.perf_counter()
    return {"connected": len(pairs), "intact": intact, "open_seconds": t1 - t0,
            "echo_seconds": t2 - t1, "close_seconds": t3 - t2,
            "rss_per_connection": (rss1 - rss0) / max(1, args.count)}


async def connect(args: argparse.Namespace) -> None:
    if args.mode == "many":
        try:
            emit(result=await many(args))
        except Exception as exc:  # reported to the test
            emit(error=f"{type(exc).__name__}: {exc}")
        return
    if args.mode == "hold":
        t0 = time.perf_counter()
        sizes = {} if args.ring is None else {"read_min": args.ring, "write_min": args.ring}
        pairs = await asyncio.gather(*(
            vchan.open_connection(args.domid, args.port, timeout=args.timeout, **sizes)
            for _ in range(args.count)))
        emit(result={"connected": len(pairs), "seconds": time.perf_counter() - t0})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for _, w in pairs:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in pairs), return_exceptions=True)
        return
    reader, writer = await vchan.open_connection(args.domid, args.port, timeout=args.timeout,
                                                 read_min=args.ring, write_min=args.ring)
    emit(connected=True)
    try:
        emit(result=await duplex(reader, writer, args.nbytes, seed=args.seed))
    except Exception as exc:  # reported to the test
        emit(error=f"{type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port")
    s.add_argument("--peers", required=True)
    s.add_argument("--raw", action="store_true")
    s.add_argument("--mode", default="duplex")
    s.add_argument("--nbytes", type=int, default=1 << 20)
    s.add_argument("--connections", type=int, default=0, help="exit after this many")
    s.add_argument("--ring", type=int, default=None)
    c = sub.add_parser("connect")
    c.add_argument("domid", type=int)
    c.add_argument("port")
    c.add_argument("--mode", default="duplex")
    c.add_argument("--nbytes", type=int, default=1 << 20)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=30)
    c.add_argument("--ring", type=int, default=None)
    args = parser.parse_args()
    if args.port.isdigit():
        args.port = int(args.port)
    loop_kind = os.environ.get("VCHAN_TEST_LOOP", "asyncio")
    coro = serve(args) if args.cmd == "serve" else connect(args)
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
