"""``vchan bench --cases pingpong``: request/response latency.

64 B and 4 KiB messages (``--ping-sizes``) echoed by the server
(``readexactly``): warm-up, then timed round trips at the client: rt/s,
p50/p99/p99.9 and the whole distribution (``cdf_us``).  vchan runs by
default (adaptive polling) and with ``busy_poll=`` at each ``--busy-poll``
(0: never polls).  Sparse requests (``--ping-gaps``): 64 B round trips with
that pause between them, vchan by default and with ``busy_poll=0`` against
Unix sockets, for what polling costs where it does not pay.  Rows record
the CPU time per round trip of both processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from .common import BenchError, Json, cpu_seconds, human_size, percentiles_us, plan_fields, planned
from .endpoints import connect, listen, one_connection, serve_until


async def stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      size: int) -> Json:
    """Echo ``size``-byte messages until EOF."""
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


async def serve(cmd: Json, emit: Callable[..., None]) -> Json:
    """Listen, say ready, echo one connection's messages, report the count."""
    done: asyncio.Future[Json] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Json:
        cpu0 = cpu_seconds()
        result = await stream_echo(reader, writer, cmd["message_size"])
        result["cpu_seconds"] = cpu_seconds() - cpu0
        return result

    return await serve_until(cmd, emit, done, listen(cmd, None, one_connection(done, handle)))


async def client(cmd: Json) -> Json:
    """Connect, time round trips of one message, close."""
    size, warmup, rounds = cmd["message_size"], cmd["warmup"], cmd["rounds"]
    message = random.Random(size).randbytes(size)
    samples = [0] * rounds
    gap = cmd.get("gap_us", 0) * 1e-6       # a pause before each request
    reader, writer = await connect(cmd)
    clock = time.perf_counter_ns
    sleep = asyncio.sleep
    try:
        write, drain, readexactly = writer.write, writer.drain, reader.readexactly
        for _ in range(warmup):
            if gap:
                await sleep(gap)
            write(message)
            await drain()
            if await readexactly(size) != message:
                raise BenchError("the echo differs from the message")
        t0 = clock()
        cpu0 = cpu_seconds()
        for i in range(rounds):
            if gap:
                await sleep(gap)
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
            **percentiles_us(samples)}


SPARSE_ROUNDS = 1000     # round trips of a sparse-requests row (each waits its gap)


def _given(poll: float | None) -> dict[str, float]:
    """A measurement's busy_poll= (none given: the default, adaptive)."""
    return {} if poll is None else {"busy_poll": poll}


def plan(args: argparse.Namespace) -> list[Json]:
    """The ping-pong measurements: by message size, loop, transport and
    (vchan) busy_poll; then sparse requests."""
    out: list[Json] = []
    estimate = 0.4 + (args.rounds + args.warmup) * 60e-6
    for size in args.ping_sizes:
        for loop in args.loops:
            for transport in args.transports:
                polls: list[float | None] = [None]
                if transport == "vchan":
                    polls += [us / 1e6 for us in args.busy_poll]
                for poll in polls:
                    out.append(planned("pingpong", transport, loop, estimate, message_size=size,
                                       rounds=args.rounds, warmup=args.warmup, **_given(poll)))
    rounds, warmup = min(args.rounds, SPARSE_ROUNDS), min(args.warmup, SPARSE_ROUNDS // 10)
    for gap in (g for g in args.ping_gaps if g):
        for loop in args.loops:
            for transport in ("vchan", "unix"):
                if transport not in args.transports:
                    continue
                sparse: list[float | None] = [None, 0.0] if transport == "vchan" else [None]
                for poll in sparse:
                    out.append(planned("pingpong", transport, loop,
                                       0.4 + (rounds + warmup) * (gap * 1e-6 + 200e-6),
                                       message_size=min(args.ping_sizes), rounds=rounds,
                                       warmup=warmup, gap_us=gap, **_given(poll)))
    return out


def describe(m: Json) -> str:
    """A ping-pong measurement in the progress lines."""
    what = f"pingpong {human_size(m['message_size'])}"
    if m.get("gap_us"):
        what += f" every {m['gap_us']:g} us"
    if m.get("busy_poll") is not None:
        what += f" busy_poll {m['busy_poll'] * 1e6:g} us"
    return f"{what} {m['loop']} {m['transport']}"


def row(m: Json, server: Json, client: Json) -> Json:
    """A result row: the client's timings, both processes' CPU per round trip."""
    if server["echoed"] != m["rounds"] + m["warmup"]:
        raise BenchError(f"{describe(m)}: the server echoed {server['echoed']} messages")
    out = {**plan_fields(m), **client}
    # CPU per round trip of each process (the server's over warm-up too).
    out["client_cpu_us_per_rt"] = out.pop("cpu_seconds") / m["rounds"] * 1e6
    out["server_cpu_us_per_rt"] = server["cpu_seconds"] / server["echoed"] * 1e6
    return out


def summary(row: Json) -> str:
    """A ping-pong row in the progress lines."""
    return (f"{row['round_trips_per_s']:9.0f} rt/s, p50 {row['p50_us']:.1f} us, CPU us/rt "
            f"client {row['client_cpu_us_per_rt']:.1f} server "
            f"{row['server_cpu_us_per_rt']:.1f}")
