#!/usr/bin/env python3
"""vchan against Unix-socket and TCP loopback, through asyncio: ``vchan bench``.

What it measures
----------------
Server and client are two SEPARATE processes for every transport:
**vchan** between emulated domains 1 and 2 of a private emulator at its
default settings (1,024 grant pages per domain; with ``VCHAN_SIM_DIR`` set,
that emulator is used as it is; on real Xen both processes are in this
domain), **unix** and **tcp** (127.0.0.1,
``TCP_NODELAY``) -- each on the default asyncio loop and on uvloop.

1. **bulk**: the client writes N bytes (``--bytes``; small writes send
   fewer, ``--max-writes``) as ``write(block); await drain()`` with blocks
   of each ``--sizes``, then ``write_eof()``; the server receives with the
   streams API (``reader.read(1 MiB)``), a plain ``Protocol`` or a
   ``BufferedProtocol`` with one 1 MiB buffer.  ``--directions both``: each
   side writes N bytes while reading the other's (streams API); the rate is
   the sum.  Rates are taken at the receiver, from its first delivery to EOF.
   vchan runs at the default ring size and, for the ring-size sweep, at each
   ``--ring-sizes``.
2. **pingpong**: 64 B and 4 KiB messages echoed (``readexactly``), warm-up
   then timed round trips at the client: rt/s, p50/p99/p99.9 and the whole
   distribution (``cdf_us``).
3. **connections**: 1, 10, 100, 1,000, 10,000 connections opened at once; each says
   hello and waits for the server's ack (all idle: memory per connection is
   the RSS growth of each process / N), then all send their share of
   ``connection_bytes`` at once: aggregate MB/s.
4. **setup**: connect + one byte echoed + close, one after another:
   connections/s and latency.
5. **matrix**: the streams API as users write it -- StreamReader ``limit``
   x read style (``read(n)``, ``readexactly`` framing, ``readline``) x write
   style (``write(n)`` + ``drain()``, ``writelines``), each cell bounded in
   bytes and time: see :mod:`vchan.bench.matrix`.

Bulk, ping-pong and matrix measurements are repeated (``--repeat``) and the
median kept.  Bulk and matrix rows record the CPU time per byte of both
processes (``server_cpu_ns_per_byte``, ``client_cpu_ns_per_byte``).
Single-core memcpy bandwidth is measured in the same run, for the targets.
Output: progress and an estimate of the time left on stderr, the Markdown
report (:mod:`vchan.bench.report`) on stdout, and ``results.json``,
``report.md`` and PNG plots in ``--out``.

How to run
----------
::

    vchan bench --quick                       # under a minute
    vchan bench --out docs/bench              # the full suite
    vchan bench --cases pingpong --loops uvloop --rounds 50000
    vchan bench --cases matrix --matrix-limits 64K,1M --matrix-writes write-64,writelines

Process structure: the command starts itself twice more with a hidden
``--role server`` / ``--role client``; the parent sends each one command per
measurement as a JSON line on its stdin and reads JSON lines back (the
server answers ``ready`` before the client is told to connect, and each
answers ``result`` or ``error``).  Each measurement runs on a fresh event
loop in both children.  The children die with the parent (``PR_SET_PDEATHSIG``)
and are killed on any error; a failed many-connections measurement is
recorded and the children restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .machine import machine_info

TRANSPORTS = ("vchan", "unix", "tcp")
LOOPS = ("asyncio", "uvloop")
RECEIVERS = ("streams", "protocol", "buffered")
CASES = ("bulk", "pingpong", "connections", "setup", "matrix", "dropin")
# The drop-in case's paths: plain TCP; a drop-in client (vchan.open_connection
# by host and port) to a plain TCP server, so it falls back; a drop-in client
# to a drop-in server (vchan.start_server(cb, host, port)), upgraded to vchan;
# and vchan by (domid, port).
DROPIN_PATHS = ("tcp", "dropin-tcp", "dropin", "vchan")
REPEATED = ("bulk", "pingpong", "matrix", "dropin")    # cases measured --repeat times
DIRECTIONS = ("one", "both")
READ_SIZE = 1 << 20                 # reader.read() size and the BufferedProtocol's buffer
BACKLOG = 4096                      # listen backlog (Linux's somaxconn): many arrive at once
VCHAN_SERVER_DOMID = 1
VCHAN_CLIENT_DOMID = 2

Json = dict[str, Any]


class BenchError(RuntimeError):
    """A measurement failed (in this process or in a child)."""


# ---------------------------------------------------------------------------
# Sizes and small helpers.
# ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    value = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def _us_list(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not microseconds: {text!r}") from None
    if any(not 0 <= v <= 1e6 for v in values):
        raise argparse.ArgumentTypeError(f"microseconds from 0 to 1,000,000: {text!r}")
    return values


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _percentiles_us(samples_ns: list[int]) -> Json:
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1e3

    return {"p50_us": pct(50), "p99_us": pct(99), "p99.9_us": pct(99.9),
            "mean_us": statistics.fmean(s) / 1e3, "min_us": s[0] / 1e3, "n": len(s),
            # The distribution, for plots: the latency at each 0.1 % quantile.
            "cdf_us": [s[min(len(s) - 1, i * len(s) // 1000)] / 1e3 for i in range(1001)]}


def _rss() -> tuple[int, int]:
    """(resident bytes, of which shared memory such as ring pages) of this process."""
    fields: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssShmem", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("RssShmem", 0) + fields.get("RssFile", 0)


async def _send_bulk(writer: asyncio.StreamWriter, nbytes: int, size: int) -> int:
    """Write nbytes in size-byte writes (write + drain each), then EOF; the count."""
    block = random.Random(size).randbytes(size)
    full, rest = divmod(nbytes, size)
    write, drain = writer.write, writer.drain
    for _ in range(full):
        write(block)
        await drain()
    if rest:
        write(block[:rest])
        await drain()
    writer.write_eof()
    return full + (1 if rest else 0)


def cpu_seconds() -> float:
    """CPU time of this process so far, user + sys (``getrusage(RUSAGE_SELF)``)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _matrix() -> Any:
    """:mod:`vchan.bench.matrix` (imported late: it imports this module)."""
    from . import matrix

    return matrix


def _nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport (asyncio and uvloop set it too; be sure)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_on(loop_kind: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a fresh event loop of the given kind."""
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# ---------------------------------------------------------------------------
# The server child: one listener per command, one connection on it.
# ---------------------------------------------------------------------------


class _BulkCounter:
    """Shared bookkeeping of the two protocol receivers."""

    def __init__(self, done: asyncio.Future[Json]) -> None:
        self.done = done
        self.transport: asyncio.BaseTransport | None = None
        self.total = 0
        self.first = 0
        self.calls = 0
        self.t0 = 0.0
        self.t1 = 0.0
        self.cpu0 = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.cpu0 = cpu_seconds()
        _nodelay(transport)

    def got(self, n: int) -> None:
        if not self.calls:
            self.t0 = time.perf_counter()
            self.first = n
        self.calls += 1
        self.total += n

    def eof_received(self) -> None:
        self.t1 = time.perf_counter()     # returning None: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None:
            self.done.set_exception(exc)
        elif not self.t1:
            self.done.set_exception(BenchError("connection lost before EOF"))
        else:
            self.done.set_result(dict(_bulk_result(self.total, self.first, self.calls,
                                                   self.t0, self.t1),
                                      cpu_seconds=cpu_seconds() - self.cpu0))


class CountingProtocol(asyncio.Protocol):
    """Counts what ``data_received`` gets."""

    def __init__(self, done: asyncio.Future[Json]) -> None:
        self.c = _BulkCounter(done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.c.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.c.got(len(data))

    def eof_received(self) -> None:
        self.c.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.c.connection_lost(exc)


class CountingBufferedProtocol(asyncio.BufferedProtocol):
    """Receives into one preallocated buffer and counts."""

    def __init__(self, done: asyncio.Future[Json]) -> None:
        self.c = _BulkCounter(done)
        self.view = memoryview(bytearray(READ_SIZE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.c.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.c.got(nbytes)

    def eof_received(self) -> None:
        self.c.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.c.connection_lost(exc)


def _bulk_result(total: int, first: int, calls: int, t0: float, t1: float) -> Json:
    seconds = t1 - t0
    after = total - first
    if after <= 0 or seconds <= 0:
        raise BenchError(f"everything ({total} B) arrived in one piece: use more --bytes")
    return {"bytes": total, "seconds": seconds, "bytes_per_s": after / seconds,
            "first_delivery_bytes": first, "deliveries": calls}


async def _stream_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
    total = first = calls = 0
    t0 = 0.0
    read = reader.read
    while data := await read(READ_SIZE):
        if not calls:
            t0 = time.perf_counter()
            first = len(data)
        calls += 1
        total += len(data)
    t1 = time.perf_counter()
    return _bulk_result(total, first, calls, t0, t1)


async def _stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       size: int) -> Json:
    rounds = 0
    cpu0 = cpu_seconds()
    readexactly, write, drain = reader.readexactly, writer.write, writer.drain
    while True:
        try:
            data = await readexactly(size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            break
        write(data)
        await drain()
        rounds += 1
    return {"echoed": rounds, "cpu_seconds": cpu_seconds() - cpu0}


async def _listen(cmd: Json, factory: Callable[[], asyncio.BaseProtocol] | None,
                  callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     Awaitable[None]] | None) -> tuple[Any, Json]:
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
                                               busy_poll=cmd.get("busy_poll") or None)
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


async def _serve_until(cmd: Json, emit: Callable[..., None], done: asyncio.Future[Json],
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
                                    Awaitable[Json]],
                   ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A streams server callback that measures one connection: ``handle``'s
    result (or its error) goes to ``done``; later connections are closed."""
    async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if done.done():             # one connection per measurement
            writer.close()
            return
        try:
            _nodelay(writer.transport)
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


async def serve_one(cmd: Json, emit: Callable[..., None]) -> Json:
    """Listen, report ready, handle exactly one connection, report its result."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Json] = loop.create_future()
    factory: Callable[[], asyncio.BaseProtocol] | None = None
    callback = None
    receiver = cmd.get("receiver", "streams")
    if cmd["case"] == "bulk" and receiver == "protocol":
        def factory() -> asyncio.BaseProtocol:
            return CountingProtocol(done)
    elif cmd["case"] == "bulk" and receiver == "buffered":
        def factory() -> asyncio.BaseProtocol:
            return CountingBufferedProtocol(done)
    else:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
            cpu0 = cpu_seconds()
            if cmd["case"] == "bulk" and cmd.get("direction") == "both":
                result, _ = await asyncio.gather(
                    _stream_bulk(reader, writer),
                    _send_bulk(writer, cmd["bytes"], cmd["write_size"]))
            elif cmd["case"] == "bulk":
                result = await _stream_bulk(reader, writer)
            else:
                result = await _stream_echo(reader, writer, cmd["message_size"])
            result["cpu_seconds"] = cpu_seconds() - cpu0
            return result

        callback = one_connection(done, handle)

    return await _serve_until(cmd, emit, done, _listen(cmd, factory, callback))


@dataclass
class _ManyState:
    """What serve_many's connections share."""

    idle: tuple[int, int]       # memory once all connections are in
    hellos: int = 0
    finished: int = 0
    bytes: int = 0
    t0: float = 0.0


async def serve_many(cmd: Json, emit: Callable[..., None]) -> Json:
    """``connections``: N at once, then bulk on all; ``setup``: K one after another."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Json] = loop.create_future()
    n = (cmd["connections"] if cmd["case"] == "connections"
         else cmd["count"] + cmd["warmup"])
    rss0 = _rss()
    state = _ManyState(idle=rss0)
    all_in = asyncio.Event()

    def fail(exc: BaseException) -> None:
        if not done.done():
            done.set_exception(exc)

    async def connections(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Hello in; once all N are in (and idle), note the memory and ack each.
        await reader.readexactly(1)
        state.hellos += 1
        if state.hellos == n:
            state.idle = _rss()
            all_in.set()
        await all_in.wait()
        writer.write(b"!")
        total = 0
        while data := await reader.read(READ_SIZE):
            if not state.t0:
                state.t0 = time.perf_counter()
            total += len(data)
        state.bytes += total
        writer.close()
        await writer.wait_closed()
        state.finished += 1
        if state.finished == n and not done.done():
            seconds = time.perf_counter() - state.t0
            idle = state.idle
            done.set_result({
                "bytes": state.bytes, "seconds": seconds,
                "bytes_per_s": state.bytes / seconds,
                "rss_per_conn": (idle[0] - rss0[0]) / n,
                "shmem_per_conn": (idle[1] - rss0[1]) / n})

    async def setup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(1))
        await reader.read()
        writer.close()
        await writer.wait_closed()
        state.finished += 1
        if state.finished == n and not done.done():
            done.set_result({"served": n})

    handler = connections if cmd["case"] == "connections" else setup

    async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _nodelay(writer.transport)
            await handler(reader, writer)
        except BaseException as exc:
            fail(exc)
            writer.close()
            raise

    return await _serve_until(cmd, emit, done, _listen(cmd, None, callback))


# ---------------------------------------------------------------------------
# The client child.
# ---------------------------------------------------------------------------


async def _connect(cmd: Json) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    transport, address = cmd["transport"], cmd["address"]
    if transport == "vchan":
        import vchan

        return await vchan.open_connection(address["domid"], address["port"],
                                           timeout=cmd["timeout"],
                                           dedicated=cmd.get("dedicated", False),
                                           busy_poll=cmd.get("busy_poll") or None)
    if transport == "unix":
        return await asyncio.open_unix_connection(address["path"])
    if transport in ("dropin", "dropin-tcp"):
        import vchan

        # (no timeout: as asyncio.open_connection is called for plain TCP;
        # the whole measurement is bounded by the command's timeout)
        reader, writer = await vchan.open_connection(address["host"], address["port"])
        if transport == "dropin" and vchan.dropin.via(writer) != "vchan":
            raise BenchError("a drop-in connection to a drop-in server did not upgrade")
        _nodelay(writer.transport)
        return reader, writer
    reader, writer = await asyncio.open_connection(address["host"], address["port"])
    _nodelay(writer.transport)
    return reader, writer


async def client_bulk(cmd: Json) -> Json:
    nbytes, size = cmd["bytes"], cmd["write_size"]
    reader, writer = await _connect(cmd)
    try:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        if cmd.get("direction") == "both":
            received, writes = await asyncio.gather(_stream_bulk(reader, writer),
                                                    _send_bulk(writer, nbytes, size))
            t1 = t2 = time.perf_counter()
        else:
            received = None
            writes = await _send_bulk(writer, nbytes, size)
            t1 = time.perf_counter()
            # The server closes once it has seen EOF: everything arrived.
            if await reader.read(1):
                raise BenchError("the server sent data in a bulk run")
            t2 = time.perf_counter()
        cpu = cpu_seconds() - cpu0
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"bytes": nbytes, "writes": writes, "write_seconds": t1 - t0,
            "seconds_to_close": t2 - t0, "received": received, "cpu_seconds": cpu}


async def client_connections(cmd: Json) -> Json:
    """N connections at once: open all, hello/ack, then bulk on every one."""
    n, per_conn, size = cmd["connections"], cmd["bytes_per_conn"], cmd["write_size"]
    rss0 = _rss()
    opening = asyncio.Semaphore(64)     # connects in flight at once

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with opening:
            return await _connect(cmd)

    t0 = time.perf_counter()
    # Bounded: a transport that stalls (a full listen backlog) is a failed
    # measurement, not a hung run.
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True),
            60 + n * 5e-3)
    except TimeoutError:
        raise BenchError(f"{n} connections did not all open within {60 + n * 5e-3:.0f} s") \
            from None
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    try:
        if errors:
            raise BenchError(f"{len(errors)} of {n} connections failed: {errors[0]!r}")
        connect_seconds = time.perf_counter() - t0
        for _, writer in conns:
            writer.write(b"?")

        async def acks() -> None:
            for reader, _ in conns:
                await reader.readexactly(1)

        # Bounded too: a server that never answers (Unix sockets once sat
        # here for the whole --timeout at 10,000 connections) fails the case.
        bound = 10 + n * 1e-3           # (vchan answers 10,000 in well under 1 s)
        try:
            await asyncio.wait_for(acks(), bound)
        except TimeoutError:
            raise BenchError(f"the server did not answer all {n} connections within "
                             f"{bound:.0f} s") from None
        rss1 = _rss()

        async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _send_bulk(writer, per_conn, size)
            if await reader.read(1):
                raise BenchError("the server sent data in a bulk run")

        await asyncio.gather(*(bulk(r, w) for r, w in conns))
    finally:
        for _, writer in conns:
            writer.close()
        for _, writer in conns:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return {"connect_seconds": connect_seconds, "rss_per_conn": (rss1[0] - rss0[0]) / n,
            "shmem_per_conn": (rss1[1] - rss0[1]) / n}


async def client_setup(cmd: Json) -> Json:
    """Connect, one byte there and back, close: K times in a row."""
    count, warmup = cmd["count"], cmd["warmup"]
    samples: list[int] = []
    clock = time.perf_counter_ns
    t0 = clock()
    for i in range(warmup + count):
        if i == warmup:
            t0 = clock()
        t = clock()
        reader, writer = await _connect(cmd)
        writer.write(b"x")
        if await reader.readexactly(1) != b"x":
            raise BenchError("the echo differs")
        writer.close()
        await writer.wait_closed()
        if i >= warmup:
            samples.append(clock() - t)
    elapsed = (clock() - t0) / 1e9
    stats = _percentiles_us(samples)
    return {"connections_per_s": count / elapsed, "p50_us": stats["p50_us"],
            "p99_us": stats["p99_us"], "n": count}


async def client_pingpong(cmd: Json) -> Json:
    size, warmup, rounds = cmd["message_size"], cmd["warmup"], cmd["rounds"]
    message = random.Random(size).randbytes(size)
    samples = [0] * rounds
    reader, writer = await _connect(cmd)
    clock = time.perf_counter_ns
    try:
        write, drain, readexactly = writer.write, writer.drain, reader.readexactly
        for _ in range(warmup):
            write(message)
            await drain()
            if await readexactly(size) != message:
                raise BenchError("the echo differs from the message")
        t0 = clock()
        cpu0 = cpu_seconds()
        for i in range(rounds):
            t = clock()
            write(message)
            await drain()
            reply = await readexactly(size)
            samples[i] = clock() - t
            if reply != message:
                raise BenchError("the echo differs from the message")
        elapsed = (clock() - t0) / 1e9
        cpu = cpu_seconds() - cpu0
        writer.write_eof()
        if await reader.read(1):
            raise BenchError("the server sent more than the echoes")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"rounds": rounds, "warmup": warmup, "seconds": elapsed,
            "round_trips_per_s": rounds / elapsed, "cpu_seconds": cpu,
            **_percentiles_us(samples)}


# ---------------------------------------------------------------------------
# Child processes: the JSON-lines command loop.
# ---------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)                                     # the parent is gone already


def child_main(role: str, parent: int) -> int:
    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent ends its children
    # (Runner.close), which must not print tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # 10,000 socket connections need 10,000 descriptors in each process.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    # The protocol owns the original stdout; anything else printed goes to stderr.
    out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    emit(started=role, pid=os.getpid())
    for line in sys.stdin:
        cmd: Json = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd.get("case") == "dropin":     # a setup or bulk run on a drop-in path
            cmd = {**cmd, "case": cmd["what"]}
        try:
            if role == "server":
                if cmd["transport"] == "vchan" and cmd.get("peer") is None:
                    import vchan

                    cmd["peer"] = vchan.own_domid()     # real Xen: serve this domain
                serve = (serve_many if cmd["case"] in ("connections", "setup")
                         else _matrix().serve_matrix if cmd["case"] == "matrix"
                         else serve_one)
                coro: Coroutine[Any, Any, Json] = serve(cmd, emit)
            elif cmd["case"] == "matrix":
                coro = _matrix().client_matrix(cmd)
            else:
                coro = {"bulk": client_bulk, "pingpong": client_pingpong,
                        "connections": client_connections,
                        "setup": client_setup}[cmd["case"]](cmd)
            result = run_on(cmd["loop"], asyncio.wait_for(coro, cmd["timeout"]))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit(error=f"{role}: {type(exc).__name__}: {exc}")
            continue
        emit(result=result)
    return 0


class Child:
    """One child process and its JSON-lines channel."""

    def __init__(self, role: str, env: dict[str, str]) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vchan.bench", "--role", role,
             "--parent", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.pending = b""

    def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"the {self.role} process exited "
                             f"(status {self.proc.wait()})") from None

    def recv(self, timeout: float) -> Json:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise BenchError(f"no answer from the {self.role} process in {timeout:.0f} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise BenchError(f"the {self.role} process exited "
                                 f"(status {self.proc.wait()}); see its stderr above")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        msg: Json = json.loads(line)
        if "error" in msg:
            raise BenchError(msg["error"])
        return msg

    def quit(self) -> None:
        with contextlib.suppress(BenchError):
            self.send(cmd="quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


# ---------------------------------------------------------------------------
# The parent: measurements in order.
# ---------------------------------------------------------------------------


class Runner:
    """The two children, and one measurement at a time between them."""

    def __init__(self, server_env: dict[str, str], client_env: dict[str, str], tmp: Path,
                 vchan_peer: int | None, timeout: float, dedicated: bool = False) -> None:
        self.envs = {"server": server_env, "client": client_env}
        self.dedicated = dedicated
        self.tmp = tmp
        self.vchan_peer = vchan_peer
        self.timeout = timeout
        self.count = 0
        self.server, self.client = self._start()

    def _start(self) -> tuple[Child, Child]:
        server = Child("server", self.envs["server"])
        try:
            client = Child("client", self.envs["client"])
        except BaseException:
            server.kill()
            raise
        try:
            server.recv(60)     # "started": the interpreter and its imports are up
            client.recv(60)
        except BaseException:
            server.kill()
            client.kill()
            raise
        return server, client

    def restart(self) -> None:
        """Fresh children (after a measurement that left them in a bad state)."""
        self.close(kill=True)
        self.server, self.client = self._start()

    def close(self, kill: bool = False) -> None:
        for child in (self.client, self.server):
            if not kill:
                child.quit()
            child.kill()

    def measure(self, case: str, transport: str, loop: str, **params: Any) -> tuple[Json, Json]:
        """One measurement: (server result, client result)."""
        self.count += 1
        common = {"case": case, "transport": transport, "loop": loop,
                  "dedicated": self.dedicated,
                  "timeout": self.timeout, **params}
        listen = dict(common, port=f"bench-{os.getpid()}-{self.count}", peer=self.vchan_peer,
                      path=str(self.tmp / f"s{self.count}.sock"))
        self.server.send(cmd="serve", **listen)
        ready = self.server.recv(60)
        self.client.send(cmd="run", address=ready["address"], **common)
        client = self.client.recv(self.timeout + 30)["result"]
        server = self.server.recv(60)["result"]
        return server, client


# A measurement to make: what the children are told, and a guess of its length.
Plan = list[Json]


def _bulk_bytes(args: argparse.Namespace, size: int) -> int:
    """Bytes for one bulk run: --bytes, fewer for small writes (each is a drain())."""
    return max(size, min(int(args.bytes), size * int(args.max_writes)))


def plan_runs(args: argparse.Namespace) -> Plan:
    """Every measurement of this run, in order, with a rough duration each."""
    plan: Plan = []
    vchan_rings = [None] + [r for r in args.ring_sizes if r != args.default_ring]

    def add(case: str, transport: str, loop: str, estimate: float, **params: Any) -> None:
        plan.append({"case": case, "transport": transport, "loop": loop,
                     "estimate": estimate, **params})

    if "bulk" in args.cases:
        for direction in args.directions:
            receivers = args.receivers if direction == "one" else ["streams"]
            for receiver in receivers:
                for size in args.sizes:
                    nbytes = _bulk_bytes(args, size)
                    writes = -(-nbytes // size)
                    for loop in args.loops:
                        for transport in args.transports:
                            rings = vchan_rings if transport == "vchan" else [None]
                            for ring in rings:
                                if ring is not None and (
                                        direction != "one" or receiver == "protocol"
                                        or size not in args.ring_sweep_sizes):
                                    continue
                                if transport == "vchan":
                                    ring = ring or args.default_ring
                                add("bulk", transport, loop,
                                    0.4 + nbytes / 1.0e9 * (2 if direction == "both" else 1)
                                    + writes * 6e-6,
                                    direction=direction, receiver=receiver, write_size=size,
                                    bytes=nbytes, ring_size=ring)
    if "pingpong" in args.cases:
        for size in args.ping_sizes:
            for loop in args.loops:
                for transport in args.transports:
                    polls = [0.0] + [us * 1e-6 for us in args.busy_poll if us] \
                        if transport == "vchan" else [0.0]
                    for poll in polls:
                        add("pingpong", transport, loop,
                            0.4 + (args.rounds + args.warmup) * 60e-6,
                            message_size=size, rounds=args.rounds, warmup=args.warmup,
                            busy_poll=poll)
    if "connections" in args.cases:
        for n in args.connection_counts:
            per_conn = max(16 << 10, args.connection_bytes // n)
            for loop in args.loops:
                for transport in args.transports:
                    add("connections", transport, loop,
                        0.5 + n * 3e-4
                        + n * per_conn / 0.8e9,
                        connections=n, bytes_per_conn=per_conn, write_size=64 << 10)
    if "setup" in args.cases:
        for loop in args.loops:
            for transport in args.transports:
                add("setup", transport, loop,
                    0.4 + (args.setup_count + 20) * 4e-4,
                    count=args.setup_count, warmup=20)
    if "dropin" in args.cases:
        nbytes = min(int(args.bytes), 256 << 20)
        for loop in args.loops:
            for path in DROPIN_PATHS:
                add("dropin", path, loop, 0.4 + (args.setup_count + 20) * 6e-4,
                    what="setup", count=args.setup_count, warmup=20)
            for path in DROPIN_PATHS:
                add("dropin", path, loop, 0.5 + nbytes / 1e9, what="bulk", bytes=nbytes,
                    write_size=64 << 10, direction="one", receiver="streams", ring_size=None)
    if "matrix" in args.cases:
        plan += _matrix().plan(args)
    return plan


def _describe(m: Json) -> str:
    case = m["case"]
    if case == "bulk":
        what = (f"bulk {m['direction']:>4} {m['receiver']:>8} {human_size(m['write_size']):>8}"
                + (f" ring {human_size(m['ring_size'])}" if m["ring_size"] else ""))
    elif case == "pingpong":
        what = f"pingpong {human_size(m['message_size'])}" + (
            f" busy_poll {m['busy_poll'] * 1e6:g} us" if m.get("busy_poll") else "")
    elif case == "connections":
        what = f"{m['connections']} connections"
    elif case == "matrix":
        return str(_matrix().describe(m))
    elif case == "dropin":
        what = f"drop-in {'connection setup' if m['what'] == 'setup' else 'bulk 64 KiB'}"
    else:
        what = "connection setup"
    return f"{what} {m['loop']} {m['transport']}"


def _row(m: Json, server: Json, client: Json) -> Json:
    """One result row from a measurement's two halves."""
    case = m["case"]
    if case == "dropin":            # a setup or bulk row of a drop-in path
        return {**_row({**m, "case": m["what"]}, server, client), "what": m["what"]}
    keep = {k: v for k, v in m.items() if k not in ("estimate", "case")}
    if case == "bulk":
        if server["bytes"] != m["bytes"]:
            raise BenchError(f"{_describe(m)}: the server got {server['bytes']} of "
                             f"{m['bytes']} bytes")
        row = {**keep, **server, "client_writes": client["writes"],
               "client_write_seconds": client["write_seconds"],
               "client_seconds_to_close": client["seconds_to_close"]}
        # CPU per byte moved (both directions: per byte of the two together).
        moved = m["bytes"] * (2 if m["direction"] == "both" else 1)
        row["server_cpu_seconds"] = row.pop("cpu_seconds")
        row["server_cpu_ns_per_byte"] = row["server_cpu_seconds"] / moved * 1e9
        row["client_cpu_seconds"] = client["cpu_seconds"]
        row["client_cpu_ns_per_byte"] = client["cpu_seconds"] / moved * 1e9
        if m["direction"] == "both":
            back = client["received"]
            if back["bytes"] != m["bytes"]:
                raise BenchError(f"{_describe(m)}: the client got {back['bytes']} of "
                                 f"{m['bytes']} bytes")
            row["up_bytes_per_s"] = server["bytes_per_s"]
            row["down_bytes_per_s"] = back["bytes_per_s"]
            row["bytes_per_s"] = server["bytes_per_s"] + back["bytes_per_s"]
        return row
    if case == "pingpong":
        if server["echoed"] != m["rounds"] + m["warmup"]:
            raise BenchError(f"{_describe(m)}: the server echoed {server['echoed']} messages")
        row = {**keep, **client}
        # CPU per round trip of each process (the server's over warm-up too).
        row["client_cpu_us_per_rt"] = row.pop("cpu_seconds") / m["rounds"] * 1e6
        row["server_cpu_us_per_rt"] = server["cpu_seconds"] / server["echoed"] * 1e6
        return row
    if case == "matrix":
        return dict(_matrix().row(m, server, client))
    if case == "connections":
        return {**keep, "bytes_per_s": server["bytes_per_s"], "bytes": server["bytes"],
                "seconds": server["seconds"], "server_rss_per_conn": server["rss_per_conn"],
                "server_shmem_per_conn": server["shmem_per_conn"],
                "client_rss_per_conn": client["rss_per_conn"],
                "client_shmem_per_conn": client["shmem_per_conn"],
                "connect_seconds": client["connect_seconds"], "ok": True, "error": None}
    return {**keep, **client}


def _summary(row: Json) -> str:
    case = row["case_"]
    if case == "dropin":
        case = row["what"]
    if case == "bulk":
        return (f"{row['bytes_per_s'] / 1e6:9.1f} MB/s, CPU ns/B send "
                f"{row['client_cpu_ns_per_byte']:.2f} recv {row['server_cpu_ns_per_byte']:.2f}")
    if case == "matrix":
        return str(_matrix().summary(row))
    if case == "pingpong":
        return (f"{row['round_trips_per_s']:9.0f} rt/s, p50 {row['p50_us']:.1f} us, CPU us/rt "
                f"client {row['client_cpu_us_per_rt']:.1f} server "
                f"{row['server_cpu_us_per_rt']:.1f}")
    if case == "connections":
        if not row["ok"]:
            return f"FAILED: {row['error']}"
        return (f"{row['bytes_per_s'] / 1e6:9.1f} MB/s, "
                f"{(row['server_rss_per_conn'] + row['client_rss_per_conn']) / 1024:.0f} "
                f"KiB/connection")
    return f"{row['connections_per_s']:9.0f} connections/s, p50 {row['p50_us']:.0f} us"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _median(rows: list[Json], case: str) -> Json:
    """The median run of a repeated measurement (by throughput, or by p50 latency)."""
    if len(rows) == 1:
        return rows[0]
    by_latency = case == "pingpong" or rows[0].get("what") == "setup"
    key = "p50_us" if by_latency else "bytes_per_s"
    ordered = sorted(rows, key=lambda r: float(r[key]))
    row = dict(ordered[(len(ordered) - 1) // 2] if by_latency else ordered[len(ordered) // 2])
    row["repeats"] = [r[key] for r in rows]
    return row


def execute(runner: Runner, plan: Plan, repeat: int = 1) -> dict[str, list[Json]]:
    """Run the plan, with progress and a running estimate of the time left.

    Bulk, ping-pong, matrix and drop-in measurements are made ``repeat``
    times and the median run is kept (all values are in the row's ``repeats``).  A
    failed many-connections or matrix measurement is recorded (``ok`` False,
    ``error``) and the children restarted; any other failure ends the run.
    """
    out: dict[str, list[Json]] = {}
    for m in plan:
        if m["case"] in REPEATED:
            m["estimate"] *= repeat
    estimated = sum(m["estimate"] for m in plan)
    print(f"vchan bench: {len(plan)} measurements, about {_clock(estimated)} "
          f"(min:s)", file=sys.stderr, flush=True)
    t_start = time.monotonic()
    done_estimate = 0.0
    for i, m in enumerate(plan, 1):
        params = {k: v for k, v in m.items() if k not in ("case", "transport", "loop",
                                                          "estimate")}
        try:
            rows = []
            for _ in range(repeat if m["case"] in REPEATED else 1):
                server, client = runner.measure(m["case"], m["transport"], m["loop"],
                                                **params)
                rows.append(_row(m, server, client))
            row = _median(rows, m["case"])
        except BenchError as exc:
            if m["case"] not in ("connections", "matrix"):
                raise
            # Many connections may hit a limit (grants, descriptors), a matrix
            # cell may fail alone: a result too.
            row = {k: v for k, v in m.items() if k not in ("estimate", "case")}
            row.update(ok=False, error=str(exc), bytes_per_s=None)
            if m["case"] == "connections":
                row.update(server_rss_per_conn=None, client_rss_per_conn=None)
            runner.restart()
        out.setdefault(m["case"], []).append(row)
        done_estimate += m["estimate"]
        elapsed = time.monotonic() - t_start
        left = (estimated - done_estimate) * elapsed / done_estimate
        print(f"  [{i:>3}/{len(plan)} {_clock(elapsed)} elapsed, ~{_clock(left)} left] "
              f"{_describe(m)}: {_summary(dict(row, case_=m['case']))}",
              file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def memcpy_bandwidth(block: int = 64 << 20, rounds: int = 8) -> float:
    """Single-core memcpy bandwidth (bytes/s), best of ``rounds`` block copies."""
    src = bytearray(os.urandom(1 << 20) * (block >> 20))
    dst = bytearray(block)
    s_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    d_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    ctypes.memmove(d_addr, s_addr, block)       # fault the pages in
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        ctypes.memmove(d_addr, s_addr, block)
        best = min(best, time.perf_counter() - t)
    if dst != src:
        raise BenchError("memmove produced wrong data")
    return block / best


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vchan bench",
        description="vchan against TCP loopback and Unix sockets, on asyncio and uvloop, "
                    "server and client in separate processes (separate emulated domains "
                    "for vchan): bulk transfers, ping-pong latency, many connections, "
                    "connection setup.  Prints a Markdown table; writes results.json, "
                    "report.md and PNG plots to --out.",
        epilog="examples:\n  vchan bench --quick\n  vchan bench --out bench-results\n"
               "  vchan bench --cases pingpong --loops uvloop --rounds 50000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (about a minute): 64 KiB writes, fewer "
                             "round trips, 10 and 1,000 connections, 8 matrix cells")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="where to write results.json, report.md and the plots "
                             "(default: vchan-bench-YYYYmmdd-HHMMSS)")
    parser.add_argument("--no-report", action="store_true",
                        help="print the table only; write nothing")
    parser.add_argument("--cases", type=_choices(CASES), default=None,
                        help=f"{','.join(CASES)} (default all)")
    parser.add_argument("--loops", type=_choices(LOOPS), default=None,
                        help="event loops: asyncio,uvloop (default both)")
    parser.add_argument("--transports", type=_choices(TRANSPORTS), default=list(TRANSPORTS),
                        help="vchan,unix,tcp (default all three)")
    parser.add_argument("--vchan-connections", choices=("session", "dedicated"),
                        default="session",
                        help="vchan clients open streams of their session (default), or "
                             "each connection with a ring of its own (dedicated=True), "
                             "as before sessions")
    parser.add_argument("--bytes", type=parse_size, default=None,
                        help="bytes per bulk run, e.g. 512M (default 512 MiB, --quick 64 MiB; "
                             "small writes send fewer, see --max-writes)")
    parser.add_argument("--max-writes", type=int, default=None,
                        help="at most this many writes per bulk run (default 200,000)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="bulk write sizes (default 64,1K,16K,64K,256K,1M; --quick 64K)")
    parser.add_argument("--directions", type=_choices(DIRECTIONS), default=list(DIRECTIONS),
                        help="bulk: one (client to server) and/or both at once")
    parser.add_argument("--receivers", type=_choices(RECEIVERS), default=None,
                        help="bulk receiving side: streams,protocol,buffered "
                             "(default all; --quick streams,buffered)")
    parser.add_argument("--ring-sizes", type=parse_sizes, default=None,
                        help="vchan ring sizes to sweep in bulk runs (default 64K,256K,1M; "
                             "--quick 1M besides the default)")
    parser.add_argument("--ping-sizes", type=parse_sizes, default=[64, 4096],
                        help="ping-pong message sizes (default 64,4096)")
    parser.add_argument("--busy-poll", type=_us_list, default=[50.0], metavar="US",
                        help="ping-pong also runs vchan with busy_poll= each of these "
                             "microseconds (comma-separated; 0: none; default 50)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed round trips (default 20,000, --quick 3,000)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed round trips first (default 1,000, --quick 300)")
    parser.add_argument("--connections", type=parse_counts, default=None,
                        dest="connection_counts",
                        help="concurrent connections (default 1,10,100,1000,10000; "
                             "--quick 10,1000,10000)")
    parser.add_argument("--setup-count", type=int, default=None,
                        help="connections opened in the setup-rate case (default 500, "
                             "--quick 100)")
    _matrix().add_arguments(parser)
    parser.add_argument("--repeat", type=int, default=None,
                        help="make each bulk, ping-pong and matrix measurement N times and "
                             "keep the median (default 3, --quick 1)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one measurement may take (default 600)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return counts


def _defaults(args: argparse.Namespace) -> None:
    from ..endpoint import DEFAULT_RING_SIZE

    quick = args.quick

    def default(name: str, full: Any, short: Any) -> None:
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)

    default("cases", list(CASES), list(CASES))
    default("loops", list(LOOPS), list(LOOPS))
    default("bytes", 512 << 20, 64 << 20)
    default("max_writes", 200_000, 50_000)
    default("sizes", [64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20], [64 << 10])
    default("receivers", list(RECEIVERS), ["streams", "buffered"])
    default("ring_sizes", [64 << 10, DEFAULT_RING_SIZE, 1 << 20], [DEFAULT_RING_SIZE, 1 << 20])
    default("rounds", 20_000, 3_000)
    default("warmup", 1_000, 300)
    default("connection_counts", [1, 10, 100, 1000, 10000], [10, 1000, 10000])
    default("setup_count", 500, 100)
    default("repeat", 3, 1)
    args.default_ring = DEFAULT_RING_SIZE
    args.ring_sweep_sizes = [s for s in args.sizes if s in (4096, 64 << 10, 1 << 20)] \
        or args.sizes[:1]
    args.connection_bytes = (64 if quick else 256) << 20
    _matrix().defaults(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role:
        return child_main(args.role, args.parent)
    loops_given = args.loops is not None
    _defaults(args)
    if min(args.rounds, args.max_writes, args.repeat) < 1 or args.warmup < 0 \
            or args.timeout <= 0:
        parser.error("--rounds, --max-writes and --repeat must be >= 1, --warmup >= 0, "
                     "--timeout > 0")
    for ring in args.ring_sizes:
        if not 0 < ring <= 1 << 20:
            parser.error(f"--ring-sizes: {ring} is outside 1..1048576")
    if (problem := _matrix().check_args(args)) is not None:
        parser.error(problem)
    if "uvloop" in args.loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if loops_given:
                parser.error("uvloop is not installed (pip install 'vchan[uvloop]', "
                             "or --loops asyncio)")
            print("vchan bench: uvloop is not installed: measuring the asyncio loop only "
                  "(pip install 'vchan[bench]' for both, and plots)", file=sys.stderr)
            args.loops = ["asyncio"]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from .. import backend, sim

    backend_name = backend.default_backend_name()
    env = dict(os.environ)
    own_sim: Path | None = None
    tmp = Path(tempfile.mkdtemp(prefix="vchan-bench-"))
    runner: Runner | None = None
    started = time.time()
    try:
        vchan_peer: int | None = None
        server_env, client_env = dict(env), dict(env)
        if backend_name == "sim":
            if "VCHAN_SIM_DIR" not in env:
                own_sim = tmp / "sim"
                env["VCHAN_SIM_DIR"] = str(own_sim)
            directory = Path(env["VCHAN_SIM_DIR"])
            if own_sim is None and not sim.is_running(directory):
                own_sim = directory     # started here: stopped here (as vchan demo does)
            sim.ensure_running(directory)
            # The emulator keeps its default grant limit (1,024 pages, as
            # gntalloc's): what a user gets.  Connections share their
            # session's ring, so even 10,000 need no more.
            server_env = dict(env, VCHAN_DOMID=str(VCHAN_SERVER_DOMID))
            client_env = dict(env, VCHAN_DOMID=str(VCHAN_CLIENT_DOMID))
            vchan_peer = VCHAN_CLIENT_DOMID
        print("vchan bench: measuring memcpy", file=sys.stderr, flush=True)
        results: Json = {
            "machine": machine_info(backend=backend_name),
            "memcpy": {"bytes_per_s": memcpy_bandwidth(), "block_bytes": 64 << 20},
        }
        plan = plan_runs(args)
        runner = Runner(server_env, client_env, tmp, vchan_peer, args.timeout,
                        dedicated=args.vchan_connections == "dedicated")
        results.update(execute(runner, plan, args.repeat))
        results["settings"] = {
            "quick": args.quick,
            "command": "vchan bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_seconds": time.time() - started,
            "cases": args.cases, "loops": args.loops, "transports": args.transports,
            "directions": args.directions, "receivers": args.receivers,
            "bytes": args.bytes, "max_writes": args.max_writes, "sizes": args.sizes,
            "read_size": READ_SIZE, "ping_sizes": args.ping_sizes, "rounds": args.rounds,
            "warmup": args.warmup, "ring_sizes": sorted(set(args.ring_sizes)),
            "default_ring_size": args.default_ring,
            "connection_counts": args.connection_counts,
            "connection_bytes": args.connection_bytes, "setup_count": args.setup_count,
            "vchan_connections": args.vchan_connections,
            "matrix": _matrix().settings(args) if "matrix" in args.cases else None,
            "repeat": args.repeat,
            "timeout_seconds": args.timeout,
            "vchan_domains": ({"server": VCHAN_SERVER_DOMID, "client": VCHAN_CLIENT_DOMID}
                              if backend_name == "sim" else "own domain"),
            "private_emulator": "VCHAN_SIM_DIR" not in os.environ,
            "units": "bytes_per_s at the receiver, first delivery to EOF (both directions: "
                     "the sum); latency in us at the client; memory in bytes",
        }
        runner.close()
        runner = None
    except BenchError as exc:
        print(f"vchan bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if runner is not None:
            runner.close(kill=True)
        if own_sim is not None:
            with contextlib.suppress(sim.SimError, OSError):
                sim.stop(own_sim)
        shutil.rmtree(tmp, ignore_errors=True)

    from .report import render_markdown, write_report

    print(render_markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not args.no_report:
        out = args.out or Path(time.strftime("vchan-bench-%Y%m%d-%H%M%S"))
        written = write_report(results, out)
        print(f"\nvchan bench: wrote {', '.join(str(p) for p in written.values())}",
              file=sys.stderr)
        if not any(str(p).endswith(".png") for p in written.values()):
            print("vchan bench: no plots: install matplotlib (pip install 'vchan[bench]')",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
