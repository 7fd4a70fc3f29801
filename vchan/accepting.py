"""A :class:`vchan.server.Server`'s side of the meeting: answering clients.

:mod:`vchan.server` is the server as asyncio code sees it (start, close,
wait, the peers it follows); this is what it does for each peer domain.  In
listener mode it watches the directory where the peer's clients ask for
connections and answers each request: a session ring (the connections of
that client then come as streams, :meth:`Accepting._accept_stream`) or a
ring of the connection's own, published in XenStore and handed to a new
protocol once the client maps it; a request it cannot serve (no grants
left, the server closing) gets a refusal naming why, at once.  In raw mode
it publishes one plain libxenvchan ring at a time.  The steps of the
meeting, and the client's side of it, are in :mod:`vchan.listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from .addresses import request_dir, vchan_path
from .endpoint import Endpoint
from .errors import VchanError
from .hub import _EventHub, _LoopState
from .listener import (
    MAX_PENDING_PER_ADDRESS,
    is_nonce,
    parse_request,
    publish,
    refuse,
    remove_if_empty,
    wait_client,
)
from .mux import Session
from .mux_stream import StreamTransport
from .transport import VchanTransport

__all__ = ["Accepting"]


class Accepting:
    """The accept side of :class:`vchan.server.Server` (a mixin: the server's
    state is the server's; these are the methods that answer its peers)."""

    _loop: asyncio.AbstractEventLoop
    _factory: Callable[[], asyncio.BaseProtocol]
    _port: int | str
    _port_s: str
    _read_min: int
    _write_min: int
    _accept_timeout: float
    _shrink: bool
    _sessions: bool
    _busy_poll: float | None
    _serving: bool
    _state: _LoopState | None
    _hub: _EventHub | None
    own: int | None
    _sessions_open: set[Any]
    _refused: set[tuple[int, str]]
    _transports: set[asyncio.Transport]
    _pending: set[Any]
    _watched: dict[int, asyncio.Task[None]]
    _seen: dict[int, set[str]]
    _accept_slots: dict[int, asyncio.Semaphore]
    _all_closed: asyncio.Event

    _spawn: Callable[[Any], asyncio.Task[Any]]         # (the server's methods)
    _watch_peer: Callable[[int], None]

    # -- listener mode --------------------------------------------------------

    async def _serve_listener(self, peer: int) -> None:
        assert self._state is not None and self.own is not None
        reqdir = request_dir(peer, self.own, self._port_s)
        seen = self._seen.setdefault(peer, set())
        await self._clear_answers(peer)
        async with self._state.watches.watching(reqdir) as changed:
            while self._serving:
                await changed.wait()
                changed.clear()
                try:
                    names = await self._state.xs.directory(reqdir)
                except (FileNotFoundError, PermissionError):
                    names = []
                current = {n for n in names if is_nonce(n)}
                for nonce in seen - current:
                    # A refused client withdrew its request: our answer goes too
                    # (left behind, answers would fill the port's directory).
                    if (peer, nonce) in self._refused:
                        self._refused.discard((peer, nonce))
                        self._spawn(self._forget_refusal(peer, nonce))
                seen &= current             # forget requests their clients removed
                for nonce in current - seen:
                    seen.add(nonce)
                    self._spawn(self._accept_limited(peer, nonce, f"{reqdir}/{nonce}"))

    async def _clear_answers(self, peer: int) -> None:
        """Answers an earlier server of this port left for ``peer`` go.

        A server that crashed in a domain that lives on (a domU's service
        restarted) leaves its answers (rings nobody maps now, refusals);
        they are nobody's, and left they would fill the port's directory
        until nothing more could be published there.  A server starting on
        a port takes it over: its in-flight answers go too.
        """
        assert self._state is not None and self.own is not None
        xs = self._state.xs
        base = vchan_path(self.own, peer, self._port_s)
        try:
            names = await xs.directory(base)
        except (FileNotFoundError, PermissionError):
            return
        for name in names:
            if is_nonce(name):
                with contextlib.suppress(FileNotFoundError):
                    await xs.rm(f"{base}/{name}")

    async def _forget_refusal(self, peer: int, nonce: str) -> None:
        assert self._state is not None and self.own is not None
        base = vchan_path(self.own, peer, self._port_s)
        with contextlib.suppress(OSError):
            await self._state.xs.rm(f"{base}/{nonce}")
            await remove_if_empty(self._state.xs, base)

    async def _accept_limited(self, peer: int, nonce: str, request: str) -> None:
        # Pending rings of one peer live in one XenStore directory, whose
        # size is limited: publish a bounded number at a time.
        slots = self._accept_slots.get(peer)
        if slots is None:
            slots = self._accept_slots[peer] = asyncio.Semaphore(MAX_PENDING_PER_ADDRESS)
        async with slots:
            await self._accept(peer, nonce, request)

    async def _accept(self, peer: int, nonce: str, request: str) -> None:
        assert self._state is not None and self._hub is not None and self.own is not None
        xs = self._state.xs
        try:
            value = await xs.read(request)
        except (FileNotFoundError, PermissionError):
            return                          # withdrawn already
        path = f"{vchan_path(self.own, peer, self._port_s)}/{nonce}"
        try:
            read_min, write_min, session = parse_request(value)
            session = session and self._sessions
            if read_min or write_min or not self._shrink:
                # Sizes somebody asked for: those or an error naming the limit.
                endpoint = Endpoint.serve(peer, read_min=read_min or self._read_min,
                                          write_min=write_min or self._write_min,
                                          evtchn=self._hub.evtchn)
            else:
                endpoint = Endpoint.serve_shrinking(peer, read_min=self._read_min,
                                                    write_min=self._write_min,
                                                    evtchn=self._hub.evtchn)
            if session:
                await self._connect_session(endpoint, peer, path)
            else:
                await self._connect(endpoint, peer, path)
        except (OSError, VchanError) as exc:
            # Tell the client at once rather than let it wait for its timeout;
            # the answer goes once the client withdraws its request.
            if self._serving:
                self._refused.add((peer, nonce))
                await refuse(xs, path, str(exc), self.own, peer)
            if not isinstance(exc, OSError):
                raise

    async def _connect_session(self, endpoint: Any, peer: int, path: str) -> None:
        """Publish a session ring; once the client is there, it opens streams."""
        assert self._hub is not None and self.own is not None
        try:
            session = Session(self._loop, endpoint, self._hub, is_server=True, own=self.own,
                              peer=peer, accept=self._accept_stream,
                              on_close=self._session_closed)
        except BaseException:
            endpoint.close()
            raise
        if not await self._meet(session, endpoint, peer, path, session=True,
                                then=session._on_event):
            return
        self._sessions_open.add(session)
        self._all_closed.clear()
        session._on_event()         # the client may have opened streams already

    async def _connect(self, endpoint: Any, peer: int, path: str, *,
                       keep_path: bool = False) -> VchanTransport | None:
        """Publish a ring, wait for the client, hand it to a new protocol."""
        if not await self._meet(endpoint, endpoint, peer, path, keep_path=keep_path):
            return None
        return self._make_transport(endpoint, peer, path if keep_path else None)

    async def _meet(self, held: Any, endpoint: Any, peer: int, path: str, *,
                    session: bool = False, then: Callable[[], None] | None = None,
                    keep_path: bool = False) -> bool:
        """Publish ``endpoint``'s ring at ``path``; whether the client came.

        ``held`` is what the ring will carry (the endpoint itself or a
        session over it): pending meanwhile, closed unless the client came
        while we still serve.  ``path`` is removed once the meeting is over,
        or with ``keep_path`` (raw mode) only if the client did not come.
        """
        assert self._state is not None and self._hub is not None and self.own is not None
        self._pending.add(held)
        try:
            await publish(self._state.xs, path, endpoint.ring_ref, endpoint.port, self.own,
                          peer, session=session)
            connected = await wait_client(self._hub, endpoint, self._accept_timeout, then=then)
        except BaseException:
            self._pending.discard(held)
            held.close()
            await _rm_quietly(self._state.xs, path)
            raise
        self._pending.discard(held)
        if not keep_path:
            await _rm_quietly(self._state.xs, path)
        if connected and self._serving:
            return True
        held.close()
        if keep_path:
            await _rm_quietly(self._state.xs, path)
        return False

    def _accept_stream(self, session: Any, stream_id: int, port: str) -> Any:
        """A client opened a stream on one of our sessions: a new connection."""
        if not self._serving:
            return "the vchan server is no longer serving"
        if port != self._port_s:
            return f"no vchan server for port {port} on this session"
        try:
            protocol = self._factory()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "vchan server: protocol factory failed", "exception": exc,
                "server": self})
            return f"the vchan server failed to make a protocol: {exc!r}"
        holder: list[Any] = []

        def closed() -> None:
            self._transports.discard(holder[0])
            self._maybe_all_closed()

        transport = StreamTransport(session, stream_id, protocol, extra={
            "peername": (session.peer, self._port), "sockname": (self.own, self._port)},
            on_close=closed, busy_poll=self._busy_poll)
        holder.append(transport)
        self._transports.add(transport)
        self._all_closed.clear()
        transport.make_now()
        return transport

    def _session_closed(self, session: Any) -> None:
        self._sessions_open.discard(session)
        self._pending.discard(session)
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if not self._transports and not self._pending and not self._sessions_open:
            self._all_closed.set()

    def _make_transport(self, endpoint: Any, peer: int, xs_path: str | None) -> VchanTransport:
        try:
            protocol = self._factory()
        except BaseException:
            endpoint.close()
            raise
        holder: list[VchanTransport] = []

        def closed() -> None:
            self._transports.discard(holder[0])
            if xs_path is not None:
                self._cleanup_path(xs_path, peer)
            self._maybe_all_closed()

        transport = VchanTransport(self._loop, endpoint, protocol, self._hub,  # type: ignore[arg-type]
                                   extra={"peername": (peer, self._port),
                                          "sockname": (self.own, self._port)},
                                   on_close=closed)
        holder.append(transport)
        self._transports.add(transport)
        self._all_closed.clear()
        return transport

    def _cleanup_path(self, path: str, peer: int) -> None:
        """A raw connection ended: remove its path, serve the next client."""
        state = self._state
        if state is None or state._stop.is_set():
            return

        async def cleanup() -> None:
            await _rm_quietly(state.xs, path)
            if self._serving:
                self._watched.pop(peer, None)
                self._watch_peer(peer)

        self._spawn(cleanup())

    # -- raw mode -------------------------------------------------------------

    async def _serve_raw(self, peer: int) -> None:
        assert self._hub is not None and self.own is not None
        path = vchan_path(self.own, peer, self._port_s)
        while self._serving:
            try:
                endpoint = Endpoint.serve(peer, read_min=self._read_min,
                                          write_min=self._write_min, evtchn=self._hub.evtchn)
            except ProcessLookupError:
                # A raw ring is made for one peer domain, which must exist:
                # wait for it to come up.
                await self._wait_for_domain(peer)
                continue
            transport = await self._connect(endpoint, peer, path, keep_path=True)
            if transport is not None:
                return      # one connection at a time: closing it serves the next

    async def _wait_for_domain(self, peer: int) -> None:
        # Looked up when called, so that a replacement counts (tests make one).
        from .listener import domain_exists

        assert self._state is not None and self._hub is not None
        async with self._state.watches.watching("@introduceDomain") as changed:
            while not domain_exists(self._hub.evtchn, peer):
                changed.clear()
                # The watch may not be ours to see (unprivileged domains):
                # look again every second regardless.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)


async def _rm_quietly(xs: Any, path: str) -> None:
    """Remove ``path`` if XenStore can still be reached.

    A clean-up: when the connection is closed already (``asyncio.run()``
    ending cancels every task at once, the loop's XenStore connection among
    them) there is nothing to remove it from, and nothing worth a traceback.
    """
    if xs.closed:
        return
    with contextlib.suppress(OSError, ValueError):      # ValueError: closed meanwhile
        await xs.rm(path)
