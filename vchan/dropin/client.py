"""The client side: connect by host and port, try the upgrade, fall back
to TCP (see :mod:`vchan.dropin` for the protocol).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any, cast

from ..errors import RemoteProtocolError
from ..upgrade import (
    ACCEPT_SIZE,
    Accept,
    AnswerReader,
    Claim,
    Decline,
    Hello,
    Offer,
)
from .common import ANSWER_TIMEOUT, UPGRADE_TIMEOUT, _hand_over, _mark_tcp, _mark_vchan, _names
from .hints import _hints

log = logging.getLogger("vchan.dropin")


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
    from ..client import create_connection as vchan_connection

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
