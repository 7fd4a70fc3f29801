#!/usr/bin/env python3
"""asyncio streams over vchan, next to Unix-socket and TCP loopback streams.

What it measures
----------------
The server and the client are two SEPARATE processes, for every transport:

* **vchan** -- ``vchan.start_server(cb, port, peers=2)`` in emulated domain
  1 and ``vchan.open_connection(1, port)`` in emulated domain 2 of a private
  emulator instance (a temporary state directory, stopped and removed at the
  end) unless ``VCHAN_SIM_DIR`` is set already, in which case that emulator
  is used and left running.  On real Xen both processes are in this domain
  and the server serves its own domid.  Rings are vchan's default size
  (64 KiB each way).
* **unix** -- ``asyncio.start_unix_server`` / ``open_unix_connection``.
* **tcp** -- ``asyncio.start_server`` / ``open_connection`` on 127.0.0.1,
  ``TCP_NODELAY`` on both ends.

each on the default asyncio event loop and on uvloop (``--loops``).

1. **bulk**, one direction.  The client writes N bytes (``--bytes``, default
   512 MiB, 64 MiB with ``--quick``) as ``writer.write(block); await
   writer.drain()`` with blocks of each ``--sizes`` (default 64 KiB), then
   ``write_eof()``.  The server receives with one of (``--receivers``):
   ``streams`` -- ``reader.read(1 << 20)`` until EOF; ``protocol`` -- a
   plain ``asyncio.Protocol`` whose ``data_received`` counts bytes;
   ``buffered`` -- an ``asyncio.BufferedProtocol`` reading into one
   preallocated 1 MiB buffer (``get_buffer`` / ``buffer_updated``).  The
   rate is measured at the server: the bytes that arrived after the first
   delivery, over the time from the first delivery to EOF.
2. **pingpong**.  The client writes a message of 64 B or 4 KiB
   (``--ping-sizes``), drains, and ``readexactly`` the echo; the server
   ``readexactly`` the message and writes it back.  1,000 warm-up round trips
   (``--warmup``), then 20,000 timed ones (``--rounds``; 3,000 with
   ``--quick``), each timed at the client with ``perf_counter_ns``.
   Reported: round trips/s over the timed ones, p50/p99/p99.9 latency in us.

Every table row compares the transports on the SAME event loop: vchan/unix
and vchan/tcp are ratios of throughput (bulk) or round trips/s (pingpong),
above 1 meaning vchan is faster.  MB/s are decimal (1e6 bytes/s).

How to run
----------
::

    python benchmarks/streams_bench.py                      # full run
    python benchmarks/streams_bench.py --quick --json out.json
    python benchmarks/streams_bench.py --sizes 64,4096,65536,1048576 --loops asyncio

Small write sizes are slow at the full 512 MiB (every write is a separate
``write()`` + ``drain()``); ``--bytes`` lowers the amount.  Run on an
otherwise idle machine: both processes are busy for the whole measurement.

Process structure: the script starts itself twice more with a hidden
``--role server`` / ``--role client``; the parent sends each one command per
measurement as a JSON line on its stdin and reads JSON lines back (the
server answers ``ready`` before the client is told to connect, and each
answers ``result`` or ``error``).  Each measurement runs on a fresh event
loop in both children.  The children die with the parent (``PR_SET_PDEATHSIG``)
and are killed on any error.
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
from pathlib import Path
from typing import Any, TextIO

from machine import machine_info

TRANSPORTS = ("vchan", "unix", "tcp")
LOOPS = ("asyncio", "uvloop")
RECEIVERS = ("streams", "protocol", "buffered")
CASES = ("bulk", "pingpong")
READ_SIZE = 1 << 20                 # reader.read() size and the BufferedProtocol's buffer
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
            "mean_us": statistics.fmean(s) / 1e3, "min_us": s[0] / 1e3, "n": len(s)}


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
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
            self.done.set_result(_bulk_result(self.total, self.first, self.calls,
                                              self.t0, self.t1))


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
    return {"echoed": rounds}


async def _listen(cmd: Json, factory: Callable[[], asyncio.BaseProtocol] | None,
                  callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     Awaitable[None]] | None) -> tuple[Any, Json]:
    """Listen on the command's transport: with a protocol factory, or streams."""
    transport = cmd["transport"]
    loop = asyncio.get_running_loop()
    if transport == "vchan":
        import vchan

        port, peer = cmd["port"], cmd["peer"]
        if callback is not None:
            vserver = await vchan.start_server(callback, port, peers=peer)
        else:
            assert factory is not None
            vserver = await vchan.create_server(factory, port, peers=peer)
        return vserver, {"domid": vserver.own, "port": port}
    server: asyncio.Server
    if transport == "unix":
        path = cmd["path"]
        if callback is not None:
            server = await asyncio.start_unix_server(callback, path)
        else:
            assert factory is not None
            server = await loop.create_unix_server(factory, path)
        return server, {"path": path}
    if callback is not None:
        server = await asyncio.start_server(callback, "127.0.0.1", 0)
    else:
        assert factory is not None
        server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, {"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1]}


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
        async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if done.done():         # one connection per measurement
                writer.close()
                return
            try:
                _nodelay(writer.transport)
                if cmd["case"] == "bulk":
                    result = await _stream_bulk(reader, writer)
                else:
                    result = await _stream_echo(reader, writer, cmd["message_size"])
                writer.close()
                await writer.wait_closed()
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc)
                writer.close()
                raise
            if not done.done():
                done.set_result(result)

    server, address = await _listen(cmd, factory, callback)
    try:
        emit(ready=True, address=address)
        return await done
    finally:
        server.close()
        await server.wait_closed()
        if cmd["transport"] == "unix":
            with contextlib.suppress(OSError):
                os.unlink(cmd["path"])


# ---------------------------------------------------------------------------
# The client child.
# ---------------------------------------------------------------------------


async def _connect(cmd: Json) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    transport, address = cmd["transport"], cmd["address"]
    if transport == "vchan":
        import vchan

        return await vchan.open_connection(address["domid"], address["port"],
                                           timeout=cmd["timeout"])
    if transport == "unix":
        return await asyncio.open_unix_connection(address["path"])
    reader, writer = await asyncio.open_connection(address["host"], address["port"])
    _nodelay(writer.transport)
    return reader, writer


async def client_bulk(cmd: Json) -> Json:
    nbytes, size = cmd["bytes"], cmd["write_size"]
    block = random.Random(size).randbytes(size)
    full, rest = divmod(nbytes, size)
    reader, writer = await _connect(cmd)
    try:
        write, drain = writer.write, writer.drain
        t0 = time.perf_counter()
        for _ in range(full):
            write(block)
            await drain()
        if rest:
            write(block[:rest])
            await drain()
        writer.write_eof()
        t1 = time.perf_counter()
        # The server closes once it has seen EOF: everything arrived.
        if await reader.read(1):
            raise BenchError("the server sent data in a bulk run")
        t2 = time.perf_counter()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"bytes": nbytes, "writes": full + (1 if rest else 0), "write_seconds": t1 - t0,
            "seconds_to_close": t2 - t0}


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
        for i in range(rounds):
            t = clock()
            write(message)
            await drain()
            reply = await readexactly(size)
            samples[i] = clock() - t
            if reply != message:
                raise BenchError("the echo differs from the message")
        elapsed = (clock() - t0) / 1e9
        writer.write_eof()
        if await reader.read(1):
            raise BenchError("the server sent more than the echoes")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"rounds": rounds, "warmup": warmup, "seconds": elapsed,
            "round_trips_per_s": rounds / elapsed, **_percentiles_us(samples)}


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
        try:
            if role == "server":
                if cmd["transport"] == "vchan" and cmd.get("peer") is None:
                    import vchan

                    cmd["peer"] = vchan.own_domid()     # real Xen: serve this domain
                coro: Coroutine[Any, Any, Json] = serve_one(cmd, emit)
            elif cmd["case"] == "bulk":
                coro = client_bulk(cmd)
            else:
                coro = client_pingpong(cmd)
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
            [sys.executable, os.path.abspath(__file__), "--role", role,
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
    def __init__(self, server: Child, client: Child, tmp: Path, vchan_peer: int | None,
                 timeout: float) -> None:
        self.server = server
        self.client = client
        self.tmp = tmp
        self.vchan_peer = vchan_peer
        self.timeout = timeout
        self.count = 0

    def measure(self, case: str, transport: str, loop: str, **params: Any) -> tuple[Json, Json]:
        """One connection: (server result, client result)."""
        self.count += 1
        common = {"case": case, "transport": transport, "loop": loop,
                  "timeout": self.timeout, **params}
        listen = dict(common, port=f"bench-{os.getpid()}-{self.count}", peer=self.vchan_peer,
                      path=str(self.tmp / f"s{self.count}.sock"))
        self.server.send(cmd="serve", **listen)
        ready = self.server.recv(60)
        self.client.send(cmd="run", address=ready["address"], **common)
        client = self.client.recv(self.timeout + 30)["result"]
        server = self.server.recv(60)["result"]
        return server, client


def run_bulk(runner: Runner, args: argparse.Namespace) -> list[Json]:
    rows: list[Json] = []
    for receiver in args.receivers:
        for size in args.sizes:
            for loop in args.loops:
                for transport in args.transports:
                    server, client = runner.measure("bulk", transport, loop, receiver=receiver,
                                                    bytes=args.bytes, write_size=size)
                    if server["bytes"] != args.bytes:
                        raise BenchError(f"bulk {transport}/{loop}: the server got "
                                         f"{server['bytes']} of {args.bytes} bytes")
                    row = {"receiver": receiver, "write_size": size, "loop": loop,
                           "transport": transport, **server,
                           "client_writes": client["writes"],
                           "client_write_seconds": client["write_seconds"],
                           "client_seconds_to_close": client["seconds_to_close"]}
                    rows.append(row)
                    print(f"  bulk {receiver:>8} {human_size(size):>8} {loop:>7} "
                          f"{transport:>5}: {row['bytes_per_s'] / 1e6:9.1f} MB/s",
                          file=sys.stderr, flush=True)
    return rows


def run_pingpong(runner: Runner, args: argparse.Namespace) -> list[Json]:
    rows: list[Json] = []
    for size in args.ping_sizes:
        for loop in args.loops:
            for transport in args.transports:
                server, client = runner.measure("pingpong", transport, loop,
                                                message_size=size, rounds=args.rounds,
                                                warmup=args.warmup)
                if server["echoed"] != args.rounds + args.warmup:
                    raise BenchError(f"pingpong {transport}/{loop}: the server echoed "
                                     f"{server['echoed']} messages")
                row = {"message_size": size, "loop": loop, "transport": transport, **client}
                rows.append(row)
                print(f"  pingpong {human_size(size):>6} {loop:>7} {transport:>5}: "
                      f"{row['round_trips_per_s']:9.0f} rt/s, p50 {row['p50_us']:.1f} us",
                      file=sys.stderr, flush=True)
    return rows


def _ratios(rows: list[Json], keys: Sequence[str], metric: str) -> list[Json]:
    """vchan/unix and vchan/tcp of ``metric`` for rows equal in ``keys``."""
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), {})[row["transport"]] = row[metric]
    out: list[Json] = []
    for group, by in groups.items():
        if "vchan" not in by:
            continue
        entry: Json = dict(zip(keys, group, strict=True))
        for other in ("unix", "tcp"):
            if other in by:
                entry[f"vchan_vs_{other}"] = by["vchan"] / by[other]
        if len(entry) > len(keys):
            out.append(entry)
    return out


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def _rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    mbps = bps / 1e6
    return f"{mbps:,.0f}" if mbps >= 100 else f"{mbps:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def render(results: Json) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "## asyncio streams: vchan vs Unix socket vs TCP loopback (two processes)",
        "",
        f"- CPU: {m['cpu']}; cores: {m['cores']} ({m['usable_cores']} usable); "
        f"kernel: {m['kernel']} {m['machine']}",
        f"- {m['python']}; uvloop {m['uvloop']}; vchan {m['vchan']} ({m['backend']} backend)",
        f"- load average at start: {m['loadavg_at_start']}",
    ]
    bulk: list[Json] = results.get("bulk", [])
    for receiver in s["receivers"] if bulk else []:
        rows = [r for r in bulk if r["receiver"] == receiver]
        what = {"streams": "StreamReader.read(1 MiB)",
                "protocol": "asyncio.Protocol.data_received",
                "buffered": "asyncio.BufferedProtocol (1 MiB buffer)"}[receiver]
        lines += [
            "",
            f"### bulk, client -> server, {human_size(s['bytes'])} per run; "
            f"server receives with {what}",
            "",
            "| write size | loop | vchan MB/s | unix MB/s | tcp MB/s | vchan/unix | vchan/tcp |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for size in s["sizes"]:
            for loop in s["loops"]:
                by = {r["transport"]: r["bytes_per_s"] for r in rows
                      if r["write_size"] == size and r["loop"] == loop}
                v, u, t = by.get("vchan"), by.get("unix"), by.get("tcp")
                lines.append(f"| {human_size(size)} | {loop} | {_rate(v)} | {_rate(u)} | "
                             f"{_rate(t)} | {_ratio(v, u)} | {_ratio(v, t)} |")
    ping: list[Json] = results.get("pingpong", [])
    if ping:
        lines += [
            "",
            f"### ping-pong (readexactly echo), {s['rounds']:,} round trips after "
            f"{s['warmup']:,} warm-up; latency at the client, vchan / unix / tcp",
            "",
            "| message | loop | vchan rt/s | unix rt/s | tcp rt/s | vchan/unix | vchan/tcp "
            "| p50 us | p99 us | p99.9 us |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for size in s["ping_sizes"]:
            for loop in s["loops"]:
                by = {r["transport"]: r for r in ping
                      if r["message_size"] == size and r["loop"] == loop}

                def get(t: str, key: str, by: dict[str, Json] = by) -> float | None:
                    return by[t][key] if t in by else None

                rts = [get(t, "round_trips_per_s") for t in TRANSPORTS]
                lat = [" / ".join(_num(get(t, p), ".0f") for t in TRANSPORTS)
                       for p in ("p50_us", "p99_us", "p99.9_us")]
                lines.append(f"| {human_size(size)} | {loop} | "
                             + " | ".join(_num(x, ",.0f") for x in rts)
                             + f" | {_ratio(rts[0], rts[1])} | {_ratio(rts[0], rts[2])} | "
                             + " | ".join(lat) + " |")
    lines += ["", "MB/s = 1e6 bytes/s at the server, first delivery to EOF.  Ratios compare "
              "transports on the same loop (> 1: vchan is faster)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="vchan asyncio streams vs Unix-socket and TCP loopback streams, server "
                    "and client in separate processes (see the module docstring).")
    parser.add_argument("--quick", action="store_true",
                        help="64 MiB per bulk run and 3,000 round trips")
    parser.add_argument("--bytes", type=parse_size, default=None,
                        help="bytes per bulk run, e.g. 512M (default 512 MiB, --quick 64 MiB)")
    parser.add_argument("--sizes", type=parse_sizes, default=[64 << 10],
                        help="bulk write sizes, e.g. 64,4096,65536,1048576 (default 64 KiB)")
    parser.add_argument("--receivers", type=_choices(RECEIVERS), default=list(RECEIVERS),
                        help="bulk receiving side: streams,protocol,buffered (default all)")
    parser.add_argument("--ping-sizes", type=parse_sizes, default=[64, 4096],
                        help="ping-pong message sizes (default 64,4096)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed round trips (default 20,000, --quick 3,000)")
    parser.add_argument("--warmup", type=int, default=1000,
                        help="untimed round trips first (default 1,000)")
    parser.add_argument("--loops", type=_choices(LOOPS), default=list(LOOPS),
                        help="event loops: asyncio,uvloop (default both)")
    parser.add_argument("--transports", type=_choices(TRANSPORTS), default=list(TRANSPORTS),
                        help="vchan,unix,tcp (default all three)")
    parser.add_argument("--cases", type=_choices(CASES), default=list(CASES),
                        help="bulk,pingpong (default both)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one measurement may take (default 600)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write all results as JSON to PATH")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role:
        return child_main(args.role, args.parent)

    if args.bytes is None:
        args.bytes = (64 if args.quick else 512) << 20
    if args.rounds is None:
        args.rounds = 3000 if args.quick else 20000
    if args.rounds < 1 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--rounds must be >= 1, --warmup >= 0, --timeout > 0")
    if max(args.sizes) > args.bytes:
        parser.error("--bytes must be at least the largest write size")
    if "uvloop" in args.loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            parser.error("uvloop is not installed (pip install uvloop, or --loops asyncio)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from vchan import backend, sim

    backend_name = backend.default_backend_name()
    env = dict(os.environ)
    own_sim: Path | None = None
    tmp = Path(tempfile.mkdtemp(prefix="vchan-streams-bench-"))
    children: list[Child] = []
    results: Json = {}
    try:
        vchan_peer: int | None = None
        server_env, client_env = dict(env), dict(env)
        if backend_name == "sim":
            if "VCHAN_SIM_DIR" not in env:
                own_sim = tmp / "sim"
                env["VCHAN_SIM_DIR"] = str(own_sim)
            sim.ensure_running(Path(env["VCHAN_SIM_DIR"]))
            server_env = dict(env, VCHAN_DOMID=str(VCHAN_SERVER_DOMID))
            client_env = dict(env, VCHAN_DOMID=str(VCHAN_CLIENT_DOMID))
            vchan_peer = VCHAN_CLIENT_DOMID
        results = {
            "machine": machine_info(backend=backend_name),
            "settings": {
                "quick": args.quick,
                "cases": args.cases,
                "loops": args.loops,
                "transports": args.transports,
                "receivers": args.receivers,
                "bytes": args.bytes,
                "sizes": args.sizes,
                "read_size": READ_SIZE,
                "ping_sizes": args.ping_sizes,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "timeout_seconds": args.timeout,
                "vchan_ring_bytes": 64 << 10,
                "vchan_domains": ({"server": VCHAN_SERVER_DOMID, "client": VCHAN_CLIENT_DOMID}
                                  if backend_name == "sim" else "own domain"),
                "private_emulator": own_sim is not None,
                "units": "bytes_per_s at the server, first delivery to EOF; latency in us "
                         "at the client; ratios vchan/other on the same loop (> 1: vchan "
                         "faster)",
            },
        }
        server = Child("server", server_env)
        children.append(server)
        client = Child("client", client_env)
        children.append(client)
        server.recv(60)     # "started": the interpreter and its imports are up
        client.recv(60)
        runner = Runner(server, client, tmp, vchan_peer, args.timeout)
        if "bulk" in args.cases:
            results["bulk"] = run_bulk(runner, args)
            results["bulk_ratios"] = _ratios(results["bulk"],
                                             ["receiver", "write_size", "loop"], "bytes_per_s")
        if "pingpong" in args.cases:
            results["pingpong"] = run_pingpong(runner, args)
            results["pingpong_ratios"] = _ratios(results["pingpong"],
                                                 ["message_size", "loop"],
                                                 "round_trips_per_s")
        for child in children:
            child.quit()
    except BenchError as exc:
        print(f"streams_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.kill()
        if own_sim is not None:
            with contextlib.suppress(sim.SimError, OSError):
                sim.stop(own_sim)
        shutil.rmtree(tmp, ignore_errors=True)

    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
