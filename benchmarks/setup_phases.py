"""Where a connection's set-up time goes, phase by phase: vchan (a stream of
the client's session) against TCP loopback and Unix sockets.

A server process (emulated domain 1) serves with ``start_server`` and the
callback ``vchan bench --cases setup`` uses (read 1 byte, echo it, read to
EOF, close); a client process (domain 2) connects ``--count`` times in a
row, as that case does, and times each phase of each connection:

* ``open``: ``await open_connection(...)``;
* ``write``: ``writer.write(b"x")`` (for vchan it carries the OPEN's
  wake-up of the server);
* ``echo``: ``await reader.readexactly(1)``: the server's accept and its
  answer;
* ``close``: ``writer.close(); await writer.wait_closed()``.

Both processes report their CPU time per connection (user + system, from
``getrusage``, over the timed connections only).  One JSON line per
transport and loop, medians in microseconds::

    python benchmarks/setup_phases.py [--count 3000] [--loops asyncio,uvloop]
                                      [--transports vchan,tcp,unix]

On a private emulator at its defaults; a few seconds per transport and loop.
Compare figures within one run: the VM this was written on moves between
giving two processes one CPU's wake-ups and two CPUs' ones over minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

PHASES = ("open", "write", "echo", "close")
VCHAN_PORT = "setup-phases"


def _run(coro: Coroutine[Any, Any, Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _serve(transport: str, address: str, warmup: int, count: int) -> None:
    import vchan

    served = 0
    cpu = {"first": 0.0, "last": 0.0}      # at the first timed connection, after the last

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served == warmup + 1:
            cpu["first"] = _cpu()
        writer.write(await reader.readexactly(1))
        await reader.read()
        writer.close()
        await writer.wait_closed()
        if served == warmup + count:
            cpu["last"] = _cpu()

    server: Any
    if transport == "vchan":
        server = await vchan.start_server(echo, VCHAN_PORT, peers=2)
        ready = VCHAN_PORT
    elif transport == "tcp":
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        ready = str(server.sockets[0].getsockname()[1])
    else:
        server = await asyncio.start_unix_server(echo, address)
        ready = address
    print(json.dumps({"ready": ready}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    server.close()
    await server.wait_closed()
    print(json.dumps({"server_cpu_us": (cpu["last"] - cpu["first"]) / count * 1e6}),
          flush=True)


async def _connect(transport: str, address: str) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    import vchan

    if transport == "vchan":
        return await vchan.open_connection(1, address)
    if transport == "tcp":
        return await asyncio.open_connection("127.0.0.1", int(address))
    return await asyncio.open_unix_connection(address)


async def _client(transport: str, address: str, warmup: int, count: int) -> dict[str, Any]:
    clock = time.perf_counter_ns
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    totals: list[float] = []
    cpu0 = 0.0
    for i in range(warmup + count):
        if i == warmup:
            cpu0 = _cpu()
        t0 = clock()
        reader, writer = await _connect(transport, address)
        t1 = clock()
        writer.write(b"x")
        t2 = clock()
        if await reader.readexactly(1) != b"x":
            raise RuntimeError("the echo differs")
        t3 = clock()
        writer.close()
        await writer.wait_closed()
        t4 = clock()
        if i >= warmup:
            for name, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)),
                                    strict=True):
                phases[name].append((b - a) / 1e3)
            totals.append((t4 - t0) / 1e3)
    cpu = (_cpu() - cpu0) / count * 1e6
    ordered = sorted(totals)
    return {"p50_us": statistics.median(totals), "p90_us": ordered[int(0.9 * len(ordered))],
            "connections_per_s": count / (sum(totals) / 1e6),
            "phases_p50_us": {p: statistics.median(v) for p, v in phases.items()},
            "client_cpu_us": cpu}


def _measure(emu: Any, transport: str, loop: str, warmup: int, count: int,
             workdir: Path) -> dict[str, Any]:
    role = [sys.executable, __file__, "--loop", loop, "--transports", transport,
            "--count", str(count), "--warmup", str(warmup)]
    server = emu.popen([*role, "--role", "server",
                        "--address", str(workdir / f"{transport}-{loop}.sock")],
                       domid=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None
        ready = json.loads(server.stdout.readline())["ready"]
        client = emu.popen([*role, "--role", "client", "--address", ready], domid=2,
                           stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=60 + count * 0.05)
        if client.returncode:
            raise RuntimeError(f"{transport} {loop}: the client failed ({client.returncode})")
        result: dict[str, Any] = json.loads(out)
        server.stdin.write("\n")
        server.stdin.flush()
        result.update(json.loads(server.stdout.readline()))
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"transport": transport, "loop": loop, "count": count, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--transports", default="vchan,tcp,unix")
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    transports = args.transports.split(",")
    unknown = set(transports) - {"vchan", "tcp", "unix"}
    if unknown or args.count < 1 or args.warmup < 0:
        parser.error(f"transports are vchan, tcp, unix (not {sorted(unknown)}); "
                     "--count >= 1, --warmup >= 0")
    if args.role == "server":
        _run(_serve(transports[0], args.address, args.warmup, args.count), args.loop)
        return 0
    if args.role == "client":
        result = _run(_client(transports[0], args.address, args.warmup, args.count),
                      args.loop)
        print(json.dumps(result), flush=True)
        return 0

    from vchan.sim.private import private

    with private() as emu, tempfile.TemporaryDirectory(prefix="setup-") as tmp:
        for loop in args.loops.split(","):
            for transport in transports:
                row = _measure(emu, transport, loop, args.warmup, args.count, Path(tmp))
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
