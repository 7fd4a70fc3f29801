"""The parts a domain plays in the rig's cross-domain tests.

Run as ``python3 roles.py ROLE ARGS`` in dom0 (by the tests, as a
subprocess) or in a domU (through its agent).  Each role reports on stdout
as JSON lines: ``{"event": ...}`` for progress a test waits for, and a last
line with its result.  Each role bounds its own waits (``--deadline``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any


def report(**fields: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps(fields), flush=True)


def payload(size: int, seed: int) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def _port(text: str) -> int | str:
    return int(text) if text.isdigit() else text


# -- streams ------------------------------------------------------------------------------


async def echo_server(args: argparse.Namespace) -> int:
    """Serve ``--connections`` clients: echo everything, report each one's SHA-256."""
    import vchan

    done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        count = 0
        try:
            while chunk := await reader.read(65536):
                digest.update(chunk)
                count += len(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.close()
            await writer.wait_closed()
            await done.put({"received": count, "sha256": digest.hexdigest()})
        except OSError as exc:
            await done.put({"received": count, "error": f"{type(exc).__name__}: {exc}"})

    domids = [int(p) for p in args.peers.split(",")]
    peers: Any = domids[0] if len(domids) == 1 else domids
    server = await vchan.start_server(handle, _port(args.port), peers=peers, raw=args.raw)
    report(event="listening")
    results = []
    try:
        async with asyncio.timeout(args.deadline):
            for _ in range(args.connections):
                results.append(await done.get())
    finally:
        server.close()
        await server.wait_closed()
    report(result="served", connections=results)
    return 0


async def echo_client(args: argparse.Namespace) -> int:
    """Send ``--bytes`` of data, read the echo back, compare SHA-256s."""
    import vchan

    data = payload(args.bytes, args.seed)
    started = time.monotonic()
    async with asyncio.timeout(args.deadline):
        reader, writer = await vchan.open_connection(args.domid, _port(args.port),
                                                     timeout=args.deadline)
        report(event="connected")

        async def send() -> None:
            for i in range(0, len(data), 65536):
                writer.write(data[i:i + 65536])
                await writer.drain()
            if not args.no_eof:
                writer.write_eof()

        sender = asyncio.create_task(send())
        got = await reader.readexactly(len(data))
        await sender
        extra = b"" if args.no_eof else await reader.read()
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 30)
    elapsed = time.monotonic() - started
    report(result="echoed", bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
           echo_sha256=hashlib.sha256(got).hexdigest(), match=got == data, extra=len(extra),
           seconds=round(elapsed, 3))
    return 0 if got == data and not extra else 1


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                deadline: float) -> None:
    """Exchange one line, report, then read until the peer goes; report how."""
    writer.write(b"hello\n")
    await writer.drain()
    line = await reader.readline()
    report(event="connected", line=line.decode().strip())
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            data = await reader.read()
        outcome = "eof" if not data else "data"
    except ConnectionResetError:
        outcome = "reset"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    report(result="peer-gone", outcome=outcome, waited=round(time.monotonic() - started, 2))
    writer.close()


async def hold_server(args: argparse.Namespace) -> int:
    """Accept one client and hold the connection until the client goes."""
    import vchan

    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _hold(reader, writer, args.deadline)
        finally:
            finished.set()

    server = await vchan.start_server(handle, _port(args.port), peers=int(args.peers))
    report(event="listening")
    try:
        async with asyncio.timeout(args.deadline * 2):
            await finished.wait()
    finally:
        server.close()
    return 0


async def hold_client(args: argparse.Namespace) -> int:
    """Connect and hold the connection until the server goes."""
    import vchan

    reader, writer = await vchan.open_connection(args.domid, _port(args.port),
                                                 timeout=args.deadline)
    await _hold(reader, writer, args.deadline)
    return 0


# -- grants -------------------------------------------------------------------------------


def grant_share(args: argparse.Namespace) -> int:
    """Share a page with ``peer`` holding ``marker``; hold it until killed or the deadline."""
    from vchan.devices import GrantSharer

    marker = bytes.fromhex(args.marker)
    with GrantSharer() as sharer, sharer.share(args.peer, 1, writable=not args.readonly) as pages:
        pages.write(0, marker)
        report(event="shared", refs=list(pages.refs))
        end = time.monotonic() + args.deadline
        while time.monotonic() < end:
            time.sleep(0.2)
            if pages.read(0, len(marker)) != marker:
                report(event="changed", data=pages.read(0, len(marker)).hex())
                marker = pages.read(0, len(marker))
    return 0


def grant_map(args: argparse.Namespace) -> int:
    """Map grant ``ref`` of ``owner``; report what it holds (and write, if asked)."""
    from vchan.devices import GrantMapper

    writable = args.writable or bool(args.write)
    try:
        with GrantMapper() as mapper, mapper.map(args.owner, [args.ref],
                                                 writable=writable) as pages:
            data = pages.read(0, args.length)
            if args.write:
                pages.write(0, bytes.fromhex(args.write))
            report(result="mapped", ok=True, data=data.hex())
    except OSError as exc:
        report(result="mapped", ok=False, errno=exc.errno,
               error=f"{type(exc).__name__}: {exc}")
    return 0


# -- XenStore -----------------------------------------------------------------------------


def xenstore_check(args: argparse.Namespace) -> int:
    """vchan's blocking XenStore client in this domain: reads, writes, a transaction,
    permissions, a watch fired by dom0."""
    from vchan.xenstore import XenStoreSync

    checks: dict[str, Any] = {}
    with XenStoreSync(timeout=30) as xs:
        checks["path"] = xs.path
        domid = int(xs.read("domid"))
        checks["domid"] = domid
        xs.write("data/xs-check/a", "1")
        checks["read_back"] = xs.read("data/xs-check/a").decode()
        with xs.transaction() as tx:
            tx.write("data/xs-check/b", "2")
            tx.write("data/xs-check/c", "3")
        checks["directory"] = sorted(xs.directory("data/xs-check"))
        checks["home"] = xs.get_domain_path(domid)
        try:
            xs.read("/local/domain/0/name")
            checks["dom0_name"] = "readable"
        except PermissionError:
            checks["dom0_name"] = "EACCES"
        except OSError as exc:
            checks["dom0_name"] = errno.errorcode.get(exc.errno or 0, str(exc))
        watch = xs.watch("data/xs-check/ping")
        watch.wait(timeout=30)          # the first event comes on registration
        report(event="watching")
        deadline = time.monotonic() + args.deadline
        value = b""
        while time.monotonic() < deadline and value != b"pong":
            try:
                watch.wait(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            try:
                value = xs.read("data/xs-check/ping")
            except FileNotFoundError:
                value = b""
        checks["watched"] = value.decode()
        watch.close()
    report(result="xenstore", **checks)
    return 0


# -- benchmark: the same asyncio streams code over vchan and over TCP ---------------------------


async def _open(kind: str, domid: int, port: str, host: str
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    import vchan

    if kind == "vchan":
        return await vchan.open_connection(domid, _port(port), timeout=60)
    return await asyncio.open_connection(host, int(port))


async def bench_server(args: argparse.Namespace) -> int:
    """Serve benchmark connections: mode byte ``B`` (bulk: read to EOF, answer
    ``K``) or ``P`` (ping-pong: echo until EOF)."""
    import vchan

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = await reader.readexactly(1)
        if mode == b"B":
            while await reader.read(1 << 18):
                pass
            writer.write(b"K")
        else:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        await writer.drain()
        writer.close()

    server: Any
    if args.kind == "vchan":
        server = await vchan.start_server(handle, _port(args.port), peers=int(args.peers))
    else:
        server = await asyncio.start_server(handle, "0.0.0.0", int(args.port))
    report(event="listening")
    await asyncio.sleep(args.deadline)
    server.close()
    return 0


async def bench_client(args: argparse.Namespace) -> int:
    """Bulk throughput and ping-pong round trips against ``bench-server``."""
    block = os.urandom(1 << 16)
    total = args.mib << 20
    async with asyncio.timeout(args.deadline):
        reader, writer = await _open(args.kind, args.domid, args.port, args.host)
        writer.write(b"B")
        started = time.perf_counter()
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        assert await reader.readexactly(1) == b"K"
        bulk = time.perf_counter() - started
        writer.close()
        reader, writer = await _open(args.kind, args.domid, args.port, args.host)
        writer.write(b"P")
        message = b"x" * args.size
        rtts = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            writer.write(message)
            await reader.readexactly(len(message))
            rtts.append(time.perf_counter() - t)
        writer.close()
    rtts.sort()
    report(result="bench", kind=args.kind, mib=args.mib, seconds=round(bulk, 3),
           mib_per_s=round(args.mib / bulk, 3), rounds=args.rounds, size=args.size,
           rtt_median_us=round(rtts[len(rtts) // 2] * 1e6, 1),
           rtt_p90_us=round(rtts[int(len(rtts) * 0.9)] * 1e6, 1))
    return 0



# -- the C peer's helpers -------------------------------------------------------------------


def unix_echo(args: argparse.Namespace) -> int:
    """An echo server on a Unix socket (behind ``vchan-socket-proxy --mode=server``)."""
    with _fresh_path(args.path), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(args.path)
        srv.listen(4)
        srv.settimeout(args.deadline)
        report(event="listening")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(args.deadline)
            total = 0
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
                total += len(chunk)
        report(result="unix-echoed", bytes=total)
    return 0


@contextlib.contextmanager
def _fresh_path(path: str) -> Iterator[None]:
    """Remove a stale socket at ``path`` before and after."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="bound on every wait of the role, in seconds")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("echo-server")
    p.add_argument("port")
    p.add_argument("--peers", required=True, help="peer domid(s), comma-separated")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="raw libxenvchan server (C peers)")
    p = sub.add_parser("echo-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-eof", action="store_true",
                   help="do not half-close (a libxenvchan peer has no half-close)")
    p = sub.add_parser("hold-server")
    p.add_argument("port")
    p.add_argument("--peers", required=True)
    p = sub.add_parser("hold-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p = sub.add_parser("grant-share")
    p.add_argument("peer", type=int)
    p.add_argument("--marker", required=True, help="hex bytes written at offset 0")
    p.add_argument("--readonly", action="store_true")
    p = sub.add_parser("grant-map")
    p.add_argument("owner", type=int)
    p.add_argument("ref", type=int)
    p.add_argument("--writable", action="store_true")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--write", default="", help="hex bytes to write at offset 0 once mapped")
    sub.add_parser("xenstore-check")
    p = sub.add_parser("unix-echo")
    p.add_argument("path")
    p = sub.add_parser("bench-server")
    p.add_argument("kind", choices=["vchan", "tcp"])
    p.add_argument("port")
    p.add_argument("--peers", default="0")
    p = sub.add_parser("bench-client")
    p.add_argument("kind", choices=["vchan", "tcp"])
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p.add_argument("--host", default="", help="the server's address (tcp)")
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--size", type=int, default=64, help="ping-pong message size")
    args = parser.parse_args(argv)

    role = args.role
    if role == "echo-server":
        return asyncio.run(echo_server(args))
    if role == "echo-client":
        return asyncio.run(echo_client(args))
    if role == "hold-server":
        return asyncio.run(hold_server(args))
    if role == "hold-client":
        return asyncio.run(hold_client(args))
    if role == "grant-share":
        return grant_share(args)
    if role == "grant-map":
        return grant_map(args)
    if role == "xenstore-check":
        return xenstore_check(args)
    if role == "bench-server":
        return asyncio.run(bench_server(args))
    if role == "bench-client":
        return asyncio.run(bench_client(args))
    if role == "unix-echo":
        return unix_echo(args)
    parser.error(f"unknown role {role}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
