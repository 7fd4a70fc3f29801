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
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def report(**fields: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps(fields), flush=True)


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


async def dropin_advertise(args: argparse.Namespace) -> int:
    """Play a domain that claims somebody else's address: advertise ``ADDRESS``
    port ``PORT`` in XenStore as a drop-in server would (its claim and an index
    entry) and serve the vchan port a client would be sent to (``tcp-PORT``) to
    ``--peers``, answering any claim with an ACCEPT.  Reports ``advertising``,
    then, at SIGTERM or the deadline, every vchan stream that reached it."""
    import vchan
    from vchan import dropin, upgrade
    from vchan.xenstore import Perm, XenStore

    contacts: list[dict[str, Any]] = []

    class Thief(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.bytes = 0
            report(event="contacted", peer=transport.get_extra_info("peername"))

        def data_received(self, data: bytes) -> None:
            if not self.bytes:
                # Accept whatever claim comes: the nonce is the client's secret.
                self.transport.write(upgrade.Accept(os.urandom(16)).encode())
            self.bytes += len(data)

        def connection_lost(self, exc: Exception | None) -> None:
            contacts.append({"peer": self.transport.get_extra_info("peername"),
                             "bytes": self.bytes})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    peers = [int(p) for p in args.peers.split(",")]
    async with await XenStore.open() as xs:
        own = int(await xs.read("domid"))
        claim = f"/local/domain/{own}/data/vchan-dropin/{args.port}"
        entry = f"{dropin.INDEX}/{own}-{args.port}"
        await xs.write(claim, args.address)
        await xs.set_perms(claim, [Perm(own, "r")])
        await xs.write(entry, "")
        # As a drop-in server does (vchan.dropin): an entry whose permissions
        # cannot be set (real xenstored: EACCES) keeps the index's.
        entry_perms = "set"
        try:
            await xs.set_perms(entry, [Perm(own, "r")])
        except OSError as exc:
            entry_perms = errno.errorcode.get(exc.errno or 0, str(exc))
        server = await vchan.create_server(Thief, upgrade.dropin_port(int(args.port)),
                                           peers=peers)
        report(event="advertising", domid=own, claim=claim, entry=entry,
               entry_perms=entry_perms)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.deadline)
        server.close()
        await server.wait_closed()
        still = (await xs.read(claim)).decode()
        for path in (entry, claim):
            await xs.rm(path)
    report(result="advertised", address=still, contacts=contacts)
    return 0


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
    while all are open, then close them all; report counts and timings."""
    import vchan

    n = args.connections
    errors: list[str] = []

    def failed(exc: BaseException) -> None:
        errors.append(f"{type(exc).__name__}: {exc}"[:200])

    first: list[float] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pair = await vchan.open_connection(args.domid, _port(args.port), timeout=args.deadline)
        if not first:
            first.append(time.monotonic())
        return pair

    started = time.monotonic()
    async with asyncio.timeout(args.deadline):
        opened = await asyncio.gather(*(connect() for _ in range(n)), return_exceptions=True)
        t_open = time.monotonic()
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
           close_s=round(t_close - t_echo, 3), total_s=round(t_close - started, 3),
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



# -- XenStore requests in flight together -------------------------------------------------


async def xenstore_pipeline(args: argparse.Namespace) -> int:
    """vchan's asyncio XenStore client with several requests in flight at once,
    ``--rounds`` times: READs of ``data/pp/k0`` .. ``k<width-1>`` (same length, values
    ``v0`` ..), then DIRECTORY ``data/pp`` with a READ of ``data/pp/k0``.  Counts wrong
    answers and errors (in a domU the client is on ``/dev/xen/xenbus``)."""
    from vchan.xenstore import XenStore

    keys = [f"data/pp/k{i}" for i in range(args.width)]
    values = [f"v{i}".encode() for i in range(args.width)]
    wrong = 0
    errors: dict[str, int] = {}
    samples: list[str] = []
    async with await XenStore.open() as xs:
        for key, initial in zip(keys, values, strict=True):
            await xs.write(key, initial)
        for _ in range(args.rounds):
            got = await asyncio.gather(*(xs.read(k) for k in keys), return_exceptions=True)
            listing = await asyncio.gather(xs.directory("data/pp"), xs.read(keys[0]),
                                           return_exceptions=True)
            wanted: list[Any] = [*values, sorted(k.rsplit("/", 1)[1] for k in keys), values[0]]
            for asked, value, want in zip([*keys, "data/pp (directory)", keys[0]],
                                          [*got, *listing], wanted, strict=True):
                if isinstance(value, BaseException):
                    name = errno.errorcode.get(getattr(value, "errno", 0) or 0,
                                               type(value).__name__)
                    errors[name] = errors.get(name, 0) + 1
                    if len(samples) < 3:
                        samples.append(f"{asked}: {name}")
                elif (sorted(value) if isinstance(value, list) else value) != want:
                    wrong += 1
                    if len(samples) < 3:
                        samples.append(f"{asked}: {value!r}")
        path = xs.path
    report(result="pipeline", path=path, rounds=args.rounds,
           requests=args.rounds * (args.width + 2), wrong=wrong, errors=errors,
           samples=samples)
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


# -- processes for dom0's device tests ------------------------------------------------------


def domain_host(args: argparse.Namespace) -> int:
    """Fork processes of this domain for dom0's device tests, one per TCP connection.

    ``tests/test_devices.py`` drives each process as it drives a local one
    (``agent.py``'s JSON lines, here over the socket); a process ends when
    its connection closes.  One request per connection: ``spawn`` (the
    forked child answers ``{"pid", "clock"}`` and serves the connection),
    ``kill`` (``pid``, ``signal``: when it was sent, by this domain's
    monotonic clock), ``wait`` (``pid`` for up to ``timeout`` s: ``status``
    as ``subprocess`` gives it, or ``running``), ``clock`` (this domain's
    monotonic clock, to compare times across domains), ``exit``.  The host
    is single-threaded and forks with vchan imported and no device open.
    """
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]   # a domU's job disk; tests/ in dom0
    import agent

    agent.namespace()                       # import vchan.devices once, before forking
    statuses: dict[int, int] = {}
    children: set[int] = set()

    def reap(pid: int = -1) -> None:
        while children:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done == 0:
                return
            children.discard(done)
            statuses[done] = os.waitstatus_to_exitcode(status)
            if pid != -1:
                return

    def child(conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="utf-8")
        writer = conn.makefile("w", encoding="utf-8")
        writer.write(json.dumps({"pid": os.getpid(), "clock": time.monotonic()}) + "\n")
        writer.flush()
        agent.serve(reader, writer, agent.namespace())

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "clock":
            return {"clock": time.monotonic()}
        if op == "kill":
            pid = int(request["pid"])
            if pid not in children:
                return {"error": f"no running process {pid}"}
            sent = time.monotonic()
            os.kill(pid, int(request.get("signal", signal.SIGKILL)))
            return {"sent": sent}
        if op == "wait":
            pid = int(request["pid"])
            end = time.monotonic() + float(request.get("timeout", 0))
            while True:
                reap(pid)
                if pid in statuses:
                    return {"status": statuses[pid]}
                if pid not in children:
                    return {"error": f"no process {pid}"}
                if time.monotonic() >= end:
                    return {"running": True}
                time.sleep(0.005)
        return {"error": f"unknown op {op!r}"}

    server = socket.create_server(("", args.port))
    report(event="listening", port=args.port, clock=time.monotonic())
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                line = conn.makefile("r", encoding="utf-8").readline()
                request = json.loads(line) if line else {}
            except (OSError, ValueError):
                continue
            if request.get("op") == "clock":       # read as soon as asked
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"clock": time.monotonic()}).encode() + b"\n")
                continue
            reap()
            if request.get("op") == "spawn":
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        server.close()
                        child(conn)
                    except BaseException:
                        traceback.print_exc()
                        code = 1
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                children.add(pid)
                continue
            if request.get("op") == "exit":
                conn.sendall(b'{"bye": true}\n')
                break
            try:
                reply = answer(request)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="bound on every wait of the role, in seconds")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("echo-server")
    p.add_argument("port")
    p.add_argument("--peers", help="peer domid(s), comma-separated (a vchan server)")
    p.add_argument("--host", help="a drop-in server of this TCP address instead")
    p.add_argument("--plain", action="store_true", help="with --host: plain asyncio TCP")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="raw libxenvchan server (C peers)")
    p.add_argument("--summary", action="store_true",
                   help="report counts, not one entry per connection")
    p = sub.add_parser("echo-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
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
    p = sub.add_parser("dropin-advertise")
    p.add_argument("port", type=int)
    p.add_argument("address", help="the address claimed (somebody else's)")
    p.add_argument("--peers", required=True, help="domids served on tcp-PORT")
    p = sub.add_parser("hold-server")
    p.add_argument("port")
    p.add_argument("--peers", required=True)
    p = sub.add_parser("hold-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p = sub.add_parser("many-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("setup-client")
    p.add_argument("domid", type=int)
    p.add_argument("port")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--tcp", default="", metavar="HOST:PORT",
                   help="over TCP to this bench-server instead")
    p.add_argument("--dedicated", action="store_true",
                   help="a vchan ring of its own per connection (no session)")
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
    p = sub.add_parser("xenstore-pipeline")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--width", type=int, default=8, help="READs in flight at once")
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
    p = sub.add_parser("domain-host")
    p.add_argument("port", type=int)
    args = parser.parse_args(argv)

    role = args.role
    if role == "echo-server":
        return asyncio.run(echo_server(args))
    if role in ("echo-client", "dropin-client"):
        return asyncio.run(echo_client(args))
    if role == "dropin-advertise":
        return asyncio.run(dropin_advertise(args))
    if role == "hold-server":
        return asyncio.run(hold_server(args))
    if role == "hold-client":
        return asyncio.run(hold_client(args))
    if role == "many-client":
        return asyncio.run(many_client(args))
    if role == "setup-client":
        return asyncio.run(setup_client(args))
    if role == "grant-share":
        return grant_share(args)
    if role == "grant-map":
        return grant_map(args)
    if role == "xenstore-check":
        return xenstore_check(args)
    if role == "xenstore-pipeline":
        return asyncio.run(xenstore_pipeline(args))
    if role == "bench-server":
        return asyncio.run(bench_server(args))
    if role == "bench-client":
        return asyncio.run(bench_client(args))
    if role == "unix-echo":
        return unix_echo(args)
    if role == "domain-host":
        return domain_host(args)
    parser.error(f"unknown role {role}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
