#!/usr/bin/env python3
"""Bulk throughput through ``vchan proxy`` next to a direct vchan stream.

Every program is a separate process, all on the same event loop kind
(``--loop``):

* **direct** -- a vchan stream client in emulated domain 2 writes N bytes to
  a vchan stream server in domain 1 (the sink).
* **vchan->tcp** -- the same client writes to ``vchan proxy --listen-vchan P
  --to tcp:127.0.0.1:S`` in domain 1, which forwards to a TCP sink.
* **tcp->vchan** -- a TCP client writes to ``vchan proxy --listen
  tcp:127.0.0.1:T --to-vchan 1 P`` in domain 2, which forwards to the vchan
  sink in domain 1.
* **tcp** -- for reference, the TCP client writing straight to a TCP sink
  (the proxied paths have a TCP end, and cannot beat it).

With ``PROXY_BENCH_CPU=1`` each process's CPU time (start-up included) is
printed on stderr: where the time goes.

The writer sends ``--mib`` MiB (default 256) in 256 KiB blocks (``write`` +
``drain``), then EOF; the rate is measured at the sink, from its first byte
to EOF.  Uses ``VCHAN_SIM_DIR``'s emulator if set, else a private one.

    python benchmarks/proxy_bench.py [--mib 256] [--loop asyncio|uvloop] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 256 * 1024


def _run(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# -- roles (run as subprocesses) ---------------------------------------------

async def _count(reader: asyncio.StreamReader) -> dict[str, float]:
    first = await reader.read(1 << 20)
    t0 = time.perf_counter()
    n = 0
    while data := await reader.read(1 << 20):
        n += len(data)
    return {"bytes": n + len(first), "timed_bytes": n, "seconds": time.perf_counter() - t0}


async def _sink(kind: str, port: str) -> None:
    import vchan

    done: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        result = await _count(reader)
        writer.close()
        if not done.done():
            done.set_result(result)

    server: Any
    if kind == "vchan":
        server = await vchan.start_server(handle, port, peers=2)
        print(json.dumps({"ready": port}), flush=True)
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(json.dumps({"ready": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        print(json.dumps(await done), flush=True)


async def _source(kind: str, where: str, nbytes: int) -> None:
    import vchan

    if kind == "vchan":
        reader, writer = await vchan.open_connection(1, where, timeout=30)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(where))
    block = os.urandom(BLOCK)
    sent = 0
    while sent < nbytes:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
    await writer.wait_closed()


# -- the driver --------------------------------------------------------------

def _spawn(domid: int, args: list[str], loop: str) -> subprocess.Popen[str]:
    env = dict(os.environ, VCHAN_DOMID=str(domid))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, *args, "--loop", loop], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def _role(domid: int, loop: str, *args: str) -> subprocess.Popen[str]:
    return _spawn(domid, [__file__, "role", *args], loop)


def _json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"exited: {proc.stderr.read() if proc.stderr else ''}")
    result: dict[str, Any] = json.loads(line)
    return result


def _proxy(domid: int, loop: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = _spawn(domid, ["-m", "vchan", "proxy", *args, "-v"], loop)
    assert proc.stderr is not None
    # -v says which backend it chose, then where it listens.
    seen = []
    while line := proc.stderr.readline():
        if "listening" in line:
            return proc, line
        seen.append(line)
    proc.wait(20)
    raise RuntimeError(f"proxy exited ({proc.returncode}): {''.join(seen)}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(20)


def measure(path: str, nbytes: int, loop: str) -> float:
    """Bytes/s at the sink for one path."""
    port = f"bench{os.getpid()}{time.monotonic_ns() % 10**8}"
    procs: list[subprocess.Popen[str]] = []
    try:
        if path == "direct":
            sink = _role(1, loop, "sink", "vchan", port)
            procs.append(sink)
            _json(sink)
            procs.append(_role(2, loop, "source", "vchan", port, str(nbytes)))
        elif path == "tcp":
            sink = _role(1, loop, "sink", "tcp", "0")
            procs.append(sink)
            tcp_port = _json(sink)["ready"]
            procs.append(_role(2, loop, "source", "tcp", str(tcp_port), str(nbytes)))
        elif path == "vchan->tcp":
            sink = _role(1, loop, "sink", "tcp", "0")
            procs.append(sink)
            tcp_port = _json(sink)["ready"]
            proxy, _ = _proxy(1, loop, "--listen-vchan", port, "--peers", "2",
                              "--to", f"tcp:127.0.0.1:{tcp_port}")
            procs.append(proxy)
            procs.append(_role(2, loop, "source", "vchan", port, str(nbytes)))
        else:
            sink = _role(1, loop, "sink", "vchan", port)
            procs.append(sink)
            _json(sink)
            proxy, line = _proxy(2, loop, "--listen", "tcp:127.0.0.1:0", "--to-vchan", "1",
                                 port)
            procs.append(proxy)
            m = re.search(r"tcp:127\.0\.0\.1:(\d+)", line)
            assert m is not None
            procs.append(_role(2, loop, "source", "tcp", m[1], str(nbytes)))
        result = _json(sink)
        if os.environ.get("PROXY_BENCH_CPU"):
            for p in procs:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                args: list[str] = list(p.args)  # type: ignore[arg-type]
                print(f"    {path} {' '.join(args[1:4])}: {cpu:.2f} s CPU",
                      file=sys.stderr)
        if result["bytes"] != nbytes:
            raise RuntimeError(f"{path}: {result['bytes']} bytes arrived of {nbytes}")
        return float(result["timed_bytes"] / result["seconds"])
    finally:
        for p in reversed(procs):
            _stop(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    role = sub.add_parser("role")
    role.add_argument("what", choices=["sink", "source"])
    role.add_argument("kind", choices=["vchan", "tcp"])
    role.add_argument("where")
    role.add_argument("nbytes", nargs="?", type=int, default=0)
    role.add_argument("--loop", default="asyncio")
    parser.add_argument("--mib", type=float, default=256)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per path (best is shown)")
    args = parser.parse_args(argv)
    if args.cmd == "role":
        if args.what == "sink":
            _run(_sink(args.kind, args.where), args.loop)
        else:
            _run(_source(args.kind, args.where, args.nbytes), args.loop)
        return 0

    from vchan.sim.private import private

    nbytes = int(args.mib * (1 << 20)) // BLOCK * BLOCK
    with private(reuse_env=True, own_domid=None):
        rates = {}
        for path in ("direct", "vchan->tcp", "tcp->vchan", "tcp"):
            rates[path] = max(measure(path, nbytes, args.loop) for _ in range(args.repeat))
        print(f"{args.mib:g} MiB, loop {args.loop}, best of {args.repeat}")
        for path, rate in rates.items():
            print(f"  {path:<12}{rate / 1e6:>10.0f} MB/s   {rate / rates['direct']:.2f}x direct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
