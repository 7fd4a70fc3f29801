"""Drop-in by address: vchan to co-resident domains, TCP to everything else.

``vchan.create_server(factory, host, port)`` (and ``start_server(cb, host,
port)``) serves a TCP address and, at once, vchan listener port
``tcp-<port>``; it advertises the address in XenStore so that clients of
other domains on the same host can find it.  ``vchan.create_connection(
factory, host, port)`` (and ``open_connection(host, port)``) connects by TCP
and, when a co-resident domain advertises that address, upgrades the
connection to vchan -- but only when the server proves over the TCP
connection that it is that domain.  The negotiation's messages and rules are
in :mod:`vchan.upgrade`; ``docs/dropin.md`` has the design and the trust
model.

THEORY OF OPERATION
===================

Advertisement (server, domain S, TCP port P)::

    /local/domain/S/data/vchan-dropin/P = "<address> <address> ..."   perms [S: r]
    /local/vchan-dropin/S-P             = ""                          perms [S: r]

The first is the claim: only S (and dom0) can write in S's tree, so it says
"S claims to serve these addresses" and nothing more.  The second is an
index entry, so that an unprivileged domain, which cannot list
``/local/domain``, finds which domains serve port P.  ``/local/vchan-dropin``
is made by the toolstack (dom0), writable by every domain; the emulator
makes it at start.  Both are hints: nothing a client does with them is
trusted without the TCP negotiation.

Client (domain C) to ``(host, P)``:

1. Hints: the domains S whose index entry names P and whose claim lists
   ``host`` (or an address ``host`` resolves to).  Cached per process: the
   index until a XenStore watch on it fires (kept while lookups come, for
   :data:`INDEX_WATCH_IDLE` seconds after the last), or for :data:`HINT_TTL`
   seconds where the watch is not set up yet; claims for :data:`HINT_TTL`
   seconds or until the index changes.  An address that failed to upgrade
   is not tried again for :data:`FAILURE_TTL` seconds.  Loopback addresses count only for
   our own domain (or on the emulator, where every domain shares the host's
   network).  No hint: a plain TCP connection, no byte added.
2. TCP connect, send HELLO, read the answer (within :data:`ANSWER_TIMEOUT`).
   DECLINE: the connection goes on as TCP.  OFFER: it must name one of the
   hinted domains; the client opens a vchan stream to it, sends CLAIM and
   waits for ACCEPT carrying its nonce.  Then the TCP connection is closed
   and the application gets the vchan transport.
3. Any failure before ACCEPT (no answer, a plain server's bytes, no vchan
   server, grants short, XenStore refusing, a timeout): a fresh plain TCP
   connection, and a debug log line saying why.

The TCP calls are the event loop's own ``create_connection`` /
``create_server`` -- those under the wrapping when the loop is a drop-in one
(:mod:`vchan.dropin_loop`).

Server (domain S): each accepted TCP connection is sniffed
(:class:`vchan.upgrade.HelloSniffer`): the first byte that is not HELLO's
hands the connection to the application with every byte received; a whole
HELLO gets an OFFER (a one-time token, kept with the TCP connection until
:data:`CLAIM_TIMEOUT`) and the vchan server starts serving the domain the
HELLO named.  A connection on which no byte comes within ``grace`` seconds
(server-first protocols: SMTP, MySQL, SSH) is handed over as TCP.  A vchan
stream that presents a token given to its own domain gets ACCEPT, the TCP
connection is closed, and the stream goes to the application.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import secrets
import socket
import struct
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from .errors import LocalProtocolError, RemoteProtocolError, VchanError
from .upgrade import (
    ACCEPT_SIZE,
    CLAIM_SIZE,
    Accept,
    AnswerReader,
    Claim,
    Decline,
    Hello,
    HelloSniffer,
    Offer,
    dropin_port,
)
from .xenstore import Perm

__all__ = [
    "ANSWER_TIMEOUT",
    "FAILURE_TTL",
    "GRACE",
    "HINT_TTL",
    "INDEX",
    "INDEX_WATCH_IDLE",
    "DropinServer",
    "create_connection",
    "create_connection_on",
    "create_server",
    "forget_hints",
    "via",
]

log = logging.getLogger("vchan.dropin")

#: Where drop-in servers list themselves (made by dom0, writable by all).
INDEX = "/local/vchan-dropin"
#: The key of ``get_extra_info`` that says which way a connection went.
VIA = "vchan_via"

#: How long a server waits for a first byte before it hands a connection to
#: its application as TCP (a drop-in client sends its HELLO as soon as it is
#: connected; see docs/dropin.md for the measurement).
GRACE = 0.05
#: How long a client waits for the server's answer to its HELLO.
ANSWER_TIMEOUT = 0.5
#: How long the whole upgrade may take before the client goes back to TCP.
UPGRADE_TIMEOUT = 3.0
#: How long a server keeps an offered token for its claim.
CLAIM_TIMEOUT = 5.0
#: How long a client believes what it read in XenStore (without a watch on
#: the index telling it of changes).
HINT_TTL = 1.0
#: How long the client side keeps its watch on the index after a lookup.
INDEX_WATCH_IDLE = 5.0
#: How long a client does not try to upgrade an address that failed to.
FAILURE_TTL = 30.0

_WILDCARDS = ("", "0.0.0.0", "::")


def via(transport: asyncio.BaseTransport | asyncio.StreamWriter) -> str:
    """``"vchan"`` or ``"tcp"``: which way a drop-in connection went.

    The same as ``transport.get_extra_info("vchan_via")`` where a transport
    can carry that key (vchan's, and asyncio's own TCP transports); uvloop's
    TCP transports cannot, and this works for them too.
    """
    if isinstance(transport, asyncio.StreamWriter):
        transport = transport.transport
    said = transport.get_extra_info(VIA)
    if said is not None:
        return str(said)
    return "vchan" if transport.get_extra_info("endpoint") is not None else "tcp"


def _mark_tcp(transport: asyncio.BaseTransport) -> None:
    extra = getattr(transport, "_extra", None)
    if isinstance(extra, dict):
        extra[VIA] = "tcp"


def _names(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """A TCP connection's addresses (taken while it is open)."""
    return {"peername": transport.get_extra_info("peername"),
            "sockname": transport.get_extra_info("sockname")}


def _mark_vchan(stream: asyncio.BaseTransport, names: dict[str, Any]) -> None:
    """An upgraded stream: the TCP connection's addresses, and which way it went."""
    extra = stream._extra  # type: ignore[attr-defined]
    extra["vchan_peer"] = extra.get("peername")
    extra.update(names)
    extra[VIA] = "vchan"


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to a protocol as its transport would."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view))).cast("B")
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


def _hand_over(transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol,
               data: bytes) -> None:
    """Make ``protocol`` the transport's, as if it had been from the start."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    _deliver(protocol, data)


# -- addresses ------------------------------------------------------------------------


def _normal(address: str) -> str:
    """An IP address in its canonical text form (other strings as they are)."""
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return address


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def interface_addresses() -> list[str]:
    """This domain's IP addresses (Linux: every interface's, IPv4 and IPv6,
    without link-local IPv6 ones, which need a scope to be reached)."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 40                       # struct ifreq on 64-bit Linux
        buf = array.array("B", bytes(size * 256))
        ifconf = struct.pack("iL", len(buf), buf.buffer_info()[0])
        got = fcntl.ioctl(s.fileno(), 0x8912, ifconf)       # SIOCGIFCONF
        n = struct.unpack("iL", got)[0]
        raw = buf.tobytes()[:n]
        for i in range(0, n, size):
            found.append(socket.inet_ntoa(raw[i + 20:i + 24]))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            address = ipaddress.IPv6Address(int(line.split()[0], 16))
            if not address.is_link_local:
                found.append(str(address))
    return list(dict.fromkeys(found))


def _advertised(hosts: Iterable[str | None], sockets: Iterable[socket.socket]) -> list[str]:
    """The addresses a server's TCP sockets serve."""
    out: list[str] = []
    for sock in sockets:
        address = _normal(sock.getsockname()[0])
        if address in _WILDCARDS:
            family = sock.family
            out += [a for a in interface_addresses()
                    if (":" in a) == (family == socket.AF_INET6)]
        else:
            out.append(address)
    for host in hosts:
        if host and not _is_ip(host):
            out.append(host)            # a name the server was given: clients use it too
    return list(dict.fromkeys(out))


# -- the client's hints -----------------------------------------------------------------


class _Hints:
    """What this process read in XenStore about drop-in servers, for a while."""

    def __init__(self) -> None:
        self.own: int | None = None
        self.emulated = False
        # (generation read at, believed until, port -> domids)
        self._index: tuple[int, float, dict[int, list[int]]] | None = None
        self._claims: dict[tuple[int, int], tuple[int, float, frozenset[str]]] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._refresh: asyncio.Future[None] | None = None
        # A change of the index seen by a watch moves the generation on: what
        # was read before it is read again.  A server that starts right after
        # a lookup found nothing is found by the next one (not a second later).
        self._generation = 0
        self._readable = False          # the index could be read last time
        self._watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _IndexWatch] = \
            weakref.WeakKeyDictionary()

    def forget(self) -> None:
        self._index = None
        self._claims.clear()
        self._failed.clear()
        self._readable = False
        self._generation += 1

    def _watched(self, now: float) -> bool:
        """Whether a watch on the index is in place for this loop; one is
        started where the index could be read last time (never one that
        would start an emulator), and not again within HINT_TTL of a failure."""
        loop = asyncio.get_running_loop()
        watcher = self._watchers.get(loop)
        if watcher is None or (watcher.done and watcher.ended + HINT_TTL < now):
            if not self._readable:
                return False
            watcher = self._watchers[loop] = _IndexWatch(self, loop)
        watcher.used = now
        return watcher.ready

    def _changed(self) -> None:
        self._generation += 1

    def failed(self, host: str, port: int) -> None:
        now = time.monotonic()
        if len(self._failed) >= 1024:
            self._failed = {k: t for k, t in self._failed.items() if t > now}
        self._failed[(host, port)] = now + FAILURE_TTL

    async def lookup(self, host: str, port: int) -> list[int]:
        """The domains that advertise ``(host, port)`` (soonest first: none)."""
        now = time.monotonic()
        until = self._failed.get((host, port))
        if until is not None:
            if until > now:
                return []
            del self._failed[(host, port)]
        watched = self._watched(now)
        index = self._index
        if index is None or index[0] != self._generation or (not watched and index[1] < now):
            await self._read_index(now)
            if not watched:
                self._watched(now)      # (it can be read: watch it from now on)
        assert self._index is not None
        servers = self._index[2].get(port)
        if not servers:
            return []
        wanted = {_normal(host)}
        if _normal(host) == host and not _is_ip(host):
            wanted |= await _resolve(host, port)
        found = []
        for domid in servers:
            claims = await self._claim(domid, port, now)
            for address in wanted & claims:
                if _is_loopback(address) and domid != self.own and not self.emulated:
                    continue            # someone else's loopback is not ours
                found.append(domid)
                break
        return found

    async def _read_index(self, now: float) -> None:
        # One reader at a time (per loop); the others wait for its result.
        loop = asyncio.get_running_loop()
        refresh = self._refresh
        if refresh is not None and refresh.get_loop() is loop:
            await asyncio.shield(refresh)
            return
        self._refresh = refresh = loop.create_future()
        try:
            generation = self._generation
            self._index = (generation, now + HINT_TTL, await self._index_now())
        finally:
            refresh.set_result(None)
            if self._refresh is refresh:
                self._refresh = None

    async def _index_now(self) -> dict[int, list[int]]:
        from .backend import default_backend_name

        self.emulated = default_backend_name() == "sim"
        if self.emulated:
            from . import sim

            # No emulator running: nobody to find (and none to start for it).
            if not await asyncio.to_thread(sim.is_running):
                self._readable = False
                return {}
        from .hub import _loop_state

        try:
            async with _loop_state() as state:
                self.own = state.own
                names = await state.xs.directory(INDEX)
        except (OSError, VchanError) as exc:
            log.debug("drop-in: no hints: %s cannot be read (%s)", INDEX, exc)
            self._readable = False
            return {}
        self._readable = True
        table: dict[int, list[int]] = {}
        for name in names:
            domid_s, _, port_s = name.partition("-")
            if domid_s.isdigit() and port_s.isdigit():
                table.setdefault(int(port_s), []).append(int(domid_s))
        return table

    async def _claim(self, domid: int, port: int, now: float) -> frozenset[str]:
        held = self._claims.get((domid, port))
        if held is not None and held[0] == self._generation and held[1] >= now:
            return held[2]
        generation = self._generation
        from .hub import _loop_state

        try:
            async with _loop_state() as state:
                value = await state.xs.read(f"/local/domain/{domid}/data/vchan-dropin/{port}")
            claims = frozenset(_normal(a) for a in value.decode("ascii", "replace").split())
        except (OSError, VchanError) as exc:
            log.debug("drop-in: domain %d's claim for port %d cannot be read (%s)",
                      domid, port, exc)
            claims = frozenset()
        self._claims[(domid, port)] = (generation, now + HINT_TTL, claims)
        return claims


class _IndexWatch:
    """A XenStore watch on the drop-in index for one loop's lookups: every
    change moves the hints' generation on.  It holds the loop's XenStore
    connection while lookups come, and lets go :data:`INDEX_WATCH_IDLE`
    seconds after the last; it ends quietly if XenStore fails (lookups then
    believe what they read for :data:`HINT_TTL` seconds)."""

    def __init__(self, hints: _Hints, loop: asyncio.AbstractEventLoop) -> None:
        self.hints = hints
        self.ready = False              # registered: changes from now on are seen
        self.done = False
        self.used = time.monotonic()
        self.ended = 0.0
        self._task = loop.create_task(self._run(), name="vchan drop-in index watch")

    async def _run(self) -> None:
        from .backend import default_backend_name
        from .hub import _loop_state

        try:
            if default_backend_name() == "sim":
                from . import sim

                # A watch must never be what starts an emulator.
                if not await asyncio.to_thread(sim.is_running):
                    return
            async with _loop_state() as state, state.watches.watching(INDEX) as changed:
                while True:
                    idle = self.used + INDEX_WATCH_IDLE - time.monotonic()
                    if idle <= 0:
                        return
                    try:
                        await asyncio.wait_for(changed.wait(), idle)
                    except TimeoutError:
                        continue
                    changed.clear()
                    # (the first one is the registration: what was read
                    # before it may be older than the watch)
                    self.hints._changed()
                    self.ready = True
        except (OSError, VchanError) as exc:
            log.debug("drop-in: no watch on %s (%s): hints are believed for %g s",
                      INDEX, exc, HINT_TTL)
        finally:
            self.done = True
            self.ready = False
            self.ended = time.monotonic()
            # Changes from now on go unseen: what was read is believed for
            # HINT_TTL no longer (a new loop's lookups read the index again).
            self.hints._changed()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _resolve(host: str, port: int) -> set[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {_normal(str(info[4][0])) for info in infos}


_hints = _Hints()


def forget_hints() -> None:
    """Forget what this process read about drop-in servers, and the failures."""
    _hints.forget()


# -- client -----------------------------------------------------------------------------


class _Fallback(Exception):
    """The upgrade cannot go on; the connection goes over TCP."""


class _Negotiation(asyncio.Protocol):
    """The client's TCP connection until the server has answered."""

    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.reader = AnswerReader()
        self.answer: asyncio.Future[Offer | Decline] = \
            asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            # (After an OFFER the server says nothing more on TCP.)
            if self.transport is not None:
                self.transport.abort()
            return
        try:
            answer = self.reader.feed(data)
        except RemoteProtocolError as exc:
            self.answer.set_exception(_Fallback(str(exc)))
            return
        if answer is not None:
            if isinstance(answer, Decline) and self.transport is not None:
                self.transport.pause_reading()      # the application's bytes may follow
            self.answer.set_result(answer)

    def eof_received(self) -> bool:
        self._lost("the server closed the connection before it answered")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"the connection was lost before the server answered ({exc})")

    def _lost(self, why: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(_Fallback(why))


class _ClientGate(asyncio.Protocol):
    """The client's vchan stream until the server has accepted its claim."""

    def __init__(self, token: bytes, nonce: bytes) -> None:
        self.claim = Claim(token).encode()
        self.nonce = nonce
        self.buf = bytearray()
        self.accepted: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.claim)

    def data_received(self, data: bytes) -> None:
        if self.accepted.done():
            self.buf += data                # the application's, once it has the stream
            return
        self.buf += data
        if len(self.buf) < ACCEPT_SIZE:
            return
        try:
            accept = Accept.decode(bytes(self.buf[:ACCEPT_SIZE]))
            if not secrets.compare_digest(accept.nonce, self.nonce):
                raise RemoteProtocolError("the vchan peer's ACCEPT does not carry our nonce: "
                                          "it is not the server we met over TCP")
        except RemoteProtocolError as exc:
            self.accepted.set_exception(_Fallback(str(exc)))
            if self.transport is not None:
                self.transport.abort()
            return
        del self.buf[:ACCEPT_SIZE]
        if self.transport is not None:
            self.transport.pause_reading()
        self.accepted.set_result(b"")

    def eof_received(self) -> bool:
        self._lost("the vchan server ended the stream before accepting it")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"the vchan server refused the stream ({exc})")

    def _lost(self, why: str) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(_Fallback(why))


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
    **tcp_options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect to ``(host, port)``: over vchan if a co-resident domain serves
    it as a drop-in server and proves it owns it, else over TCP.

    ``tcp_options`` go to :meth:`asyncio.loop.create_connection` (with
    ``ssl`` the connection is plain TCP; over a socket already connected:
    :func:`create_connection_on`).  Errors are TCP's (the
    connection is refused, the name does not resolve); a failed upgrade is
    not an error but a TCP connection.  :func:`via` (or
    ``transport.get_extra_info("vchan_via")``) says which way it went.
    """
    _check_address(host, port)
    return await _connect(protocol_factory, host, port, None, tcp_options)


async def create_connection_on(
    protocol_factory: Callable[[], asyncio.BaseProtocol], sock: socket.socket,
    **tcp_options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """As :func:`create_connection`, over a TCP socket already connected (as
    ``loop.create_connection(sock=...)``; aiohttp connects its sockets itself).

    The upgrade runs on ``sock``; if it fails, a fresh TCP connection to the
    same peer address carries the application.
    """
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                             socket.AF_INET6):
        raise ValueError(f"a drop-in connection needs a TCP socket, not {sock!r}")
    peer = sock.getpeername()
    return await _connect(protocol_factory, str(peer[0]), int(peer[1]), sock, tcp_options)


async def _connect(protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
                   sock: socket.socket | None, tcp_options: dict[str, Any],
                   ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    loop = asyncio.get_running_loop()
    tcp_connect = _tcp_api(loop)[0]
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host,
                                                                     "port": port}
    domids: list[int] = []
    if not tcp_options.get("ssl"):
        try:
            domids = await _hints.lookup(host, port)
        except Exception as exc:
            log.debug("drop-in: no hints for %s port %d: %s", host, port, exc)
    if not domids or _hints.own is None:
        transport, protocol = await tcp_connect(protocol_factory, **where, **tcp_options)
        _mark_tcp(transport)
        return transport, protocol
    nonce = secrets.token_bytes(16)
    negotiation = _Negotiation(Hello(_hints.own, nonce).encode())
    # A connection refused is TCP's answer, not a failed upgrade: it is raised.
    tcp, _ = await tcp_connect(lambda: negotiation, **where, **tcp_options)
    try:
        transport, rest = await _upgrade(loop, tcp, negotiation, nonce, host, port, domids,
                                         _names(tcp))
    except Exception as exc:
        # Nothing reached the application yet: TCP, as if we had not tried.
        log.debug("drop-in: %s port %d over TCP: %s", host, port, exc)
        _hints.failed(host, port)
        if sock is not None:
            tcp_options = dict(tcp_options, family=sock.family)
        transport, protocol = await tcp_connect(protocol_factory, host, port, **tcp_options)
        _mark_tcp(transport)
        return transport, protocol
    try:
        protocol = protocol_factory()
    except BaseException:
        transport.abort()
        raise
    _hand_over(transport, protocol, rest)
    transport.resume_reading()
    return transport, protocol


def _tcp_api(loop: asyncio.AbstractEventLoop) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The loop's own ``create_connection`` and ``create_server`` (those under a
    drop-in wrapping, :func:`vchan.dropin_loop.wrap_loop`)."""
    wrapped = getattr(loop, "_vchan_tcp", None)
    if wrapped is not None:
        return cast(tuple[Callable[..., Any], Callable[..., Any]], wrapped)
    return loop.create_connection, loop.create_server


def _check_address(host: Any, port: Any) -> None:
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    if not host:
        raise ValueError("host must not be empty")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"a TCP port must be an int, not {type(port).__name__}")
    if not 0 < port < 65536:
        raise ValueError(f"TCP port {port} is out of range 1..65535")


async def _upgrade(loop: asyncio.AbstractEventLoop, tcp: asyncio.Transport,
                   negotiation: _Negotiation, nonce: bytes, host: str, port: int,
                   domids: list[int], names: dict[str, Any]) -> tuple[asyncio.Transport, bytes]:
    """The upgrade of a connected ``tcp``: the transport to use (paused) and
    the bytes the application gets first.  Raises why it failed."""
    from .client import create_connection as vchan_connection

    deadline = loop.time() + UPGRADE_TIMEOUT
    stream: asyncio.Transport | None = None
    gate: _ClientGate | None = None
    try:
        try:
            answer = await asyncio.wait_for(asyncio.shield(negotiation.answer), ANSWER_TIMEOUT)
        except TimeoutError:
            raise _Fallback(f"no drop-in answer within {ANSWER_TIMEOUT} s") from None
        if isinstance(answer, Decline):
            log.debug("drop-in: %s port %d declined the upgrade (%s): TCP", host, port,
                      answer.why)
            _hints.failed(host, port)
            _mark_tcp(tcp)
            return tcp, negotiation.reader.rest
        if answer.domid not in domids:
            raise _Fallback(f"the server says it is domain {answer.domid}, which does not "
                            f"advertise {host} port {port}")
        gate = _ClientGate(answer.token, nonce)
        left = max(0.0, deadline - loop.time())
        stream, _ = await asyncio.wait_for(
            vchan_connection(lambda: gate, answer.domid, answer.port, timeout=left), left)
        assert stream is not None
        if stream.get_extra_info("peername", (None,))[0] != answer.domid:
            raise _Fallback("the vchan stream is not with the domain that answered")
        try:
            await asyncio.wait_for(asyncio.shield(gate.accepted),
                                   max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise _Fallback("the vchan server did not accept the claim in time") from None
    except BaseException:
        tcp.abort()
        if stream is not None:
            stream.abort()
        _retrieve(negotiation.answer)
        if gate is not None:
            _retrieve(gate.accepted)
        raise
    # Upgraded: the TCP connection has served its purpose.
    assert stream is not None and gate is not None
    _mark_vchan(stream, names)
    tcp.close()
    rest = bytes(gate.buf)
    gate.buf.clear()
    return stream, rest


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (we fell back; nobody will ask)."""
    if future.done() and not future.cancelled():
        future.exception()
    elif not future.done():
        future.cancel()


# -- server -----------------------------------------------------------------------------


class _Sniffer(asyncio.Protocol):
    """A drop-in server's TCP connection until it is known to be plain or upgrading."""

    def __init__(self, server: DropinServer) -> None:
        self.server = server
        self.sniffer = HelloSniffer()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.token: bytes | None = None
        self.names: dict[str, Any] = {}
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.names = _names(transport)
        self.timer = self.server._loop.call_later(self.server._grace, self._plain)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.token is not None:
            log.debug("drop-in: bytes from %s after the OFFER: dropped",
                      self._peer())
            self._drop()
            return
        try:
            result = self.sniffer.feed(data)
        except RemoteProtocolError as exc:
            log.debug("drop-in: %s: %s", self._peer(), exc)
            self._drop()
            return
        if result is False:
            self._plain()
        elif isinstance(result, Hello):
            self._cancel_timer()
            self.server._offer(self, result)
        elif len(self.sniffer.data) == len(data):
            # A HELLO is starting: it comes whole at once, or it is not one.
            self._cancel_timer()
            self.timer = self.server._loop.call_later(ANSWER_TIMEOUT, self._plain)

    def eof_received(self) -> bool | None:
        if self.done:
            return None
        if self.token is not None:
            self._drop()
            return None
        protocol = self._plain()
        if protocol is not None:
            return protocol.eof_received()  # type: ignore[no-any-return,attr-defined]
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.token is not None:
            self.server._pending.pop(self.token, None)
        self.done = True

    def _peer(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport else None

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _plain(self) -> asyncio.BaseProtocol | None:
        """Hand the connection to the application as TCP."""
        self._cancel_timer()
        if self.done or self.transport is None or self.transport.is_closing():
            return None
        self.done = True
        return self.server._plain(self.transport, bytes(self.sniffer.data))

    def _plain_after_decline(self) -> None:
        """The HELLO was declined: the connection goes on as TCP, from here."""
        self._cancel_timer()
        self.done = True
        assert self.transport is not None
        self.server._plain(self.transport, b"")

    def _drop(self) -> None:
        self._cancel_timer()
        self.done = True
        if self.token is not None:
            self.server._pending.pop(self.token, None)
        if self.transport is not None:
            self.transport.abort()


class _ServerGate(asyncio.Protocol):
    """A drop-in server's vchan stream until it has presented its claim."""

    def __init__(self, server: DropinServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.server._loop.call_later(CLAIM_TIMEOUT, self._refuse,
                                                  "no claim in time")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if len(self.buf) < CLAIM_SIZE:
            return
        if len(self.buf) > CLAIM_SIZE:
            self._refuse("bytes after the claim, before the ACCEPT")
            return
        try:
            claim = Claim.decode(bytes(self.buf))
        except RemoteProtocolError as exc:
            self._refuse(str(exc))
            return
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername", (None,))[0]
        why = self.server._claimed(self, claim.token, peer)
        if why is not None:
            self._refuse(why)

    def eof_received(self) -> bool:
        self._refuse("the client ended the stream before its claim")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()

    def _refuse(self, why: str) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        log.debug("drop-in: vchan stream refused: %s", why)
        if self.transport is not None:
            self.transport.abort()


class DropinServer(asyncio.AbstractServer):
    """A TCP server that also serves co-resident domains over vchan.

    What :class:`asyncio.Server` is (``sockets``, ``close()``,
    ``wait_closed()``, ``serve_forever()``, ``async with``), for the
    connections of both kinds.  ``vchan_port`` is the vchan port it serves
    (``tcp-<port>``) and ``vchan_server`` the :class:`vchan.Server` behind
    it, None when vchan could not be served here (then it is a TCP server
    that declines upgrades; ``vchan_error`` says why).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 hosts: list[str | None], grace: float) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._hosts = hosts
        self._grace = grace
        self._tcp: asyncio.Server | None = None
        self.vchan_server: Any = None
        self.vchan_port: str | None = None
        self.vchan_error: BaseException | None = None
        self.advertised: list[str] = []
        self._own: int | None = None
        self._state: Any = None
        self._ads: list[str] = []
        self._pending: dict[bytes, tuple[_Sniffer, Hello, asyncio.TimerHandle]] = {}
        self._stopping: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self.is_serving() else "idle")
        return (f"<vchan.DropinServer {self._hosts!r} port={self.port} vchan={self.vchan_port!r}"
                f" {state}>")

    @property
    def port(self) -> int | None:
        """The TCP port (the one the system chose, if asked for port 0)."""
        if self._tcp is None or not self._tcp.sockets:
            return None
        return int(self._tcp.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The TCP listening sockets (as :attr:`asyncio.Server.sockets`)."""
        return tuple(self._tcp.sockets) if self._tcp is not None else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._tcp is not None and self._tcp.is_serving()

    async def _start(self, port: int, tcp_options: dict[str, Any]) -> None:
        host: Any = self._hosts if len(self._hosts) > 1 else self._hosts[0]
        self._tcp = await _tcp_api(self._loop)[1](lambda: _Sniffer(self), host, port,
                                                  **tcp_options)
        try:
            await self._start_vchan()
        except Exception as exc:
            # TCP only: upgrades are declined, saying why.
            log.debug("drop-in: %r serves TCP only: %s", self, exc)
            self.vchan_error = exc
            await self._stop_vchan()

    async def _start_vchan(self) -> None:
        from .hub import _state_of
        from .server import Server

        assert self.port is not None
        state = _state_of(self._loop)
        await state.acquire()
        self._state = state
        self._own = state.own
        self.vchan_port = dropin_port(self.port)
        server = Server(self._loop, lambda: _ServerGate(self), self.vchan_port,
                        self.vchan_port, (), raw=False, read_min=1 << 20, write_min=1 << 20,
                        accept_timeout=30.0)
        self.vchan_server = server
        await server.start_serving()
        self.advertised = _advertised(self._hosts, self.sockets)
        await self._advertise(state.xs)

    async def _advertise(self, xs: Any) -> None:
        own, port = self._own, self.port
        assert own is not None and port is not None
        claim = f"/local/domain/{own}/data/vchan-dropin/{port}"
        await xs.write(claim, " ".join(self.advertised))
        self._ads.append(claim)
        await xs.set_perms(claim, [Perm(own, "r")])
        entry = f"{INDEX}/{own}-{port}"
        try:
            await xs.write(entry, "")
            self._ads.append(entry)
            await xs.set_perms(entry, [Perm(own, "r")])
        except OSError as exc:
            # No index (dom0 made none): only clients that know to look here find us.
            log.debug("drop-in: %s cannot be written (%s): clients will not find %r",
                      INDEX, exc, self)

    async def _stop_vchan(self) -> None:
        server, self.vchan_server = self.vchan_server, None
        if server is not None:
            server.close()
        state, self._state = self._state, None
        if state is None:
            return
        try:
            if state.xs is not None and not state.xs.closed:
                for path in reversed(self._ads):
                    with contextlib.suppress(OSError):
                        await state.xs.rm(path)
            self._ads.clear()
            if server is not None:
                await server.wait_closed()
        except Exception as exc:
            # (Run as a task by close(): nobody may be there to hear it.)
            log.debug("drop-in: %r closing: %s", self, exc)
        finally:
            state.release()

    # -- connections ------------------------------------------------------------

    def _plain(self, transport: asyncio.Transport, data: bytes) -> asyncio.BaseProtocol | None:
        _mark_tcp(transport)
        try:
            protocol = self._factory()
        except Exception as exc:
            # (As asyncio's own servers do when their factory fails.)
            transport.abort()
            self._loop.call_exception_handler({
                "message": "vchan drop-in server: protocol factory failed", "exception": exc,
                "server": self})
            return None
        _hand_over(transport, protocol, data)
        return protocol

    def _offer(self, sniffer: _Sniffer, hello: Hello) -> None:
        transport = sniffer.transport
        assert transport is not None
        why = None
        if self.vchan_server is None or self._closed or self._own is None:
            why = f"no vchan here: {self.vchan_error}" if self.vchan_error else "closing"
        elif not self._domain_exists(hello.domid):
            # (Each domain served costs a XenStore watch: only real ones.)
            why = f"no domain {hello.domid} on this host"
        if why is not None:
            transport.write(Decline(why).encode())
            sniffer._plain_after_decline()
            return
        assert self._own is not None
        token = secrets.token_bytes(16)
        sniffer.token = token
        timer = self._loop.call_later(CLAIM_TIMEOUT, self._expire, token)
        self._pending[token] = (sniffer, hello, timer)
        self.vchan_server.add_peer(hello.domid)
        assert self.vchan_port is not None
        transport.write(Offer(self._own, token, self.vchan_port).encode())

    def _domain_exists(self, domid: int) -> bool:
        from .hub import event_hub
        from .listener import domain_exists

        try:
            return domain_exists(event_hub(self._loop).evtchn, domid)
        except OSError:
            return False

    def _expire(self, token: bytes) -> None:
        held = self._pending.pop(token, None)
        if held is not None:
            log.debug("drop-in: no claim for an offer to domain %d in time", held[1].domid)
            held[0]._drop()

    def _claimed(self, gate: _ServerGate, token: bytes, peer: Any) -> str | None:
        """A vchan stream claims ``token``: None if it is accepted, else why not."""
        held = self._pending.get(token)
        if held is None:
            return "unknown or used token"
        sniffer, hello, timer = held
        if peer != hello.domid:
            return f"the token was offered to domain {hello.domid}, not {peer}"
        del self._pending[token]
        timer.cancel()
        tcp, stream = sniffer.transport, gate.transport
        assert tcp is not None and stream is not None
        sniffer.token = None
        sniffer.done = True
        gate.done = True
        if gate.timer is not None:
            gate.timer.cancel()
        _mark_vchan(stream, sniffer.names)
        stream.write(Accept(hello.nonce).encode())
        tcp.close()
        stream.pause_reading()
        self._loop.call_soon(self._upgraded, stream)
        return None

    def _upgraded(self, stream: asyncio.Transport) -> None:
        if stream.is_closing():
            return
        try:
            protocol = self._factory()
        except Exception as exc:
            stream.abort()
            self._loop.call_exception_handler({
                "message": "vchan drop-in server: protocol factory failed", "exception": exc,
                "server": self})
            return
        _hand_over(stream, protocol, b"")
        stream.resume_reading()

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting connections of both kinds (open ones are not touched)."""
        if self._closed:
            return
        self._closed = True
        if self._tcp is not None:
            self._tcp.close()
        for sniffer, _hello, timer in list(self._pending.values()):
            timer.cancel()
            sniffer._drop()
        self._pending.clear()
        if self.vchan_server is not None:
            self.vchan_server.close()
        # The advertisement goes at once, not when somebody waits for it.
        self._stopping = self._loop.create_task(self._stop_vchan())

    async def wait_closed(self) -> None:
        if not self._closed:
            raise RuntimeError("wait_closed() before close()")
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def close_clients(self) -> None:
        """Close every connection (vchan ones; TCP ones on Python >= 3.13)."""
        if self.vchan_server is not None:
            self.vchan_server.close_clients()
        if self._tcp is not None and hasattr(self._tcp, "close_clients"):
            self._tcp.close_clients()

    async def start_serving(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._tcp is not None:
            await self._tcp.start_serving()

    async def serve_forever(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        assert self._tcp is not None
        from .server import serve_until_cancelled

        await serve_until_cancelled(self, self._tcp.serve_forever())


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | Sequence[str] | None,
    port: int, *, grace: float = GRACE, **tcp_options: Any,
) -> DropinServer:
    """Serve TCP ``(host, port)`` and, to co-resident domains, vchan port
    ``tcp-<port>``; advertise the address in XenStore.

    ``host`` is as :meth:`asyncio.loop.create_server`'s (None: every
    interface); ``port`` 0 lets the system choose.  ``tcp_options`` go to
    ``loop.create_server`` (``ssl`` is refused: over vchan there would be no
    TLS).  ``grace``: seconds a connection on which nothing arrives waits
    before it goes to the application as TCP (a drop-in client's first bytes
    come at once; a server-first protocol's client sends nothing).

    If vchan cannot be served (no XenStore, no emulator), this is a TCP
    server; ``vchan_error`` says why.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"a TCP port must be an int, not {type(port).__name__}")
    if not 0 <= port < 65536:
        raise ValueError(f"TCP port {port} is out of range 0..65535")
    if host is None or isinstance(host, str):
        hosts: list[str | None] = [host]
    elif isinstance(host, Sequence) and host and all(isinstance(h, str) for h in host):
        hosts = list(host)
    else:
        raise TypeError("host must be a str, a sequence of str or None")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise ValueError(f"grace must be a number of seconds >= 0, got {grace!r}")
    if tcp_options.get("ssl") is not None:
        raise LocalProtocolError("a drop-in server does not do TLS itself: serve TLS inside "
                                 "the connection (or use asyncio.start_server)")
    if "sock" in tcp_options:
        raise TypeError("a drop-in server makes its own sockets: no sock=")
    loop = asyncio.get_running_loop()
    server = DropinServer(loop, protocol_factory, hosts, float(grace))
    await server._start(port, tcp_options)
    log.debug("drop-in: %r advertises %s", server, server.advertised)
    return server
