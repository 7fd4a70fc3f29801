"""Sparse requests: what adaptive polling costs or saves when the peer sleeps
between requests, with the two processes free to share a CPU and pinned to
CPUs of their own (as two domains' vCPUs are).

A server process (emulated domain 1) echoes 64 B requests over one vchan
session connection; a client process (domain 2) sends one every ``--gap``
microseconds (``asyncio.sleep``, untimed) and times each round trip.  The
server's ``busy_poll`` is the default; the client's is each of
``--busy-poll`` ("default" is None).  For each request both processes note
the CPU they ran it on (``sched_getcpu``): ``same_cpu`` is the share of
requests the scheduler ran on one CPU.  One JSON line per loop, placement
and client ``busy_poll``; the placements and settings alternate, run after
run (``--runs``), so that a drifting VM moves them alike::

    python benchmarks/sparse_requests.py [--count 2000] [--gap 1000] [--runs 3]
                                         [--loops asyncio,uvloop]
                                         [--placements shared,pinned]
                                         [--busy-poll default,0]

``pinned`` puts the server on CPU 0 and the client on CPU 1 (needs two).
On a private emulator at its defaults; a few seconds a line.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from setup_phases import _cpu as _cpu_time
from setup_phases import _run

PORT = "sparse-requests"
MESSAGE = b"x" * 64
WARMUP = 100

_getcpu = ctypes.CDLL(None).sched_getcpu


async def _serve() -> None:
    import vchan

    cpus: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            cpus.append(_getcpu())
            writer.write(data)
        writer.close()

    server = await vchan.start_server(echo, PORT, peers=2)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    server.close()
    await server.wait_closed()
    print(json.dumps({"cpus": cpus}), flush=True)


async def _client(count: int, gap: float, busy_poll: float | None) -> dict[str, Any]:
    import vchan

    reader, writer = await vchan.open_connection(1, PORT, busy_poll=busy_poll)
    clock = time.perf_counter_ns
    times: list[float] = []
    cpus: list[int] = []
    cpu0 = 0.0
    for i in range(WARMUP + count):
        if i == WARMUP:
            cpu0 = _cpu_time()
        await asyncio.sleep(gap)
        t0 = clock()
        writer.write(MESSAGE)
        await reader.readexactly(len(MESSAGE))
        t1 = clock()
        cpus.append(_getcpu())
        if i >= WARMUP:
            times.append((t1 - t0) / 1e3)
    cpu = (_cpu_time() - cpu0) / count * 1e6
    writer.close()
    await writer.wait_closed()
    ordered = sorted(times)
    return {"p50_us": statistics.median(times), "p90_us": ordered[int(0.9 * len(ordered))],
            "client_cpu_us": cpu, "cpus": cpus[WARMUP:]}


def _measure(emu: Any, loop: str, placement: str, busy_poll: str, count: int,
             gap: float) -> dict[str, Any]:
    role = [sys.executable, __file__, "--loop", loop, "--placement", placement,
            "--client-poll", busy_poll, "--count", str(count), "--gap", str(gap)]
    server = emu.popen([*role, "--role", "server"], domid=1, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None
        json.loads(server.stdout.readline())
        client = emu.popen([*role, "--role", "client"], domid=2, stdout=subprocess.PIPE,
                           text=True)
        out, _ = client.communicate(timeout=60 + count * (gap * 1e-6 + 0.01))
        if client.returncode:
            raise RuntimeError(f"{loop} {placement}: the client failed ({client.returncode})")
        result: dict[str, Any] = json.loads(out)
        server.stdin.write("\n")
        server.stdin.flush()
        served = json.loads(server.stdout.readline())["cpus"][WARMUP:]
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    mine = result.pop("cpus")
    n = min(len(mine), len(served))
    result["same_cpu"] = sum(a == b for a, b in zip(mine[:n], served[:n], strict=True)) / n
    return {"loop": loop, "placement": placement, "busy_poll": busy_poll, "gap_us": gap,
            "count": count, **result}


def _poll_arg(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--gap", type=float, default=1000.0, help="microseconds")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--placements", default="shared,pinned")
    parser.add_argument("--busy-poll", default="default,0",
                        help="the client's busy_poll= values: 'default' or seconds")
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--placement", help=argparse.SUPPRESS)
    parser.add_argument("--client-poll", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    placements = args.placements.split(",")
    polls = args.busy_poll.split(",")
    if set(placements) - {"shared", "pinned"} or args.count < 1 or args.gap < 0 \
            or args.runs < 1:
        parser.error("placements are shared, pinned; --count, --runs >= 1; --gap >= 0")
    for p in polls:
        try:
            _poll_arg(p)
        except ValueError:
            parser.error(f"--busy-poll: 'default' or seconds, not {p!r}")
    if "pinned" in placements and len(os.sched_getaffinity(0)) < 2:
        parser.error("pinned needs two CPUs")
    if args.role:
        if args.placement == "pinned":
            os.sched_setaffinity(0, {0} if args.role == "server" else {1})
        if args.role == "server":
            _run(_serve(), args.loop)
        else:
            result = _run(_client(args.count, args.gap * 1e-6, _poll_arg(args.client_poll)),
                          args.loop)
            print(json.dumps(result), flush=True)
        return 0

    from vchan.sim.private import private

    with private() as emu:
        for _ in range(args.runs):
            for loop in args.loops.split(","):
                for placement in placements:
                    for poll in polls:
                        row = _measure(emu, loop, placement, poll, args.count, args.gap)
                        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
