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

The rendering half (:func:`check_matrix_targets`, :func:`matrix_section`,
:func:`write_matrix_plot`) is a pure function of the results dict, called
from :mod:`vchan.bench.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .streams import (
    BenchError,
    _choices,
    _nodelay,
    _serve_until,
    cpu_seconds,
    human_size,
    one_connection,
    parse_sizes,
)

Json = dict[str, Any]

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


StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
    return await _serve_until(cmd, emit, done, _listen(cmd, callback))


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
    _nodelay(writer.transport)
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
    if data.writelines:
        writelines, pieces = writer.writelines, list(data.pieces)
        while calls < max_calls:
            n = min(batch, max_calls - calls)
            for _ in range(n):
                writelines(pieces)
                await drain()
            calls += n
            if time.perf_counter() >= deadline:
                break
    else:
        write, block = writer.write, data.pieces[0]
        while calls < max_calls:
            n = min(batch, max_calls - calls)
            for _ in range(n):
                write(block)
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
    parser.add_argument("--matrix-reads", type=_choices(READS), default=None,
                        help=f"matrix: receiver read styles, of {','.join(READS)} "
                             f"(default all)")
    parser.add_argument("--matrix-writes", type=_choices(WRITES), default=None,
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


# ---------------------------------------------------------------------------
# Report: targets, Markdown, plot (pure functions of the results dict).
# ---------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _rows(results: Json) -> list[Json]:
    rows = results.get("matrix")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _msettings(results: Json) -> Json:
    s = results.get("settings")
    m = s.get("matrix") if isinstance(s, dict) else None
    return m if isinstance(m, dict) else {}


def _present(canonical: Iterable[Any], seen: Iterable[Any]) -> list[Any]:
    """The values in ``seen``: those of ``canonical`` first, in its order, then the rest."""
    have = [x for x in dict.fromkeys(seen) if x is not None]
    out = [x for x in canonical if x in have]
    extra = [x for x in have if x not in out]
    with contextlib.suppress(TypeError):
        extra.sort()
    return out + extra


def _axes(results: Json) -> tuple[list[str], list[int], list[str], list[str]]:
    """(loops, limits, reads, writes) with data, in their canonical order."""
    rows = _rows(results)
    s = _msettings(results)
    top = results.get("settings")
    top_loops = top.get("loops") if isinstance(top, dict) else None

    def canon(value: Any, default: Sequence[Any]) -> list[Any]:
        return list(value) if isinstance(value, list) else list(default)

    return (_present(canon(top_loops, ("asyncio", "uvloop")), (r.get("loop") for r in rows)),
            _present(canon(s.get("limits"), LIMITS), (r.get("limit") for r in rows)),
            _present(canon(s.get("reads"), READS), (r.get("read") for r in rows)),
            _present(canon(s.get("writes"), WRITES), (r.get("write") for r in rows)))


def _na_cells(results: Json, limits: list[int], reads: list[str], writes: list[str]
              ) -> set[tuple[Any, ...]]:
    """(limit, read, write) of the n/a cells: as the run recorded them, else by the rule."""
    recorded = _msettings(results).get("na")
    if isinstance(recorded, list):
        return {(c.get("limit"), c.get("read"), c.get("write")) for c in recorded
                if isinstance(c, dict)}
    return {(lim, r, w) for lim, r, w in itertools.product(limits, reads, writes)
            if cell_na(lim, r, w) is not None}


def _cell_rows(results: Json) -> dict[tuple[Any, ...], Json]:
    """(loop, limit, read, write, transport) -> row (a later repeat wins)."""
    return {(r.get("loop"), r.get("limit"), r.get("read"), r.get("write"),
             r.get("transport")): r for r in _rows(results)}


def _rate(by: dict[tuple[Any, ...], Json], key: tuple[Any, ...], transport: str
          ) -> float | None:
    r = by.get((*key, transport))
    return None if r is None or r.get("ok") is False else _num(r.get("bytes_per_s"))


def ratios(results: Json) -> list[Json]:
    """Every cell with vchan and unix rates: loop, limit, read, write, vchan_vs_unix,
    vchan_vs_tcp (or None), target, met."""
    loops, limits, reads, writes = _axes(results)
    by = _cell_rows(results)
    out = []
    for loop, limit, read, write in itertools.product(loops, limits, reads, writes):
        key = (loop, limit, read, write)
        v, u, t = (_rate(by, key, x) for x in ("vchan", "unix", "tcp"))
        if v is None or not u:
            continue
        target = write_target(write)
        out.append({"loop": loop, "limit": limit, "read": read, "write": write,
                    "vchan_vs_unix": v / u, "vchan_vs_tcp": v / t if t else None,
                    "target": target, "met": v / u >= target})
    return out


def _where(c: Json) -> str:
    return (f"{human_size(c['limit'])} limit, {READ_TEXT.get(c['read'], c['read'])}, "
            f"{WRITE_TEXT.get(c['write'], c['write'])}")


def check_matrix_targets(results: Json) -> list[Json]:
    """Issue 15's matrix targets per loop, as :func:`report.check_targets` rows.

    Empty when the run has no matrix.  vchan/unix >= 2 for writes of 16 KiB
    and up (64 KiB, 1 MiB, writelines), >= 1.5 for 64 B and 1 KiB writes,
    >= 1 in every cell; ``met`` is None without cells to judge.
    """
    if not _rows(results):
        return []
    cells = ratios(results)
    out: list[Json] = []
    groups = (
        (f"writes of 16 KiB and up: vchan >= {TARGET_BIG:g}x Unix sockets", False, TARGET_BIG),
        (f"64 B and 1 KiB writes: vchan >= {TARGET_SMALL:g}x Unix sockets", True,
         TARGET_SMALL),
        (f"no cell below {TARGET_FLOOR:g}x Unix sockets", None, TARGET_FLOOR),
    )
    for loop in _axes(results)[0]:
        for text, small, need in groups:
            sel = [c for c in cells if c["loop"] == loop
                   and (small is None or (c["write"] in SMALL_WRITES) == small)]
            name = f"Matrix ({loop}): {text}"
            if not sel:
                out.append({"target": name, "value": "-", "met": None,
                            "detail": "no cell with vchan and unix measurements"})
                continue
            worst = min(sel, key=lambda c: c["vchan_vs_unix"])
            ok = [c for c in sel if c["vchan_vs_unix"] >= need]
            out.append({"target": name,
                        "value": f"{len(ok)} of {len(sel)} cells; worst "
                                 f"{worst['vchan_vs_unix']:.2f}x ({_where(worst)})",
                        "met": len(ok) == len(sel),
                        "detail": "streams API matrix, vchan/unix of MB/s per cell; the "
                                  "cells that miss are listed in the matrix section"})
    return out


def _fmt_ratio(x: float | None, need: float | None = None) -> str:
    if x is None:
        return "-"
    text = f"{x:.2f}"
    return f"**{text}**" if need is not None and x < need else text


def _mbps(x: float | None) -> str:
    if x is None:
        return "-"
    mbps = x / 1e6
    return f"{mbps:,.0f}" if mbps >= 100 else f"{mbps:.1f}"


def _ns(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], left: int = 2) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def matrix_section(results: Json, plots: dict[str, str]) -> list[str]:
    """The matrix section of report.md ([] when the run has no matrix).

    Per loop, vchan/unix by (limit, read style) x write style, with cells
    below their target in bold; the cells that miss; CPU per byte by write
    style (sender) and read style (receiver); every cell in full at the end.
    """
    rows = _rows(results)
    if not rows:
        return []
    s = _msettings(results)
    loops, limits, reads, writes = _axes(results)
    by = _cell_rows(results)
    lines = ["", "## Matrix of user configurations (streams API)", ""]
    bound = []
    if _num(s.get("seconds")) is not None:
        bound.append(f"{s['seconds']:g} s")
    if isinstance(s.get("max_bytes"), int):
        bound.append(human_size(s["max_bytes"]))
    repeat = (results.get("settings") or {}).get("repeat")
    lines.append(
        "Client -> server through `start_server` / `open_connection` with `limit=` at both "
        "ends, as users write it (vchan at its default rings); the client writes "
        "(`write` + `drain`, or `writelines` + `drain`: 64 KiB a call), the server reads "
        "until EOF.  With `readexactly` (4-byte length prefix) and `readline` the "
        "message or line is the write size (`writelines`: one 64 KiB `[header, payload]` "
        "message, or 16 lines of 4 KiB).  Each cell stops after "
        f"{' or '.join(bound) or 'its budget'}, whichever comes first"
        + (f"; median of {repeat}" if isinstance(repeat, int) and repeat > 1 else "")
        + ".  MB/s at the receiver, first delivery to EOF.  Targets: vchan/unix >= "
        f"{TARGET_BIG:g} for writes of 16 KiB and up, >= {TARGET_SMALL:g} for 64 B and "
        f"1 KiB writes; cells below theirs are **bold**.  n/a: a line longer than the "
        f"limit (`readline` raises).")
    na = _na_cells(results, limits, reads, writes)

    for loop in loops:
        table = []
        for limit, read in itertools.product(limits, reads):
            cells = []
            for write in writes:
                key = (loop, limit, read, write)
                if (limit, read, write) in na:
                    cells.append("n/a")
                elif any((r := by.get((*key, t))) is not None and r.get("ok") is False
                         for t in ("vchan", "unix")):
                    cells.append("failed")
                else:
                    v, u = _rate(by, key, "vchan"), _rate(by, key, "unix")
                    cells.append(_fmt_ratio(v / u if v is not None and u else None,
                                            write_target(write)))
            if any(c != "-" for c in cells):
                table.append([human_size(limit), READ_TEXT.get(read, read), *cells])
        if table:
            lines += ["", f"### {loop}: vchan / Unix sockets", ""]
            lines += _table(["limit", "read", *(WRITE_TEXT.get(w, w) for w in writes)], table)

    misses = [c for c in ratios(results) if not c["met"]]
    lines += ["", "### Cells below their target", ""]
    if not misses:
        lines.append("None." if ratios(results) else "No cell has vchan and unix figures.")
    else:
        lines += _table(
            ["loop", "cell", "vchan/unix", "needs", "vchan/tcp", "vchan MB/s", "unix MB/s"],
            ([c["loop"], _where(c), f"{c['vchan_vs_unix']:.2f}", f"{c['target']:g}",
              _fmt_ratio(c["vchan_vs_tcp"]),
              _mbps(_rate(by, (c["loop"], c["limit"], c["read"], c["write"]), "vchan")),
              _mbps(_rate(by, (c["loop"], c["limit"], c["read"], c["write"]), "unix"))]
             for c in sorted(misses, key=lambda c: c["vchan_vs_unix"])), left=2)
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        lines += ["", "Failed cells:", ""]
        lines += [f"- {r.get('loop')}, {r.get('transport')}, {_where(r)}: "
                  f"{str(r.get('error')).replace('|', '/')}" for r in failed]

    lines += ["", "### CPU per byte", "",
              "CPU time (user + sys) of each process over the transfer / bytes, ns/B: the "
              "sender by write style (median over limits and read styles), the receiver by "
              "read style (median over limits and write styles)."]
    transports = [t for t in ("vchan", "unix", "tcp") if any(r.get("transport") == t
                                                             for r in rows)]
    for side, field, axis, styles, text in (
            ("sender", "client_cpu_ns_per_byte", "write", writes, WRITE_TEXT),
            ("receiver", "server_cpu_ns_per_byte", "read", reads, READ_TEXT)):
        table = []
        for style in styles:
            for loop in loops:
                cells = []
                for t in transports:
                    vals = [x for r in rows if r.get("loop") == loop and r.get("transport") == t
                            and r.get(axis) == style and (x := _num(r.get(field))) is not None]
                    cells.append(_ns(statistics.median(vals)) if vals else "-")
                table.append([text.get(style, style), loop, *cells])
        lines += ["", *_table([f"{side}: {axis} style", "loop", *transports], table)]

    img = plots.pop("matrix", None)
    if img is not None:
        lines += ["", f"![vchan / Unix sockets per cell]({img})"]

    lines += ["", "### Every cell", "",
              "MB/s, ratios, and CPU ns/B as sender / receiver."]
    headers = ["loop", "limit", "read", "write", *(f"{t} MB/s" for t in transports)]
    headers += [f"vchan/{t}" for t in transports if t != "vchan"]
    headers += [f"{t} CPU ns/B" for t in transports]
    table = []
    for loop, limit, read, write in itertools.product(loops, limits, reads, writes):
        cell = (loop, limit, read, write)
        if (limit, read, write) in na:
            table.append([loop, human_size(limit), READ_TEXT.get(read, read),
                          WRITE_TEXT.get(write, write), *(["n/a"] * (len(headers) - 4))])
            continue
        found = {t: by.get((*cell, t)) for t in transports}
        if all(r is None for r in found.values()):
            continue
        rates = {t: _rate(by, cell, t) for t in transports}
        v = rates.get("vchan")
        cells = [("failed" if (r := found[t]) is not None and r.get("ok") is False
                  else _mbps(rates[t])) for t in transports]
        cells += [_fmt_ratio(v / other if v is not None and (other := rates[t]) else None)
                  for t in transports if t != "vchan"]
        cells += [f"{_ns(_num((found[t] or {}).get('client_cpu_ns_per_byte')))} / "
                  f"{_ns(_num((found[t] or {}).get('server_cpu_ns_per_byte')))}"
                  for t in transports]
        table.append([loop, human_size(limit), READ_TEXT.get(read, read),
                      WRITE_TEXT.get(write, write), *cells])
    lines += ["", *_table(headers, table, left=4)]
    return lines


def write_matrix_plot(results: Json, outdir: Path) -> Path | None:
    """``matrix.png``: vchan/unix per cell, a heat map per loop (None without data)."""
    cells = ratios(results)
    if not cells:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    loops, limits, reads, writes = _axes(results)
    loops = [lp for lp in loops if any(c["loop"] == lp for c in cells)]
    ylabels = [(lim, r) for lim in limits for r in reads]
    by = {(c["loop"], c["limit"], c["read"], c["write"]): c["vchan_vs_unix"] for c in cells}
    fig = Figure(figsize=(max(7.0, 1.1 * len(writes) * len(loops) + 3.6),
                          0.32 * len(ylabels) + 2.0), layout="constrained")
    axes = fig.subplots(1, len(loops), sharey=True, squeeze=False)[0]
    norm = LogNorm(vmin=0.25, vmax=4)
    image = None
    for ax, loop in zip(axes, loops, strict=True):
        grid = [[by.get((loop, lim, r, w), math.nan) for w in writes] for lim, r in ylabels]
        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
        for i, (lim, r) in enumerate(ylabels):
            for j, w in enumerate(writes):
                x = grid[i][j]
                text = "n/a" if cell_na(lim, r, w) else "" if math.isnan(x) else f"{x:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(writes)))
        ax.set_xticklabels([WRITE_TEXT.get(w, w) for w in writes], rotation=45, ha="right",
                           fontsize=8)
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels([f"{human_size(lim)}, {READ_TEXT.get(r, r)}" for lim, r in ylabels],
                           fontsize=8)
        ax.set_title(loop)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), label="vchan / Unix sockets (MB/s)")
        ticks = [0.25, 0.5, 1, 1.5, 2, 4]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.minorticks_off()
    fig.suptitle("Streams matrix: vchan / Unix sockets")
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "matrix.png"
    fig.savefig(path, dpi=110)
    return path
