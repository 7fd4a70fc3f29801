"""``vchan bench --cases connections,setup``: many connections, and how fast they open.

* **connections**: 1, 10, 100, 1,000, 10,000 connections opened at once;
  each says hello and waits for the server's ack (all idle: memory per
  connection is the RSS growth of each process / N), then all send their
  share of ``connection_bytes`` at once: aggregate MB/s.  A failed
  measurement is a result too (a limit was hit: grants, descriptors).
* **setup**: connect + one byte echoed + close, one after another:
  connections/s and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from .bulk import send_bulk
from .common import READ_SIZE, BenchError, Json, percentiles_us, plan_fields, planned, rss
from .endpoints import connect, listen, nodelay, serve_until


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
    rss0 = rss()
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
            state.idle = rss()
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
            nodelay(writer.transport)
            await handler(reader, writer)
        except Exception as exc:       # the measurement's failure: reported once, by fail()
            fail(exc)
            writer.close()

    return await serve_until(cmd, emit, done, listen(cmd, None, callback))


async def client_connections(cmd: Json) -> Json:
    """N connections at once: open all, hello/ack, then bulk on every one."""
    n, per_conn, size = cmd["connections"], cmd["bytes_per_conn"], cmd["write_size"]
    rss0 = rss()
    opening = asyncio.Semaphore(64)     # connects in flight at once

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with opening:
            return await connect(cmd)

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
        rss1 = rss()

        async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await send_bulk(writer, per_conn, size)
            if await reader.read(1):
                raise BenchError("the server sent data in a bulk run")

        await asyncio.gather(*(bulk(r, w) for r, w in conns))
    finally:
        for _, writer in conns:
            writer.close()
        for _, writer in conns:
            with contextlib.suppress(OSError):      # (what failed is reported above)
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
        reader, writer = await connect(cmd)
        writer.write(b"x")
        if await reader.readexactly(1) != b"x":
            raise BenchError("the echo differs")
        writer.close()
        await writer.wait_closed()
        if i >= warmup:
            samples.append(clock() - t)
    elapsed = (clock() - t0) / 1e9
    stats = percentiles_us(samples)
    return {"connections_per_s": count / elapsed, "p50_us": stats["p50_us"],
            "p99_us": stats["p99_us"], "n": count}


def plan_connections(args: argparse.Namespace) -> list[Json]:
    """The many-connections measurements: by count, loop, transport."""
    out: list[Json] = []
    for n in args.connection_counts:
        per_conn = max(16 << 10, args.connection_bytes // n)
        for loop in args.loops:
            for transport in args.transports:
                out.append(planned("connections", transport, loop,
                                   0.5 + n * 3e-4
                                   + n * per_conn / 0.8e9,
                                   connections=n, bytes_per_conn=per_conn,
                                   write_size=64 << 10))
    return out


def plan_setup(args: argparse.Namespace) -> list[Json]:
    """The setup-rate measurements: by loop, transport."""
    return [planned("setup", transport, loop, 0.4 + (args.setup_count + 20) * 4e-4,
                    count=args.setup_count, warmup=20)
            for loop in args.loops for transport in args.transports]


def describe(m: Json) -> str:
    """A connections or setup measurement in the progress lines."""
    what = f"{m['connections']} connections" if m["case"] == "connections" \
        else "connection setup"
    return f"{what} {m['loop']} {m['transport']}"


def row(m: Json, server: Json, client: Json) -> Json:
    """A result row: connections from both processes, setup from the client."""
    keep = plan_fields(m)
    if m["case"] == "connections":
        return {**keep, "bytes_per_s": server["bytes_per_s"], "bytes": server["bytes"],
                "seconds": server["seconds"], "server_rss_per_conn": server["rss_per_conn"],
                "server_shmem_per_conn": server["shmem_per_conn"],
                "client_rss_per_conn": client["rss_per_conn"],
                "client_shmem_per_conn": client["shmem_per_conn"],
                "connect_seconds": client["connect_seconds"], "ok": True, "error": None}
    return {**keep, **client}
    return {**keep, **client}


def summary(row: Json) -> str:
    """A connections or setup row in the progress lines."""
    if row["case_"] == "connections":
        if not row["ok"]:
            return f"FAILED: {row['error']}"
        return (f"{row['bytes_per_s'] / 1e6:9.1f} MB/s, "
                f"{(row['server_rss_per_conn'] + row['client_rss_per_conn']) / 1024:.0f} "
                f"KiB/connection")
    return f"{row['connections_per_s']:9.0f} connections/s, p50 {row['p50_us']:.0f} us"

