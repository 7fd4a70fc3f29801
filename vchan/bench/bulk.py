"""``vchan bench --cases bulk``: throughput, one direction or both at once.

The client writes N bytes (``--bytes``; small writes send fewer,
``--max-writes``) as ``write(block); await drain()`` with blocks of each
``--sizes``, then ``write_eof()``; the server receives with the streams API
(``reader.read(1 MiB)``), a plain ``Protocol`` or a ``BufferedProtocol``
with one 1 MiB buffer.  ``--directions both``: each side writes N bytes
while reading the other's (streams API); the rate is the sum.  Rates are
taken at the receiver, from its first delivery to EOF.  vchan runs at the
default ring size and, for the ring-size sweep, at each ``--ring-sizes``.
Rows record the CPU time per byte of both processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from .common import READ_SIZE, BenchError, Json, cpu_seconds, human_size, plan_fields, planned
from .endpoints import connect, listen, nodelay, one_connection, serve_until


async def send_bulk(writer: asyncio.StreamWriter, nbytes: int, size: int) -> int:
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
        nodelay(transport)

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
            self.done.set_result(dict(bulk_result(self.total, self.first, self.calls,
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



def bulk_result(total: int, first: int, calls: int, t0: float, t1: float) -> Json:
    """A receiver's rate from its first delivery to EOF (the first piece not counted)."""
    seconds = t1 - t0
    after = total - first
    if after <= 0 or seconds <= 0:
        raise BenchError(f"everything ({total} B) arrived in one piece: use more --bytes")
    return {"bytes": total, "seconds": seconds, "bytes_per_s": after / seconds,
            "first_delivery_bytes": first, "deliveries": calls}


async def stream_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
    """Receive with ``reader.read(1 MiB)`` until EOF."""
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
    return bulk_result(total, first, calls, t0, t1)


# ---------------------------------------------------------------------------
# The children.
# ---------------------------------------------------------------------------


async def serve(cmd: Json, emit: Callable[..., None]) -> Json:
    """Listen, say ready, receive one connection's bytes (with the command's
    receiver), report the rate."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Json] = loop.create_future()
    factory: Callable[[], asyncio.BaseProtocol] | None = None
    callback = None
    receiver = cmd.get("receiver", "streams")
    if receiver == "protocol":
        def factory() -> asyncio.BaseProtocol:
            return CountingProtocol(done)
    elif receiver == "buffered":
        def factory() -> asyncio.BaseProtocol:
            return CountingBufferedProtocol(done)
    else:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
            cpu0 = cpu_seconds()
            if cmd.get("direction") == "both":
                result, _ = await asyncio.gather(
                    stream_bulk(reader, writer),
                    send_bulk(writer, cmd["bytes"], cmd["write_size"]))
            else:
                result = await stream_bulk(reader, writer)
            result["cpu_seconds"] = cpu_seconds() - cpu0
            return result

        callback = one_connection(done, handle)

    return await serve_until(cmd, emit, done, listen(cmd, factory, callback))


async def client(cmd: Json) -> Json:
    """Connect, send the bytes (and, both directions, receive the server's), close."""
    nbytes, size = cmd["bytes"], cmd["write_size"]
    reader, writer = await connect(cmd)
    try:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        if cmd.get("direction") == "both":
            received, writes = await asyncio.gather(stream_bulk(reader, writer),
                                                    send_bulk(writer, nbytes, size))
            t1 = t2 = time.perf_counter()
        else:
            received = None
            writes = await send_bulk(writer, nbytes, size)
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


# ---------------------------------------------------------------------------
# The parent: plan, progress, rows.
# ---------------------------------------------------------------------------


def bulk_bytes(args: argparse.Namespace, size: int) -> int:
    """Bytes for one bulk run: --bytes, fewer for small writes (each is a drain())."""
    return max(size, min(int(args.bytes), size * int(args.max_writes)))


def plan(args: argparse.Namespace) -> list[Json]:
    """The bulk measurements: by direction, receiver, write size, loop, transport
    (and for vchan, ring size)."""
    out: list[Json] = []
    vchan_rings = [None] + [r for r in args.ring_sizes if r != args.default_ring]
    for direction in args.directions:
        receivers = args.receivers if direction == "one" else ["streams"]
        for receiver in receivers:
            for size in args.sizes:
                nbytes = bulk_bytes(args, size)
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
                            out.append(planned(
                                "bulk", transport, loop,
                                0.4 + nbytes / 1.0e9 * (2 if direction == "both" else 1)
                                + writes * 6e-6,
                                direction=direction, receiver=receiver, write_size=size,
                                bytes=nbytes, ring_size=ring))
    return out


def describe(m: Json) -> str:
    """A bulk measurement in the progress lines."""
    what = (f"bulk {m['direction']:>4} {m['receiver']:>8} {human_size(m['write_size']):>8}"
            + (f" ring {human_size(m['ring_size'])}" if m["ring_size"] else ""))
    return f"{what} {m['loop']} {m['transport']}"


def row(m: Json, server: Json, client: Json) -> Json:
    """A result row from both halves, after checking that every byte arrived."""
    keep = plan_fields(m)
    if server["bytes"] != m["bytes"]:
        raise BenchError(f"{describe(m)}: the server got {server['bytes']} of "
                         f"{m['bytes']} bytes")
    out = {**keep, **server, "client_writes": client["writes"],
           "client_write_seconds": client["write_seconds"],
           "client_seconds_to_close": client["seconds_to_close"]}
    # CPU per byte moved (both directions: per byte of the two together).
    moved = m["bytes"] * (2 if m["direction"] == "both" else 1)
    out["server_cpu_seconds"] = out.pop("cpu_seconds")
    out["server_cpu_ns_per_byte"] = out["server_cpu_seconds"] / moved * 1e9
    out["client_cpu_seconds"] = client["cpu_seconds"]
    out["client_cpu_ns_per_byte"] = client["cpu_seconds"] / moved * 1e9
    if m["direction"] == "both":
        back = client["received"]
        if back["bytes"] != m["bytes"]:
            raise BenchError(f"{describe(m)}: the client got {back['bytes']} of "
                             f"{m['bytes']} bytes")
        out["up_bytes_per_s"] = server["bytes_per_s"]
        out["down_bytes_per_s"] = back["bytes_per_s"]
        out["bytes_per_s"] = server["bytes_per_s"] + back["bytes_per_s"]
    return out


def summary(row: Json) -> str:
    """A bulk row in the progress lines."""
    return (f"{row['bytes_per_s'] / 1e6:9.1f} MB/s, CPU ns/B send "
            f"{row['client_cpu_ns_per_byte']:.2f} recv {row['server_cpu_ns_per_byte']:.2f}")
