"""One bulk transfer through the streams API between two processes, with the
receiver's page faults and both sides' CPU time per byte.

The client writes ``--bytes`` in ``--write-size`` writes (``write`` +
``drain``); the server reads with ``read(--read)`` until EOF.  Both use
``limit=--limit``.  vchan runs between emulated domains 1 and 2 of a private
emulator at its default settings (session connections, or ``--dedicated``
rings); ``--transport unix`` is the control.  One line of results:

    python benchmarks/stream_pair.py [--transport vchan|unix] [--loop asyncio|uvloop]
        [--limit 65536] [--read 1048576] [--write-size 65536] [--bytes 1G] [--dedicated]

Each side also reports its sleeps (voluntary context switches) and the
event-channel wake-ups its session sent.

Used for the page-fault and session-vs-dedicated figures in docs/streams.md and
docs/sessions.md (run it several times: single runs vary by up to 3x here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

PORT = "stream-pair"


def _usage() -> tuple[float, int, int]:
    """CPU seconds, minor page faults and sleeps (voluntary context switches)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt, ru.ru_nvcsw


def _wakes(writer: asyncio.StreamWriter) -> int:
    """Event-channel wake-ups this side's session has sent (0 for other transports)."""
    session = getattr(writer.transport, "_session", None)
    return int(session._wakes[0]) if session is not None else 0


def _run(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def _server(args: argparse.Namespace) -> None:
    import vchan

    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cpu0, faults0, sleeps0 = _usage()
        wakes0 = _wakes(writer)
        total = 0
        t0 = 0.0
        while data := await reader.read(args.read):
            if not total:
                t0 = time.perf_counter()
            total += len(data)
        seconds = time.perf_counter() - t0
        cpu1, faults1, sleeps1 = _usage()
        done.set_result({"bytes": total, "mb_per_s": total / seconds / 1e6,
                         "recv_cpu_ns_per_byte": (cpu1 - cpu0) / total * 1e9,
                         "recv_page_faults": faults1 - faults0,
                         "recv_sleeps": sleeps1 - sleeps0,
                         "recv_wakes": _wakes(writer) - wakes0})
        writer.close()

    server: vchan.Server | asyncio.Server
    if args.transport == "vchan":
        server = await vchan.start_server(receive, PORT, peers=2, limit=args.limit)
    else:
        server = await asyncio.start_unix_server(receive, args.path, limit=args.limit)
    print(json.dumps({"ready": True}), flush=True)
    print(json.dumps(await done), flush=True)
    server.close()


async def _client(args: argparse.Namespace) -> None:
    import vchan

    if args.transport == "vchan":
        reader, writer = await vchan.open_connection(1, PORT, timeout=10, limit=args.limit,
                                                     dedicated=args.dedicated)
    else:
        reader, writer = await asyncio.open_unix_connection(args.path, limit=args.limit)
    block = os.urandom(args.write_size)
    cpu0, _, sleeps0 = _usage()
    wakes0 = _wakes(writer)
    for _ in range(args.bytes // args.write_size):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    await reader.read(1)
    cpu1, _, sleeps1 = _usage()
    print(json.dumps({"send_cpu_ns_per_byte": (cpu1 - cpu0) / args.bytes * 1e9,
                      "send_sleeps": sleeps1 - sleeps0, "send_wakes": _wakes(writer) - wakes0}),
          flush=True)
    writer.close()


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["vchan", "unix"], default="vchan")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--limit", type=_size, default=65536)
    parser.add_argument("--read", type=_size, default=1 << 20)
    parser.add_argument("--write-size", type=_size, default=65536)
    parser.add_argument("--bytes", type=_size, default=1 << 30)
    parser.add_argument("--dedicated", action="store_true")
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        _run(_server(args) if args.role == "server" else _client(args), args.loop)
        return
    from vchan.sim.private import private

    with private() as emulator, tempfile.TemporaryDirectory(prefix="stream-pair-") as tmp:
        base = [sys.executable, __file__, *sys.argv[1:], "--path", os.path.join(tmp, "sock")]
        server = emulator.popen([*base, "--role", "server"], domid=1, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert server.stdout is not None
            json.loads(server.stdout.readline())            # ready
            client = subprocess.run([*base, "--role", "client"], capture_output=True,
                                    text=True, env=emulator.env(2), check=True, timeout=600)
            result = {**json.loads(server.stdout.readline()),
                      **json.loads(client.stdout.splitlines()[-1])}
        finally:
            server.wait(timeout=30)
            if server.stdout is not None:
                server.stdout.close()
    kind = args.transport + (" dedicated" if args.dedicated else "")
    print(f"{kind} {args.loop} limit={args.limit} read={args.read} write={args.write_size}: "
          f"{result['mb_per_s']:,.0f} MB/s, CPU ns/B send {result['send_cpu_ns_per_byte']:.3f} "
          f"recv {result['recv_cpu_ns_per_byte']:.3f}, receiver page faults "
          f"{result['recv_page_faults']:,}; sleeps send {result['send_sleeps']:,} "
          f"recv {result['recv_sleeps']:,}, wake-ups sent send {result['send_wakes']:,} "
          f"recv {result['recv_wakes']:,}")


if __name__ == "__main__":
    main()
