"""``vchan bench --cases matrix``: the streams API as users write it (issue 15).

What it measures
----------------
One direction, client -> server, server and client in separate processes
(emulated domains 1 and 2 for vchan), through the asyncio streams API
exactly as users call it:

* vchan: ``vchan.start_server(cb, port, peers=..., limit=L)`` and
  ``vchan.open_connection(domid, port, limit=L)`` -- default rings, the
  emulator's default grant limit;
* unix: ``asyncio.start_unix_server(cb, path, limit=L)`` and
  ``asyncio.open_unix_connection(path, limit=L)``;
* tcp: ``asyncio.start_server(cb, "127.0.0.1", 0, limit=L)`` and
  ``asyncio.open_connection(host, port, limit=L)``, ``TCP_NODELAY``.

Each cell is one combination of

* the StreamReader ``limit`` (both ends): 16 KiB, 64 KiB (asyncio's
  default), 1 MiB, 16 MiB (``--matrix-limits``);
* the receiver's read style (``--matrix-reads``): ``read-4K``, ``read-64K``,
  ``read-1M`` (``reader.read(n)`` until EOF); ``readexactly`` (length-prefixed
  messages: ``hdr = await readexactly(4)``, then ``await readexactly(n)``);
  ``readline`` (lines ending in ``b"\\n"``);
* the sender's write style (``--matrix-writes``): ``write-64``, ``write-1K``,
  ``write-64K``, ``write-1M`` (``write(block); await drain()``) and
  ``writelines`` (``writelines(pieces); await drain()``, 64 KiB per call).

With the ``readexactly`` and ``readline`` receivers the sender writes whole
messages: a message (4-byte big-endian length prefix included) or a line
(``b"\\n"`` included) is the write size; ``writelines`` writes one 64 KiB
message as ``[header, payload]``, or 16 lines of 4 KiB.  With ``read(n)`` it
writes 16 pieces of 4 KiB.  A line longer than the limit is not a valid
configuration (``readline`` raises ``ValueError`` from ``LimitOverrunError``
there): such cells are "n/a", never run.

A cell is bounded in bytes and time: the sender writes until
``--matrix-bytes`` or ``--matrix-seconds``, whichever comes first, then
``write_eof()``.  The receiver's rate is taken from its first delivery to
EOF; the parent checks that the server got every byte the client sent (and,
for messages and lines, that every one arrived whole).  Each process
records its CPU time (``getrusage(RUSAGE_SELF)``, user + sys) over the
transfer: ``client_cpu_ns_per_byte`` (the sender) and
``server_cpu_ns_per_byte`` (the receiver).

The rendering half (targets, the report's section, the plot) is
:mod:`vchan.bench.matrix_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .common import BenchError, Json, cpu_seconds, human_size, parse_choices, parse_sizes
from .endpoints import StreamCallback, nodelay, one_connection, serve_until

LIMITS = (16 << 10, 64 << 10, 1 << 20, 16 << 20)
READ_SIZES = {"read-4K": 4 << 10, "read-64K": 64 << 10, "read-1M": 1 << 20}
READS = (*READ_SIZES, "readexactly", "readline")
WRITE_SIZES = {"write-64": 64, "write-1K": 1 << 10, "write-64K": 64 << 10, "write-1M": 1 << 20}
WRITES = (*WRITE_SIZES, "writelines")

READ_TEXT = {"read-4K": "read(4 KiB)", "read-64K": "read(64 KiB)", "read-1M": "read(1 MiB)",
             "readexactly": "readexactly framing", "readline": "readline"}
WRITE_TEXT = {"write-64": "write(64 B)", "write-1K": "write(1 KiB)",
              "write-64K": "write(64 KiB)", "write-1M": "write(1 MiB)",
              "writelines": "writelines"}

WRITELINES_PIECES = 16          # writelines() with read(n) and readline: 16 pieces ...
WRITELINES_PIECE = 4 << 10      # ... of 4 KiB
WRITELINES_MESSAGE = 64 << 10   # writelines([header, payload]) with readexactly
HEADER = 4                      # framing: a 4-byte big-endian length prefix

# A cell's bounds: time, normally (a full matrix on both loops, --repeat 3, is
# about 1,750 measurements); the byte bound only stops the fastest cells early.
DEFAULT_SECONDS = 0.15
QUICK_SECONDS = 0.1
DEFAULT_BYTES = 512 << 20
#: ``--quick`` without ``--matrix-*`` choices: a representative handful of
#: cells, (limit, read style, write style).
QUICK_CELLS = (
    (64 << 10, "read-64K", "write-64K"),        # every default
    (1 << 20, "read-1M", "write-64K"),          # issue 15's report: a big limit
    (16 << 20, "read-1M", "write-1M"),
    (64 << 10, "read-4K", "write-64"),          # small writes
    (64 << 10, "readexactly", "write-1K"),      # framing
    (16 << 10, "readexactly", "write-1M"),      # messages far bigger than the limit
    (64 << 10, "readline", "write-64"),
    (64 << 10, "read-64K", "writelines"),
)

#: Targets (issue 15, point 2): vchan/unix by write style.
TARGET_BIG = 2.0        # writes of 16 KiB and up (64 KiB, 1 MiB, writelines: 64 KiB a call)
TARGET_SMALL = 1.5      # 64 B and 1 KiB writes
TARGET_FLOOR = 1.0      # every cell
SMALL_WRITES = ("write-64", "write-1K")


def write_target(write: str) -> float:
    """The vchan/unix target of a cell with this write style."""
    return TARGET_SMALL if write in SMALL_WRITES else TARGET_BIG


# ---------------------------------------------------------------------------
# What a cell sends.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What the sender writes per call, and what the receiver expects."""

    pieces: tuple[bytes, ...]   # writelines(pieces), or write(pieces[0])
    writelines: bool
    message: int                # bytes per message or line (0: a plain byte stream)

    @property
    def call_bytes(self) -> int:
        return sum(len(p) for p in self.pieces)

    @property
    def messages_per_call(self) -> int:
        return self.call_bytes // self.message if self.message else 0


def _payload(size: int, seed: int, lines: bool = False) -> bytes:
    data = random.Random(seed).randbytes(size)
    return data.replace(b"\n", b"\x0b") if lines else data


def _frame(size: int) -> tuple[bytes, bytes]:
    """A length-prefixed message of ``size`` bytes in all: (header, payload)."""
    payload = _payload(size - HEADER, size)
    return (size - HEADER).to_bytes(HEADER, "big"), payload


def _line(size: int) -> bytes:
    return _payload(size - 1, size, lines=True) + b"\n"


def message_size(read: str, write: str) -> int:
    """Bytes per message (readexactly) or line (readline); 0 for read(n)."""
    if read == "readexactly":
        return WRITELINES_MESSAGE if write == "writelines" else WRITE_SIZES[write]
    if read == "readline":
        return WRITELINES_PIECE if write == "writelines" else WRITE_SIZES[write]
    return 0


def traffic(read: str, write: str) -> Traffic:
    """The bytes of one write call of a cell."""
    size = message_size(read, write)
    if write == "writelines":
        if read == "readexactly":
            return Traffic(_frame(size), True, size)
        if read == "readline":
            return Traffic((_line(size),) * WRITELINES_PIECES, True, size)
        block = _payload(WRITELINES_PIECES * WRITELINES_PIECE, 0)
        return Traffic(tuple(block[i:i + WRITELINES_PIECE]
                             for i in range(0, len(block), WRITELINES_PIECE)), True, 0)
    if read == "readexactly":
        return Traffic((b"".join(_frame(size)),), False, size)
    if read == "readline":
        return Traffic((_line(size),), False, size)
    return Traffic((_payload(WRITE_SIZES[write], WRITE_SIZES[write]),), False, 0)


def cell_na(limit: int, read: str, write: str) -> str | None:
    """Why a cell is not a valid configuration (None: it is)."""
    if read == "readline":
        line = message_size(read, write)
        if line > limit:
            return (f"a {human_size(line)} line is longer than the {human_size(limit)} "
                    f"limit: readline() raises (LimitOverrunError)")
    return None


# ---------------------------------------------------------------------------
# The receiver (server child).
# ---------------------------------------------------------------------------


class _Tally:
    """First delivery to EOF: bytes, deliveries, wall and CPU time."""

    def __init__(self) -> None:
        self.total = self.first = self.deliveries = 0
        self.t0 = self.cpu0 = 0.0

    def got(self, n: int) -> None:
        if not self.deliveries:
            self.t0, self.cpu0 = time.perf_counter(), cpu_seconds()
            self.first = n
        self.deliveries += 1
        self.total += n

    def result(self, messages: int | None = None) -> Json:
        t1, cpu1 = time.perf_counter(), cpu_seconds()
        after, seconds = self.total - self.first, t1 - self.t0
        if after <= 0 or seconds <= 0:
            raise BenchError(f"everything ({self.total} B) arrived in one piece: "
                             f"raise --matrix-bytes or --matrix-seconds")
        return {"bytes": self.total, "messages": messages, "seconds": seconds,
                "bytes_per_s": after / seconds, "first_delivery_bytes": self.first,
                "deliveries": self.deliveries, "cpu_seconds": cpu1 - self.cpu0,
                "cpu_ns_per_byte": (cpu1 - self.cpu0) / after * 1e9}


async def receive_read(reader: asyncio.StreamReader, size: int) -> Json:
    """``reader.read(size)`` until EOF."""
    tally = _Tally()
    read = reader.read
    while data := await read(size):
        tally.got(len(data))
    return tally.result()


async def receive_frames(reader: asyncio.StreamReader, message: int) -> Json:
    """Length-prefixed messages of ``message`` bytes (header included) until EOF.

    Every header must announce the expected length, every payload end in
    the expected byte, and the first and last payloads be the sender's.
    """
    _, expected = _frame(message)
    want, last = message - HEADER, expected[-1]
    tally = _Tally()
    readexactly = reader.readexactly
    count = 0
    body = b""
    while True:
        try:
            header = await readexactly(HEADER)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise BenchError(f"EOF inside the header of message {count}") from None
            break
        n = int.from_bytes(header, "big")
        if n != want:
            raise BenchError(f"message {count}: the header says {n} B, not {want}")
        try:
            body = await readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise BenchError(f"message {count} cut short: {len(exc.partial)} of {n} B") \
                from None
        if body[-1] != last or (not count and body != expected):
            raise BenchError(f"message {count} differs from the one sent")
        count += 1
        tally.got(message)
    if count and body != expected:
        raise BenchError("the last message differs from the one sent")
    return tally.result(count)


async def receive_lines(reader: asyncio.StreamReader, size: int) -> Json:
    """Lines of ``size`` bytes (``b"\\n"`` included) until EOF, each checked whole."""
    expected = _line(size)
    tally = _Tally()
    readline = reader.readline
    count = 0
    line = b""
    while line := await readline():
        if len(line) != size or line[-1] != 10 or (not count and line != expected):
            raise BenchError(f"line {count}: {len(line)} B, not the {size} B line sent")
        count += 1
        tally.got(size)
    return tally.result(count)


def receiver(read: str, write: str) -> Callable[[asyncio.StreamReader], Awaitable[Json]]:
    """The receiving coroutine of a cell."""
    if read == "readexactly":
        size = message_size(read, write)
        return lambda reader: receive_frames(reader, size)
    if read == "readline":
        size = message_size(read, write)
        return lambda reader: receive_lines(reader, size)
    n = READ_SIZES[read]
    return lambda reader: receive_read(reader, n)


async def _listen(cmd: Json, callback: StreamCallback) -> tuple[Any, Json]:
    """``start_server`` of the command's transport, with its ``limit``."""
    limit = cmd["limit"]
    transport = cmd["transport"]
    if transport == "vchan":
        import vchan

        port = cmd["port"]
        vserver = await vchan.start_server(callback, port, peers=cmd["peer"], limit=limit)
        return vserver, {"domid": vserver.own, "port": port}
    if transport == "unix":
        path = cmd["path"]
        return (await asyncio.start_unix_server(callback, path, limit=limit),
                {"path": path})
    server = await asyncio.start_server(callback, "127.0.0.1", 0, limit=limit)
    return server, {"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1]}


async def serve_matrix(cmd: Json, emit: Callable[..., None]) -> Json:
    """Listen, say ready, receive one connection's cell, report it."""
    done: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
    receive = receiver(cmd["read"], cmd["write"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
        return await receive(reader)

    callback = one_connection(done, handle)
    return await serve_until(cmd, emit, done, _listen(cmd, callback))


# ---------------------------------------------------------------------------
# The sender (client child).
# ---------------------------------------------------------------------------


async def connect(cmd: Json) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``open_connection`` of the command's transport, with its ``limit``."""
    limit, transport, address = cmd["limit"], cmd["transport"], cmd["address"]
    if transport == "vchan":
        import vchan

        return await vchan.open_connection(address["domid"], address["port"], limit=limit)
    if transport == "unix":
        return await asyncio.open_unix_connection(address["path"], limit=limit)
    reader, writer = await asyncio.open_connection(address["host"], address["port"],
                                                   limit=limit)
    nodelay(writer.transport)
    return reader, writer


async def send(writer: asyncio.StreamWriter, data: Traffic, max_bytes: int,
               seconds: float) -> int:
    """Write whole calls (each + drain) until ``max_bytes`` or ``seconds``; the calls."""
    max_calls = max(1, max_bytes // data.call_bytes)
    # The clock is read every `batch` calls (about every 256 KiB).
    batch = max(1, min(64, (256 << 10) // data.call_bytes))
    drain = writer.drain
    deadline = time.perf_counter() + seconds
    calls = 0
    # The call and its argument are looked up once, outside the timed loop.
    put: Callable[[Any], None]
    arg: Any
    if data.writelines:
        put, arg = writer.writelines, list(data.pieces)
    else:
        put, arg = writer.write, data.pieces[0]
    while calls < max_calls:
        n = min(batch, max_calls - calls)
        for _ in range(n):
            put(arg)
            await drain()
        calls += n
        if time.perf_counter() >= deadline:
            break
    writer.write_eof()
    return calls


async def client_matrix(cmd: Json) -> Json:
    """Connect, send the cell's traffic, wait for the server to close."""
    data = traffic(cmd["read"], cmd["write"])
    reader, writer = await connect(cmd)
    try:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        calls = await send(writer, data, cmd["max_bytes"], cmd["seconds"])
        t1 = time.perf_counter()
        # The server closes once it has seen EOF: everything arrived.
        if await reader.read(1):
            raise BenchError("the server sent data")
        t2, cpu1 = time.perf_counter(), cpu_seconds()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    nbytes = calls * data.call_bytes
    return {"bytes": nbytes, "calls": calls, "messages": calls * data.messages_per_call,
            "write_seconds": t1 - t0, "seconds_to_close": t2 - t0,
            "cpu_seconds": cpu1 - cpu0, "cpu_ns_per_byte": (cpu1 - cpu0) / nbytes * 1e9}


# ---------------------------------------------------------------------------
# The parent: options, plan, rows.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matrix-limits", type=parse_sizes, default=None,
                        help=f"matrix: StreamReader limits at both ends (default "
                             f"16K,64K,1M,16M; --quick without any --matrix-limits, "
                             f"-reads, -writes measures {len(QUICK_CELLS)} representative "
                             f"cells instead of every combination)")
    parser.add_argument("--matrix-reads", type=parse_choices(READS), default=None,
                        help=f"matrix: receiver read styles, of {','.join(READS)} "
                             f"(default all)")
    parser.add_argument("--matrix-writes", type=parse_choices(WRITES), default=None,
                        help=f"matrix: sender write styles, of {','.join(WRITES)} "
                             f"(default all)")
    parser.add_argument("--matrix-seconds", type=float, default=None,
                        help=f"matrix: the sender stops after this many seconds ... "
                             f"(default {DEFAULT_SECONDS:g}, --quick {QUICK_SECONDS:g})")
    parser.add_argument("--matrix-bytes", type=_positive_size, default=None,
                        help=f"matrix: ... or this many bytes, whichever first (default "
                             f"{human_size(DEFAULT_BYTES)})")


def _positive_size(text: str) -> int:
    sizes = parse_sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one size, got {text!r}")
    return sizes[0]


def defaults(args: argparse.Namespace) -> None:
    """Fill in the matrix options; ``args.matrix_cells``: every cell, n/a ones too."""
    chosen = any(getattr(args, f"matrix_{k}") is not None for k in ("limits", "reads", "writes"))
    if args.matrix_seconds is None:
        args.matrix_seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.matrix_bytes is None:
        args.matrix_bytes = DEFAULT_BYTES
    if args.quick and not chosen:
        cells = list(QUICK_CELLS)
        args.matrix_limits = sorted({c[0] for c in cells})
        args.matrix_reads = [r for r in READS if any(c[1] == r for c in cells)]
        args.matrix_writes = [w for w in WRITES if any(c[2] == w for c in cells)]
        args.matrix_subset = True
    else:
        args.matrix_limits = args.matrix_limits or list(LIMITS)
        args.matrix_reads = args.matrix_reads or list(READS)
        args.matrix_writes = args.matrix_writes or list(WRITES)
        cells = list(itertools.product(args.matrix_limits, args.matrix_reads,
                                       args.matrix_writes))
        args.matrix_subset = False
    args.matrix_cells = cells


def check_args(args: argparse.Namespace) -> str | None:
    """An error message for bad matrix options, or None."""
    if not args.matrix_seconds > 0:
        return "--matrix-seconds must be > 0"
    return None


def settings(args: argparse.Namespace) -> Json:
    """What results.json records of the matrix's settings."""
    return {"limits": args.matrix_limits, "reads": args.matrix_reads,
            "writes": args.matrix_writes, "seconds": args.matrix_seconds,
            "max_bytes": args.matrix_bytes, "subset": args.matrix_subset,
            "cells": [list(c) for c in args.matrix_cells] if args.matrix_subset else None,
            "na": [{"limit": lim, "read": r, "write": w, "reason": why}
                   for lim, r, w in args.matrix_cells
                   if (why := cell_na(lim, r, w)) is not None]}


def plan(args: argparse.Namespace) -> list[Json]:
    """The matrix's measurements: loop by loop, cell by cell, the transports together."""
    out: list[Json] = []
    seconds, max_bytes = args.matrix_seconds, args.matrix_bytes
    for loop in args.loops:
        for limit, read, write in args.matrix_cells:
            if cell_na(limit, read, write) is not None:
                continue
            for transport in args.transports:
                out.append({"case": "matrix", "transport": transport, "loop": loop,
                            "estimate": min(seconds, max_bytes / 2e9) + 0.04,
                            "limit": limit, "read": read, "write": write,
                            "seconds": seconds, "max_bytes": max_bytes,
                            # A stuck cell fails alone, soon, not after --timeout.
                            "timeout": min(args.timeout, 30 + 20 * seconds)})
    return out


def describe(m: Json) -> str:
    return (f"matrix limit {human_size(m['limit']):>6} {READ_TEXT[m['read']]:<19} "
            f"{WRITE_TEXT[m['write']]:<13} {m['loop']} {m['transport']}")


def summary(row: Json) -> str:
    if row.get("ok") is False:
        return f"FAILED: {row.get('error')}"
    return (f"{row['bytes_per_s'] / 1e6:9.1f} MB/s, CPU ns/B send "
            f"{row['client_cpu_ns_per_byte']:.2f} recv {row['server_cpu_ns_per_byte']:.2f}")


def row(m: Json, server: Json, client: Json) -> Json:
    """A result row from both halves, after checking that everything arrived."""
    if server["bytes"] != client["bytes"]:
        raise BenchError(f"{describe(m)}: the server got {server['bytes']} of the "
                         f"{client['bytes']} bytes sent")
    if server["messages"] is not None and server["messages"] != client["messages"]:
        raise BenchError(f"{describe(m)}: the server got {server['messages']} of the "
                         f"{client['messages']} messages sent")
    keep = {k: v for k, v in m.items()
            if k not in ("estimate", "case", "timeout", "seconds", "max_bytes")}
    data = traffic(m["read"], m["write"])
    return {**keep, "ok": True, "error": None,
            "message_bytes": data.message or None, "call_bytes": data.call_bytes,
            "bytes": server["bytes"], "messages": server["messages"],
            "seconds": server["seconds"], "bytes_per_s": server["bytes_per_s"],
            "first_delivery_bytes": server["first_delivery_bytes"],
            "deliveries": server["deliveries"],
            "server_cpu_seconds": server["cpu_seconds"],
            "server_cpu_ns_per_byte": server["cpu_ns_per_byte"],
            "client_calls": client["calls"], "client_write_seconds": client["write_seconds"],
            "client_cpu_seconds": client["cpu_seconds"],
            "client_cpu_ns_per_byte": client["cpu_ns_per_byte"]}
