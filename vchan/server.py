"""Serving vchan: :func:`create_server` and :class:`Server`.

A server watches, for each peer domain, the directory where that domain's
clients ask for connections (listener mode), or publishes one libxenvchan
ring at a time (raw mode).  This module is the server as asyncio code sees
it: starting, the peers it follows, closing and waiting.  How it answers
each request (a ring published, the client met, a protocol made; a session
for a client that asked for one, :mod:`vchan.mux`) is in
:mod:`vchan.accepting`; the steps of that meeting, and the client's side of
it, are in :mod:`vchan.listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from .accepting import Accepting
from .addresses import check_domid, check_port, vchan_path
from .client import _ring_sizes
from .hub import _EventHub, _LoopState, _state_of, event_hub
from .listener import remove_if_empty
from .mux import check_busy_poll

if TYPE_CHECKING:
    from .dropin import DropinServer

__all__ = ["Peers", "Server", "ServerAddress", "create_server"]

log = logging.getLogger("vchan")

Peers = int | Collection[int] | Literal["any"]


class ServerAddress:
    """What :attr:`Server.sockets` lists: a served ``(domid, port)`` address.

    vchan has no sockets; this stands for the address a server serves as a
    listening socket stands for its own, with the calls of
    :class:`asyncio.trsock.TransportSocket` that make sense for it
    (``getsockname()``, and ``fileno()`` -1 as for a closed socket).
    """

    __slots__ = ("_address",)

    def __init__(self, domid: int, port: int | str) -> None:
        self._address = (domid, port)

    def getsockname(self) -> tuple[int, int | str]:
        """The served address: ``(domid, port)``."""
        return self._address

    def getpeername(self) -> tuple[int, int | str]:
        """A serving address has no peer: :class:`OSError` (ENOTCONN), as for a
        listening socket."""
        raise OSError(errno.ENOTCONN, "a vchan server's address has no peer")

    def fileno(self) -> int:
        """-1: there is no file descriptor to poll or pass on."""
        return -1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerAddress) and other._address == self._address

    def __hash__(self) -> int:
        return hash(self._address)

    def __repr__(self) -> str:
        return f"<vchan.ServerAddress domid={self._address[0]} port={self._address[1]!r}>"


class Server(Accepting, asyncio.AbstractServer):
    """A vchan server: what ``asyncio.Server`` is for TCP, with its API.

    ``close()`` stops accepting; connections already made stay open and
    ``wait_closed()`` waits for them too (as asyncio does since 3.12);
    ``close_clients()`` / ``abort_clients()`` end them (as asyncio's do
    since 3.13).  ``sockets`` lists a :class:`ServerAddress` per served
    ``(domid, port)`` while serving (``addresses`` the tuples themselves).
    ``async with server:`` closes it and waits on the way out.  A server
    that can no longer be reached (XenStore lost: on the emulator, its
    daemon died or was stopped) stops serving at once and
    ``serve_forever()`` raises why.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol], port: int | str,
                 port_s: str, peers: Peers, *, raw: bool, read_min: int, write_min: int,
                 accept_timeout: float, shrink: bool = True, sessions: bool = True,
                 busy_poll: float | None = None) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._port = port
        self._port_s = port_s
        self._peers = peers
        self._raw = raw
        self._read_min = read_min
        self._write_min = write_min
        self._accept_timeout = accept_timeout
        self._shrink = shrink               # default sizes: smaller rings beat no ring
        self._sessions = sessions           # grant sessions to clients that ask
        self._busy_poll = busy_poll         # for the streams of those sessions
        self._sessions_open: set[Any] = set()
        self._refused: set[tuple[int, str]] = set()
        self._serving = False
        self._closed = False
        self._state: _LoopState | None = None
        self._hub: _EventHub | None = None    # held from start_serving() to close()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.Transport] = set()
        self._pending: set[Any] = set()         # endpoints, sessions not yet connected
        self._watched: dict[int, asyncio.Task[None]] = {}
        self._seen: dict[int, set[str]] = {}
        self._accept_slots: dict[int, asyncio.Semaphore] = {}
        self._serving_forever: asyncio.Future[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._closing = asyncio.Event()
        self._release: asyncio.Task[None] | None = None
        self.own: int | None = None

    def __repr__(self) -> str:
        mode = "raw" if self._raw else "listener"
        state = "serving" if self._serving else ("closed" if self._closed else "idle")
        return (f"<vchan.Server {mode} port={self._port!r} peers={self._peers!r} {state} "
                f"connections={len(self._transports)}>")

    @property
    def addresses(self) -> list[tuple[int, int | str]]:
        """The (domid, port) addresses this server serves (none once closed)."""
        return [] if self.own is None or self._closed else [(self.own, self._port)]

    @property
    def sockets(self) -> tuple[ServerAddress, ...]:
        """As ``asyncio.Server.sockets``: what it serves, as :class:`ServerAddress`
        objects (``getsockname()`` is ``(domid, port)``); empty once closed, and
        until serving has started (the domain is known from then on)."""
        return tuple(ServerAddress(domid, port) for domid, port in self.addresses)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts connections (started and not closed)."""
        return self._serving

    async def start_serving(self) -> None:
        """Start accepting connections (once; create_server does it by default)."""
        if self._serving:
            return
        if self._closed:
            raise RuntimeError("the vchan server is closed")
        state = _state_of(self._loop)
        await state.acquire()
        self._state = state
        self.own = state.own
        self._hub = event_hub(self._loop)
        self._hub.hold()
        self._serving = True
        try:
            for peer in await self._initial_peers():
                self._watch_peer(peer)
            if self._peers == "any":
                self._spawn(self._follow_domains())
        except BaseException:
            self.close()
            raise

    async def _initial_peers(self) -> list[int]:
        if self._peers == "any":
            return await self._list_domains()
        if isinstance(self._peers, int):
            return [check_domid(self._peers, "peers")]
        return sorted({check_domid(p, "peers") for p in self._peers})

    async def _list_domains(self) -> list[int]:
        assert self._state is not None
        try:
            names = await self._state.xs.directory("/local/domain")
        except PermissionError:
            raise PermissionError(
                "peers='any' needs to list /local/domain, which only a privileged domain "
                "(dom0) may do: name the peer domains instead") from None
        return sorted(int(n) for n in names if n.isdigit() and int(n) != self.own)

    async def _follow_domains(self) -> None:
        assert self._state is not None
        async with self._state.watches.watching("@introduceDomain") as intro, \
                self._state.watches.watching("@releaseDomain") as release:
            while self._serving:
                await _either(intro, release)
                intro.clear()
                release.clear()
                current = set(await self._list_domains())
                for peer in current - set(self._watched):
                    self._watch_peer(peer)
                for peer in set(self._watched) - current:
                    self._watched.pop(peer).cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or not self._serving:
            return
        xs = self._state.xs if self._state is not None else None
        if isinstance(exc, ConnectionError) and xs is not None and xs.closed:
            # XenStore is gone (on the emulator: its daemon died or stopped):
            # no client can reach us any more.  Say so rather than serve
            # nobody: serve_forever() raises it.
            self._fail(exc)
            return
        self._loop.call_exception_handler({
            "message": "vchan server task failed", "exception": exc, "server": self})

    def _fail(self, exc: BaseException) -> None:
        """Stop serving because of ``exc``, which serve_forever() raises."""
        log.warning("%r stopped: %s", self, exc)
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.set_exception(exc)
        self.close()

    def add_peer(self, domid: int) -> None:
        """Serve domain ``domid`` too, from now on (listener mode).

        A drop-in server (:mod:`vchan.dropin`) serves each domain that asked
        over TCP this way; an unprivileged domain cannot follow every domain
        (``peers="any"``).  Each peer costs one XenStore watch while the
        server serves.
        """
        check_domid(domid, "peer")
        if self._raw:
            raise ValueError("a raw server serves one peer domain: no add_peer()")
        if self._serving:
            self._watch_peer(domid)

    def _watch_peer(self, peer: int) -> None:
        if peer in self._watched:
            return
        coro = self._serve_raw(peer) if self._raw else self._serve_listener(peer)
        self._watched[peer] = self._spawn(coro)

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting connections (open ones are not touched)."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        for endpoint in list(self._pending):
            endpoint.close()
        self._pending.clear()
        for session in list(self._sessions_open):
            session.goaway()        # open streams go on; the session ends with them
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
        if self._hub is not None:   # (once: close() runs once)
            self._hub.unhold()      # our transports hold the hub themselves
        self._maybe_all_closed()

    def close_clients(self) -> None:
        """Close every connection this server accepted."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection this server accepted."""
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection it accepted ended."""
        if not self._closed:
            await self._closing.wait()      # asyncio's waits for close() too
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Path clean-ups need XenStore: release it only after them.
        await self._all_closed.wait()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._release is None and self._state is not None:
            # Once, however many tasks wait: the others wait for this one.
            self._release = self._loop.create_task(self._release_state(self._state))
        if self._release is not None:
            await asyncio.shield(self._release)

    async def _release_state(self, state: _LoopState) -> None:
        try:
            if not self._raw and self.own is not None:
                # The port's directory for each peer, once its connections'
                # rings are gone (a domain serving many ports in turn must
                # not fill its XenStore node quota).
                for peer in sorted(self._seen):
                    with contextlib.suppress(OSError):
                        await remove_if_empty(state.xs,
                                              vchan_path(self.own, peer, self._port_s))
        finally:
            state.release()
            self._state = None

    async def serve_forever(self) -> None:
        """Serve until cancelled (then close and wait), or raise why serving stopped."""
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        await self.start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await serve_until_cancelled(self, self._serving_forever)
        finally:
            self._serving_forever = None


async def serve_until_cancelled(server: Any, serving: Awaitable[Any]) -> None:
    """``serve_forever()``'s end, as asyncio's: await ``serving``; cancelled,
    close ``server`` and wait for it, then let the cancellation go on."""
    try:
        await serving
    except asyncio.CancelledError:
        try:
            server.close()
            await server.wait_closed()
        finally:
            raise


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


@overload
async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], port: int | str, *,
    peers: Peers, raw: bool = False, read_min: int | None = None,
    write_min: int | None = None, accept_timeout: float = 30.0, start_serving: bool = True,
    sessions: bool = True, busy_poll: float | None = None,
) -> Server: ...


@overload
async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | Sequence[str] | None,
    port: int, *, grace: float = ..., **tcp_options: Any,
) -> DropinServer: ...


async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any,
                        **kwargs: Any) -> Server | DropinServer:
    """Serve vchan port ``port`` to the domains in ``peers``:
    ``create_server(factory, port, peers=...)``; or serve a TCP address and
    vchan to co-resident domains at once (drop-in):
    ``create_server(factory, host, port)``.

    The two are told apart by ``peers``, which only the first has.  The
    drop-in form is :func:`vchan.dropin.create_server`.
    """
    if "peers" in kwargs:
        return await _create_server(protocol_factory, *args, **kwargs)
    if len(args) + ("host" in kwargs) + ("port" in kwargs) != 2:
        raise TypeError("create_server(factory, port, peers=...) serves vchan; "
                        "create_server(factory, host, port) serves a TCP address and vchan "
                        "(drop-in)")
    from .dropin import create_server as by_address

    return await by_address(protocol_factory, *args, **kwargs)


async def _create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol], port: int | str, *,
    peers: Peers, raw: bool = False, read_min: int | None = None,
    write_min: int | None = None, accept_timeout: float = 30.0, start_serving: bool = True,
    sessions: bool = True, busy_poll: float | None = None,
) -> Server:
    """Serve vchan port ``port`` to the domains in ``peers``.

    ``peers`` is one domid, a collection of domids, or ``"any"`` (follows
    domains as they come and go; needs a privileged domain).  In listener
    mode (the default) any number of clients of each peer may connect at
    once, each on its own libxenvchan ring; ``raw=True`` serves exactly one
    plain libxenvchan connection at a time on the path, for C peers
    (``peers`` must then be one domid).  ``read_min`` / ``write_min`` are
    this server's ring sizes in bytes (clients may ask for others).  Left
    out, rings are 1 MiB each way, and smaller ones when the domain runs
    short of grants; given, they are kept, or the connection is refused
    with the grant limit named.

    A client that asks for a session (vchan clients do by default) gets one
    ring for all its connections to this port (:mod:`vchan.mux`);
    ``sessions=False`` gives every connection a ring of its own, as a
    :class:`~vchan.proxy.SocketSplice` protocol needs.

    ``busy_poll`` (None: adaptive, the default; seconds; 0: never): how
    the connections that come through sessions wait for their peers (see
    :func:`vchan.create_connection`).
    """
    port_s = check_port(port)
    poll = check_busy_poll(busy_poll)
    if peers != "any":
        if isinstance(peers, int):
            check_domid(peers, "peers")
        elif isinstance(peers, Collection) and not isinstance(peers, str | bytes):
            if not peers:
                raise ValueError("peers must name at least one domain")
            for p in peers:
                check_domid(p, "peers")
        else:
            raise TypeError("peers must be a domid, a collection of domids or 'any'")
    if raw and not isinstance(peers, int):
        raise ValueError("raw=True serves one libxenvchan client: peers must be one domid")
    if accept_timeout <= 0:
        raise ValueError(f"accept_timeout must be > 0, got {accept_timeout}")
    shrink = read_min is None and write_min is None
    read_min, write_min = _ring_sizes(read_min, write_min)
    server = Server(asyncio.get_running_loop(), protocol_factory, port, port_s, peers, raw=raw,
                    read_min=read_min, write_min=write_min, accept_timeout=accept_timeout,
                    shrink=shrink, sessions=sessions, busy_poll=poll)
    if start_serving:
        await server.start_serving()
    return server
