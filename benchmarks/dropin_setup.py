"""Drop-in connection set-up between two emulated domains: what it costs, and
how soon a drop-in client's HELLO reaches the server (the grace rule).

A server process in domain 1 runs a drop-in server and a plain asyncio
server (both echo one byte); a client process in domain 2 connects
``--count`` times, alternating, with

* ``tcp``: :func:`asyncio.open_connection` to the plain server (the control);
* ``dropin-tcp``: :func:`vchan.open_connection` by address to the plain
  server (no advertisement: the drop-in path's cost when it falls to TCP);
* ``dropin-vchan``: :func:`vchan.open_connection` by address to the drop-in
  server (upgraded to vchan);

each a connect, a one-byte round trip and a close.  The server measures, for
every upgraded connection, the time from accepting it to the HELLO's first
byte.  ``--bulk-mib N`` adds one transfer of N MiB (64 KiB writes, the
streams API) over TCP and one over an upgraded connection, timed by the
receiver.  One JSON line of medians and percentiles (microseconds), MB/s:

    python benchmarks/dropin_setup.py [--count 300] [--loop asyncio|uvloop] [--bulk-mib 512]

On a private emulator; about 5-15 s (and ~1 s per GiB of --bulk-mib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any


def _run(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


async def _server() -> None:
    import vchan
    from vchan import dropin
    from vchan.dropin.server import _Sniffer

    delays: list[float] = []
    sniffer_made = _Sniffer.connection_made
    sniffer_data = _Sniffer.data_received

    def made(self: Any, transport: Any) -> None:
        self._t0 = time.perf_counter()
        sniffer_made(self, transport)

    def data(self: Any, chunk: bytes) -> None:
        if not self.sniffer.data and chunk[:1] == b"\xf5":
            delays.append(time.perf_counter() - self._t0)
        sniffer_data(self, chunk)

    setattr(_Sniffer, "connection_made", made)  # noqa: B010 (mypy: a method)
    setattr(_Sniffer, "data_received", data)  # noqa: B010

    rates: dict[str, float] = {}

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(1)
        if first == b"B":                   # a bulk transfer: count it, then answer
            t0, n = time.perf_counter(), 0
            while data := await reader.read(1 << 20):
                n += len(data)
            rates[dropin.via(writer)] = n / (time.perf_counter() - t0) / 1e6
            first = b"k"
        writer.write(first)
        writer.close()

    plain = await asyncio.start_server(echo, "127.0.0.1", 0)
    drop = await vchan.start_server(echo, "127.0.0.1", 0)
    print(json.dumps({"plain": plain.sockets[0].getsockname()[1], "dropin": drop.port}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"hello_delays": delays, "bulk_MBps": rates}), flush=True)
    drop.close()
    plain.close()


async def _client(count: int, plain: int, drop: int, bulk: int) -> dict[str, list[float]]:
    import vchan
    from vchan import dropin

    async def one(kind: str) -> float:
        t0 = time.perf_counter()
        if kind == "tcp":
            reader, writer = await asyncio.open_connection("127.0.0.1", plain)
        else:
            reader, writer = await vchan.open_connection(
                "127.0.0.1", plain if kind == "dropin-tcp" else drop)
            assert dropin.via(writer) == kind.split("-")[1], (kind, dropin.via(writer))
        writer.write(b"x")
        assert await reader.read(1) == b"x"
        writer.close()
        await writer.wait_closed()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"tcp": [], "dropin-tcp": [], "dropin-vchan": []}
    for kind in times:                      # warm up: hints, the session, XenStore
        await one(kind)
    for _ in range(count):
        for kind, got in times.items():
            got.append(await one(kind))
    if bulk:
        block = bytes(1 << 16)
        for port in (plain, drop):          # TCP (no hint), then upgraded
            reader, writer = await vchan.open_connection("127.0.0.1", port)
            writer.write(b"B")
            for _ in range(bulk // len(block)):
                writer.write(block)
                await writer.drain()
            writer.write_eof()
            assert await reader.read(1) == b"k"
            writer.close()
            await writer.wait_closed()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--bulk-mib", type=int, default=0, metavar="MIB",
                        help="also time one transfer of MIB in 64 KiB writes over TCP and "
                             "over an upgraded connection (the server's MB/s)")
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        _run(_server(), args.loop)
        return
    if args.role == "client":
        plain, drop = (int(p) for p in args.ports.split(","))
        print(json.dumps(_run(_client(args.count, plain, drop, args.bulk_mib << 20),
                              args.loop)), flush=True)
        return
    from vchan.sim.private import private

    with private() as emulator:
        me = [sys.executable, __file__, "--loop", args.loop]
        server = emulator.popen([*me, "--role", "server"], domid=1,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdin is not None
            ports = json.loads(server.stdout.readline())
            client = subprocess.run(
                [*me, "--role", "client", "--count", str(args.count),
                 "--bulk-mib", str(args.bulk_mib),
                 "--ports", f"{ports['plain']},{ports['dropin']}"],
                env=emulator.env(2), capture_output=True, text=True)
            if client.returncode:
                raise SystemExit(f"the client failed:\n{client.stderr}")
            times = json.loads(client.stdout)
            server.stdin.write("done\n")
            server.stdin.flush()
            report = json.loads(server.stdout.readline())
            delays = report["hello_delays"]
        finally:
            if server.stdin is not None:
                server.stdin.close()
            server.wait(10)
            if server.stdout is not None:
                server.stdout.close()
    out: dict[str, Any] = {"loop": args.loop, "count": args.count}
    for kind, values in times.items():
        out[f"{kind}_p50_us"] = round(_pct(values, 0.5), 1)
        out[f"{kind}_p90_us"] = round(_pct(values, 0.9), 1)
    out["dropin-tcp/tcp_p50"] = round(statistics.median(times["dropin-tcp"]) /
                                      statistics.median(times["tcp"]), 3)
    out["hello_delay_p50_us"] = round(_pct(delays, 0.5), 1)
    out["hello_delay_p99_us"] = round(_pct(delays, 0.99), 1)
    out["hello_delay_max_us"] = round(max(delays) * 1e6, 1)
    for via, rate in sorted(report["bulk_MBps"].items()):
        out[f"bulk_{via}_MBps"] = round(rate)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
