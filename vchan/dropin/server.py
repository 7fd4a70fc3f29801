"""The server side: a TCP server that also listens on vchan, sniffs each
TCP connection's first bytes for a HELLO and upgrades it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from ..errors import LocalProtocolError, RemoteProtocolError
from ..upgrade import (
    CLAIM_SIZE,
    Accept,
    Claim,
    Decline,
    Hello,
    HelloSniffer,
    Offer,
    dropin_port,
)
from ..xenstore import Perm
from .client import _tcp_api
from .common import (
    ANSWER_TIMEOUT,
    CLAIM_TIMEOUT,
    GRACE,
    INDEX,
    _advertised,
    _hand_over,
    _mark_tcp,
    _mark_vchan,
    _names,
)

log = logging.getLogger("vchan.dropin")


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
        from ..hub import _state_of
        from ..server import Server

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
        from ..hub import event_hub
        from ..listener import domain_exists

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
        from ..server import serve_until_cancelled

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
