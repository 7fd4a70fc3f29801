"""The peer roles that the emulator tests and the Xen rig both run.

    python peer_roles.py [--deadline S] ROLE ARGS

The same code plays a peer in an emulated domain (``tests/test_streams.py``,
``tests/test_sessions.py``, ``tests/test_peer_roles.py``: a process started
with ``VCHAN_DOMID``, on the event loop ``VCHAN_TEST_LOOP`` names) and in a
Xen domain or dom0 (``tests/xen/roles.py`` adds the rig-only roles to these
and keeps the command line the rig's tests call; ``tests/xen/harness.py``
ships this file into every domU beside it).  So the rig runs the very peer
code the suite runs, with the same arguments.

Each role reports on stdout as JSON lines (``peer_events.emit``):
``{"event": ...}`` for progress a test waits for, and a last line
``{"result": ...}``.  Each role bounds its own waits (``--deadline``).

Roles:

echo-server      serve ``--connections`` clients: echo everything
echo-client      send bytes, read the echo back, compare (``dropin-client``: by address)
duplex-server    serve ``--connections`` clients: send pseudo-random bytes while
                 receiving the client's, SHA-256 of both directions
duplex-client    the client of ``duplex-server``
hold-server      accept one client, exchange a line, hold it until the client goes
hold-client      connect, exchange a line, hold it until the server goes
many-client      open many connections at once, echo a message on each, close all
bench-server     bulk (``B``) or ping-pong (``P``) connections, over vchan or TCP
setup-client     sequential connect / one byte echoed / close, timed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from peer_events import emit as report


def payload(size: int, seed: int) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def _port(text: str) -> int | str:
    return int(text) if text.isdigit() else text


#: gntalloc's grant limit for this domain (pages; Linux's default is 1,024).
GNTALLOC_LIMIT = Path("/sys/module/xen_gntalloc/parameters/limit")


def gntalloc_limit() -> int | str:
    """This domain's gntalloc limit, or why it cannot be read."""
    try:
        return int(GNTALLOC_LIMIT.read_text().strip())
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}: {exc.strerror}"
    except ValueError as exc:
        return f"unreadable: {exc}"


def _rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stdin_closed() -> None:
    """Until stdin ends (the test closed it: time to finish)."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# -- streams ------------------------------------------------------------------------------


async def echo_server(args: argparse.Namespace) -> int:
    """Serve ``--connections`` clients: echo everything, report each one's SHA-256
    (``--summary``: counts, the peak of connections open at once, the sessions and
    grants that carried them, instead of one entry per connection).

    By default a vchan server (``PORT --peers``); with ``--host`` a drop-in server
    (``vchan.start_server(cb, host, port)``: TCP and vchan at once), or with
    ``--plain`` too a plain asyncio TCP server, and each connection's report says
    which way it went (:func:`_path`) and its first bytes."""
    import vchan

    done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    active = peak = 0
    rings: dict[int, tuple[int, int, int]] = {}     # id(ring endpoint): sizes, grants
    holders: list[Any] = []                          # keeps those ids unique

    def note_ring(writer: asyncio.StreamWriter) -> None:
        endpoint = writer.get_extra_info("endpoint")
        if endpoint is None or id(endpoint) in rings:
            return
        holders.append(endpoint)
        grants = sum(len(getattr(pages, "refs", ())) for pages in endpoint.pages)
        rings[id(endpoint)] = (endpoint.ring.read_size, endpoint.ring.write_size, grants)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        note_ring(writer)
        digest = hashlib.sha256()
        count = 0
        path = _path(writer) if args.host is not None else {}
        try:
            while chunk := await reader.read(65536):
                if args.host is not None and not count:
                    path["first"] = chunk[:8].hex()
                digest.update(chunk)
                count += len(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.close()
            await writer.wait_closed()
            await done.put({"received": count, "sha256": digest.hexdigest(), **path})
        except OSError as exc:
            await done.put({"received": count, "error": f"{type(exc).__name__}: {exc}",
                            **path})
        finally:
            active -= 1

    server: Any
    if args.host is None:
        if args.peers is None:
            raise SystemExit("echo-server: --peers (a vchan server) or --host (drop-in)")
        domids = [int(p) for p in args.peers.split(",")]
        peers: Any = domids[0] if len(domids) == 1 else domids
        server = await vchan.start_server(handle, _port(args.port), peers=peers, raw=args.raw)
        report(event="listening", gntalloc_limit=gntalloc_limit())
    elif args.plain:
        server = await asyncio.start_server(handle, args.host, int(args.port))
        report(event="listening", kind="tcp")
    else:
        _log_dropin()
        server = await vchan.start_server(handle, args.host, int(args.port))
        report(event="listening", kind="dropin", advertised=server.advertised,
               vchan_port=server.vchan_port,
               vchan_error=repr(server.vchan_error) if server.vchan_error else None)
    results = []
    try:
        async with asyncio.timeout(args.deadline):
            for _ in range(args.connections):
                results.append(await done.get())
    finally:
        server.close()
        await server.wait_closed()
    if not args.summary:
        report(result="served", connections=results)
        return 0
    errors = [r["error"][:200] for r in results if "error" in r]
    report(result="served", connections=len(results), errors=len(errors),
           first_error=errors[0] if errors else None,
           received=sum(r["received"] for r in results), peak=peak, rings=len(rings),
           ring_sizes=sorted({(r, w) for r, w, _ in rings.values()}),
           grants=sum(g for _, _, g in rings.values()), gntalloc_limit=gntalloc_limit())
    return 0


def _log_dropin() -> None:
    """The drop-in layer's debug lines (why a connection took TCP) on stderr,
    which is the role's log (``domus/<name>-<id>/logs/`` for a domU)."""
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vchan.dropin").setLevel(logging.DEBUG)


def _path(writer: asyncio.StreamWriter) -> dict[str, Any]:
    """Which way a drop-in connection went (``vchan`` or ``tcp``), the (TCP)
    address of its peer and, over vchan, the vchan peer ``[domid, port]``."""
    from vchan import dropin

    return {"via": dropin.via(writer), "peername": writer.get_extra_info("peername"),
            "vchan_peer": writer.get_extra_info("vchan_peer")}


async def _hinted(host: str, port: int) -> list[int] | str:
    """The domains that advertise ``(host, port)`` as this domain's drop-in
    client reads XenStore (the index and the claims), or why they cannot be read."""
    from vchan.dropin.hints import _hints

    try:
        return sorted(await _hints.lookup(host, port))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


async def echo_client(args: argparse.Namespace) -> int:
    """Send ``--bytes`` of data, read the echo back, compare SHA-256s.

    ``echo-client DOMID PORT``: vchan.  ``dropin-client HOST PORT``: by address
    (``vchan.open_connection(host, port)``, vchan or TCP); the report adds which way
    it went (:func:`_path`), the domains that advertised the address (``hinted``)
    and the set-up time."""
    import vchan

    data = payload(args.bytes, args.seed)
    host: str | None = getattr(args, "host", None)
    path: dict[str, Any] = {}
    started = time.monotonic()
    async with asyncio.timeout(args.deadline):
        if host is None:
            reader, writer = await vchan.open_connection(args.domid, _port(args.port),
                                                         timeout=args.deadline)
        else:
            _log_dropin()
            path["hinted"] = await _hinted(host, args.port)
            connecting = time.monotonic()
            reader, writer = await vchan.open_connection(host, args.port,
                                                         timeout=args.deadline)
            path.update(_path(writer), connect_s=round(time.monotonic() - connecting, 3))
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
           seconds=round(elapsed, 3), **path)
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


# -- many connections at once; connection set-up rate -----------------------------------


def stream_message(i: int, seed: int) -> bytes:
    """Connection ``i``'s distinct message."""
    tag = hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[:16]
    return f"connection {i:05d} seed {seed} {tag}\n".encode()


async def many_client(args: argparse.Namespace) -> int:
    """Open ``--connections`` connections at once, echo a distinct message on each
    while all are open, then close them all; report counts and timings.

    ``--ring N``: ask for rings of at least N bytes each way.  ``--hold``: once
    echoed, report ``holding`` and keep every connection open until stdin
    closes (a test looks at what they cost meanwhile)."""
    import vchan

    n = args.connections
    asked = {} if args.ring is None else {"read_min": args.ring, "write_min": args.ring}
    errors: list[str] = []

    def failed(exc: BaseException) -> None:
        errors.append(f"{type(exc).__name__}: {exc}"[:200])

    first: list[float] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pair = await vchan.open_connection(args.domid, _port(args.port), timeout=args.deadline,
                                           **asked)
        if not first:
            first.append(time.monotonic())
        return pair

    rss_before = _rss()
    started = time.monotonic()
    async with asyncio.timeout(args.deadline):
        opened = await asyncio.gather(*(connect() for _ in range(n)), return_exceptions=True)
        t_open = time.monotonic()
        rss_open = _rss()
        pairs: list[tuple[int, asyncio.StreamReader, asyncio.StreamWriter]] = []
        for i, got in enumerate(opened):
            if isinstance(got, BaseException):
                failed(got)
            else:
                pairs.append((i, *got))
        report(event="opened", opened=len(pairs), seconds=round(t_open - started, 3))

        async def echo(i: int, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
            message = stream_message(i, args.seed)
            writer.write(message)
            await writer.drain()
            return await reader.readexactly(len(message)) == message

        echoed = await asyncio.gather(*(echo(*p) for p in pairs), return_exceptions=True)
        t_echo = time.monotonic()
        intact = sum(1 for e in echoed if e is True)
        wrong = sum(1 for e in echoed if e is False)
        for e in echoed:
            if isinstance(e, BaseException):
                failed(e)
        # Every connection is open here: the sessions carrying them, and their rings.
        sessions = {id(w.get_extra_info("session")): w.get_extra_info("session")
                    for _, _, w in pairs}
        dedicated = sum(1 for _, _, w in pairs if w.get_extra_info("session") is None)
        sizes = sorted({(w.get_extra_info("endpoint").ring.read_size,
                         w.get_extra_info("endpoint").ring.write_size) for _, _, w in pairs})

        t_closing = t_echo
        if args.hold:
            report(event="holding", opened=len(pairs), echoed=intact)
            await stdin_closed()
            t_closing = time.monotonic()      # (close_s and total_s leave the hold out)

        async def close(writer: asyncio.StreamWriter) -> None:
            writer.close()
            await writer.wait_closed()

        closing = await asyncio.gather(*(close(w) for _, _, w in pairs),
                                       return_exceptions=True)
        t_close = time.monotonic()
        closed = 0
        for c in closing:
            if isinstance(c, BaseException):
                failed(c)
            else:
                closed += 1
    report(result="many", connections=n, opened=len(pairs), echoed=intact, wrong=wrong,
           closed=closed, errors=len(errors), first_error=errors[0] if errors else None,
           sessions=len(sessions) - (1 if None in sessions.values() else 0),
           dedicated=dedicated, ring_sizes=sizes,
           first_open_s=round(first[0] - started, 3) if first else None,
           open_s=round(t_open - started, 3), echo_s=round(t_echo - t_open, 3),
           close_s=round(t_close - t_closing, 3),
           total_s=round(t_close - started - (t_closing - t_echo), 3),
           rss_per_connection=(rss_open - rss_before) / max(1, n),
           gntalloc_limit=gntalloc_limit())
    return 0 if intact == n and closed == n and not errors else 1


async def setup_client(args: argparse.Namespace) -> int:
    """``--count`` sequential connections, each: connect, one byte echoed, close.

    The server is ``bench-server`` (mode byte ``P``: echo until EOF) over vchan
    or, with ``--tcp HOST:PORT``, over TCP.  One connection first, timed apart
    (``first_ms``: vchan's session rendezvous through XenStore, TCP's ARP); then
    ``--count`` timed ones.  ``--dedicated``: a libxenvchan ring of its own per
    connection (a XenStore rendezvous each time), as before sessions.
    """
    import vchan

    if args.tcp:
        host, _, tcp_port = args.tcp.rpartition(":")
        kind = "tcp"
    else:
        kind = "vchan-dedicated" if args.dedicated else "vchan"

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if args.tcp:
            return await asyncio.open_connection(host, int(tcp_port))
        if args.dedicated:
            return await vchan.open_connection(args.domid, _port(args.port),
                                               timeout=args.deadline, dedicated=True)
        return await vchan.open_connection(args.domid, _port(args.port), timeout=args.deadline)

    async def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        reader, writer = await connect()
        t1 = time.perf_counter()
        writer.write(b"Px")                 # bench-server's echo mode, then the byte
        if await reader.readexactly(1) != b"x":
            raise AssertionError("the echoed byte differs")
        t2 = time.perf_counter()
        writer.close()
        await writer.wait_closed()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    async with asyncio.timeout(args.deadline):
        first = None
        give_up = time.monotonic() + min(60.0, args.deadline / 2)
        while first is None:            # the server (or the bridge) may need a moment
            try:
                first = sum(await once())
            except OSError as exc:
                if time.monotonic() > give_up:
                    raise
                report(event="retry", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
        phases: list[tuple[float, float, float]] = []
        started = time.perf_counter()
        for _ in range(args.count):
            phases.append(await once())
        total = time.perf_counter() - started
    times = sorted(sum(p) for p in phases)

    def spread(values: list[float]) -> list[float]:
        """p50, p90 and max in ms."""
        values = sorted(values)
        return [_ms(_quantile(values, 0.5)), _ms(_quantile(values, 0.9)), _ms(values[-1])]

    report(result="setup", kind=kind, count=args.count, seconds=round(total, 3),
           per_s=round(args.count / total, 1), first_ms=_ms(first),
           p50_ms=_ms(_quantile(times, 0.5)), p90_ms=_ms(_quantile(times, 0.9)),
           max_ms=_ms(times[-1]), connect_ms=spread([p[0] for p in phases]),
           echo_ms=spread([p[1] for p in phases]), close_ms=spread([p[2] for p in phases]))
    return 0


# -- benchmark: the same asyncio streams code over vchan and over TCP ---------------------------


async def open_stream(kind: str, domid: int, port: str, host: str
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
            await writer.drain()
        else:
            # Echo until EOF.  No drain after it: a vchan peer that closed
            # (rather than half-closed) is gone by then, and drain() would raise.
            while chunk := await reader.read(65536):
                writer.write(chunk)
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




# -- both directions at once --------------------------------------------------------------


@functools.cache
def _block() -> bytes:
    """1 MiB of pseudo-random bytes that :func:`duplex` sends pieces of."""
    return random.Random(42).randbytes(1 << 20)


async def duplex(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nbytes: int,
                 seed: int, *, close: bool = True) -> dict[str, Any]:
    """Send ``nbytes`` pseudo-random bytes (pieces of random sizes, then EOF)
    while reading back what comes until EOF; sizes and SHA-256 of both.
    ``close``: close the writer after."""
    rnd = random.Random(seed)
    block = _block()
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    t0 = time.perf_counter()

    async def send() -> int:
        sent = 0
        while sent < nbytes:
            n = min(nbytes - sent, rnd.choice([1, 100, 4096, 65536, 1 << 20]),
                    rnd.randrange(1, 1 << 20))
            start = rnd.randrange(0, len(block) - n + 1)
            chunk = block[start:start + n]
            writer.write(chunk)
            sent_hash.update(chunk)
            sent += n
            await writer.drain()
        writer.write_eof()
        return sent

    async def receive() -> int:
        got = 0
        while data := await reader.read(1 << 20):
            recv_hash.update(data)
            got += len(data)
        return got

    sent, got = await asyncio.gather(send(), receive())
    dt = time.perf_counter() - t0
    if close:
        writer.close()
        await writer.wait_closed()
    return {"sent": sent, "received": got, "sent_sha256": sent_hash.hexdigest(),
            "received_sha256": recv_hash.hexdigest(), "seconds": dt}


async def duplex_server(args: argparse.Namespace) -> int:
    """Serve ``--connections`` clients, each with :func:`duplex` (``--bytes`` each
    way, seeded by the connection's number); report each connection as
    ``duplexed`` (sizes and SHA-256s) or ``failed`` (the error)."""
    import vchan

    peers: Any = "any" if args.peers == "any" else [int(p) for p in args.peers.split(",")]
    if args.raw:
        peers = peers[0]
    done = asyncio.Event()
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        me = count
        try:
            report(event="duplexed", **await duplex(reader, writer, args.bytes, seed=1000 + me))
        except Exception as exc:  # reported to the test
            report(event="failed", error=f"{type(exc).__name__}: {exc}")
        if me >= args.connections:
            done.set()

    server = await vchan.start_server(handle, _port(args.port), peers=peers, raw=args.raw,
                                      read_min=args.ring, write_min=args.ring)
    report(event="listening", domid=vchan.own_domid(), addresses=server.addresses)
    async with server, asyncio.timeout(args.deadline):
        await done.wait()
    report(result="served", connections=count)
    return 0


async def duplex_client(args: argparse.Namespace) -> int:
    """Connect (waiting up to the deadline for the server) and run :func:`duplex`."""
    import vchan

    reader, writer = await vchan.open_connection(args.domid, _port(args.port),
                                                 timeout=args.deadline, read_min=args.ring,
                                                 write_min=args.ring)
    report(event="connected")
    try:
        async with asyncio.timeout(args.deadline):
            report(result="duplexed", **await duplex(reader, writer, args.bytes, seed=args.seed))
    except Exception as exc:  # reported to the test
        report(result="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# -- the command line -------------------------------------------------------------------------

Role = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

#: The shared roles by name (``tests/xen/roles.py`` adds its own).
ROLES: dict[str, Role] = {
    "echo-server": echo_server,
    "echo-client": echo_client,
    "dropin-client": echo_client,
    "duplex-server": duplex_server,
    "duplex-client": duplex_client,
    "hold-server": hold_server,
    "hold-client": hold_client,
    "many-client": many_client,
    "setup-client": setup_client,
    "bench-server": bench_server,
}


def add_server(sub: Any, name: str, **peers: Any) -> argparse.ArgumentParser:
    """A server role's subcommand in ``sub``: its vchan ``port``, then
    ``--peers`` (``peers``: that option's keywords)."""
    p: argparse.ArgumentParser = sub.add_parser(name)
    p.add_argument("port")
    p.add_argument("--peers", **peers)
    return p


def add_client(sub: Any, name: str) -> argparse.ArgumentParser:
    """A client role's subcommand in ``sub``: the server's ``domid`` and ``port``."""
    p: argparse.ArgumentParser = sub.add_parser(name)
    p.add_argument("domid", type=int)
    p.add_argument("port")
    return p


def add_roles(sub: Any) -> None:
    """Add the shared roles' subcommands to ``sub`` (an ``add_subparsers()``)."""
    p = add_server(sub, "echo-server", help="peer domid(s), comma-separated (a vchan server)")
    p.add_argument("--host", help="a drop-in server of this TCP address instead")
    p.add_argument("--plain", action="store_true", help="with --host: plain asyncio TCP")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="raw libxenvchan server (C peers)")
    p.add_argument("--summary", action="store_true",
                   help="report counts, not one entry per connection")
    p = add_client(sub, "echo-client")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-eof", action="store_true",
                   help="do not half-close (a libxenvchan peer has no half-close)")
    p = sub.add_parser("dropin-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-eof", action="store_true")
    p = add_server(sub, "duplex-server", required=True,
                   help="peer domid(s), comma-separated, or any")
    p.add_argument("--raw", action="store_true", help="raw libxenvchan server (one peer)")
    p.add_argument("--bytes", type=int, default=1 << 20, help="sent to each client")
    p.add_argument("--connections", type=int, default=1, help="exit after this many")
    p.add_argument("--ring", type=int, default=None, help="ring size asked each way")
    p = add_client(sub, "duplex-client")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ring", type=int, default=None, help="ring size asked each way")
    add_server(sub, "hold-server", required=True)
    add_client(sub, "hold-client")
    p = add_client(sub, "many-client")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ring", type=int, default=None, help="ring size asked each way")
    p.add_argument("--hold", action="store_true",
                   help="keep the connections open until stdin closes")
    p = add_client(sub, "setup-client")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--tcp", default="", metavar="HOST:PORT",
                   help="over TCP to this bench-server instead")
    p.add_argument("--dedicated", action="store_true",
                   help="a vchan ring of its own per connection (no session)")
    p = sub.add_parser("bench-server")
    p.add_argument("kind", choices=["vchan", "tcp"])
    p.add_argument("port")
    p.add_argument("--peers", default="0")


def parser(description: str | None = __doc__) -> tuple[argparse.ArgumentParser, Any]:
    """The command line of the shared roles, and its subcommands (to add to)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="bound on every wait of the role, in seconds")
    sub = parser.add_subparsers(dest="role", required=True)
    add_roles(sub)
    return parser, sub


def run_on_test_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the event loop the test runs on (``VCHAN_TEST_LOOP``:
    ``uvloop``, else asyncio's default; the rig sets none)."""
    if os.environ.get("VCHAN_TEST_LOOP") == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parser()[0].parse_args(argv)
    return int(run_on_test_loop(ROLES[args.role](args)))


if __name__ == "__main__":
    sys.exit(main())
