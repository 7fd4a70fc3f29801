"""The parts a domain plays in the rig's cross-domain tests.

Run as ``python3 roles.py ROLE ARGS`` in dom0 (by the tests, as a
subprocess) or in a domU (through its agent).  Each role reports on stdout
as JSON lines: ``{"event": ...}`` for progress a test waits for, and a last
line with its result.  Each role bounds its own waits (``--deadline``).

The stream roles (echo, duplex, hold, many connections, set-up rate, the
bench server) are ``tests/peer_roles.py``'s, the same code the emulator tests
run; this file adds the roles only the rig plays (grants, XenStore, a lying
drop-in domain, the benchmark client, the C peer's helpers, dom0's device
tests' domain host).  In a domU, ``peer_roles.py`` and ``peer_events.py`` sit
beside this file on the job disk (``harness.Domu.create``); in dom0 they are
in ``tests/``, its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Where peer_roles.py is: beside this file in a domU, tests/ in dom0.
_HERE = Path(__file__).resolve().parent
_SHARED = _HERE if (_HERE / "peer_roles.py").exists() else _HERE.parent
if str(_SHARED) not in sys.path:
    sys.path.insert(0, str(_SHARED))

from peer_events import emit as report  # noqa: E402
from peer_roles import ROLES, open_stream, parser  # noqa: E402


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


async def bench_client(args: argparse.Namespace) -> int:
    """Bulk throughput and ping-pong round trips against ``bench-server``."""
    block = os.urandom(1 << 16)
    total = args.mib << 20
    async with asyncio.timeout(args.deadline):
        reader, writer = await open_stream(args.kind, args.domid, args.port, args.host)
        writer.write(b"B")
        started = time.perf_counter()
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        assert await reader.readexactly(1) == b"K"
        bulk = time.perf_counter() - started
        writer.close()
        reader, writer = await open_stream(args.kind, args.domid, args.port, args.host)
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
    parser_, sub = parser(__doc__)
    p = sub.add_parser("dropin-advertise")
    p.add_argument("port", type=int)
    p.add_argument("address", help="the address claimed (somebody else's)")
    p.add_argument("--peers", required=True, help="domids served on tcp-PORT")
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
    args = parser_.parse_args(argv)

    role = args.role
    if role in ROLES:
        return asyncio.run(ROLES[role](args))
    if role == "dropin-advertise":
        return asyncio.run(dropin_advertise(args))
    if role == "grant-share":
        return grant_share(args)
    if role == "grant-map":
        return grant_map(args)
    if role == "xenstore-check":
        return xenstore_check(args)
    if role == "xenstore-pipeline":
        return asyncio.run(xenstore_pipeline(args))
    if role == "bench-client":
        return asyncio.run(bench_client(args))
    if role == "unix-echo":
        return unix_echo(args)
    if role == "domain-host":
        return domain_host(args)
    parser_.error(f"unknown role {role}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
