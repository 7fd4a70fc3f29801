"""Connecting to a vchan server: :func:`create_connection`.

A connection is either a stream of the loop's session with the server's
port (:mod:`vchan.pool`, :mod:`vchan.mux`) or a libxenvchan ring of its
own, met through XenStore (the client side of the meeting is
:func:`vchan.listener.client_connect`) and served by a
:class:`~vchan.transport.VchanTransport`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, overload

from . import dropin
from .addresses import check_domid, check_port, check_ring_size
from .endpoint import DEFAULT_RING_SIZE, Endpoint
from .hub import _loop_state, event_hub
from .listener import client_connect, wait_for_server_domain
from .mux import check_busy_poll
from .pool import session_pool
from .transport import SpliceProtocol, VchanTransport

__all__ = ["create_connection"]


def _ring_sizes(read_min: int | None, write_min: int | None) -> tuple[int, int]:
    """Checked ring sizes (also the server's); None is the default size."""
    r = DEFAULT_RING_SIZE if read_min is None else check_ring_size(read_min, "read_min")
    w = DEFAULT_RING_SIZE if write_min is None else check_ring_size(write_min, "write_min")
    return r, w


@overload
async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], domid: int, port: int | str, *,
    timeout: float | None = None, read_min: int | None = None, write_min: int | None = None,
    dedicated: bool | None = None, busy_poll: float | None = None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]: ...


@overload
async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], domid: str, port: int,
    **tcp_options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]: ...


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], domid: int | str, port: int | str,
    **options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect to vchan port ``port`` of domain ``domid`` (an int), or by
    address (drop-in): ``create_connection(factory, host, port)``.

    With a host (a str) and a TCP port, the connection is vchan when a
    co-resident domain serves that address as a drop-in server and proves it
    over TCP, else plain TCP; ``options`` then go to
    :meth:`asyncio.loop.create_connection` (see :func:`vchan.dropin.create_connection`).
    """
    if isinstance(domid, str):
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"connecting to host {domid!r}: the TCP port must be an int, "
                            f"not {type(port).__name__}")
        return await dropin.create_connection(protocol_factory, domid, port, **options)
    return await _create_connection(protocol_factory, domid, port, **options)


async def _create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol], domid: int, port: int | str, *,
    timeout: float | None = None, read_min: int | None = None, write_min: int | None = None,
    dedicated: bool | None = None, busy_poll: float | None = None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect to vchan port ``port`` of domain ``domid``.

    Waits for the server (on a XenStore watch) up to ``timeout`` seconds
    (None: as long as the server's domain exists).  Reaches listener servers
    (many clients per port) and raw libxenvchan servers alike.

    By default the connection is a stream of this event loop's session with
    the server's port (:mod:`vchan.mux`): the first connection meets the
    server through XenStore, every later one costs one frame on the
    session's ring, and all of them share its grants.  ``dedicated=True``
    (implied by ``read_min`` / ``write_min``) gives the connection a
    libxenvchan ring of its own instead, as a
    :class:`~vchan.proxy.SocketSplice` needs; ``read_min`` / ``write_min``
    then ask a listener for ring sizes (bytes, up to 1 MiB each; left out,
    the server chooses).  A raw server decides its sizes itself.

    ``busy_poll`` is how the connection's session waits for the peer
    (session connections only).  By default (None) it polls adaptively:
    after a write it keeps looking at the ring until the answer comes, for
    a window of 50 us that grows up to 200 us while answers come just after
    it, instead of sleeping until the peer's event wakes it (a
    request/response exchange, or a run of set-ups, then costs no
    wake-ups), and backs off when answers do not come.  Seconds (e.g.
    ``50e-6``) poll that long after every read and write, as
    ``SO_BUSY_POLL`` does for sockets, trading a core for latency; ``0``
    never polls.  See :mod:`vchan.mux` and
    ``docs/streams.md`` for what each costs.

    ``timeout=0`` waits for nothing: it connects through a session this
    loop already holds with the port, or to a raw server published now;
    otherwise it raises :class:`TimeoutError` saying so (a listener's answer
    is a round trip away).

    Raises :class:`vchan.NoSuchDomainError` if the domain does not exist (or
    goes away), :class:`TimeoutError` when no server appears in time, and
    :class:`ConnectionRefusedError` when the server turns the request down.
    """
    check_domid(domid)
    port_s = check_port(port)
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    poll = check_busy_poll(busy_poll)
    if dedicated is None:
        dedicated = read_min is not None or write_min is not None
    elif not dedicated and (read_min is not None or write_min is not None):
        raise ValueError("read_min/write_min size a dedicated ring: not with dedicated=False")
    if dedicated and poll:
        raise ValueError("busy_poll is for session connections: not with a dedicated ring "
                         "(read_min/write_min/dedicated=True)")
    loop = asyncio.get_running_loop()
    pool = None
    if not dedicated:
        pool = session_pool(loop)
        held = pool.take_held(domid, port_s)
        if held is not None:        # the common case: one frame, no await
            return _open_stream(held, protocol_factory, domid, port, port_s, poll)
        if timeout == 0:
            pool = None     # no session to wait for: look once (client_connect)
    # Sizes not given are the server's choice (0 in the request).
    read_min, write_min = _ring_sizes(read_min or 0, write_min or 0)
    hub = event_hub(loop)
    hub.hold()
    try:
        endpoint: Endpoint | None = None
        # On the emulator a server started just before us may not be there yet.
        spent = await wait_for_server_domain(hub.evtchn, domid, timeout)
        if timeout is not None:
            timeout -= spent
        if pool is not None:
            got = await pool.connect(domid, port_s, timeout)
            if isinstance(got, tuple):
                endpoint = got[0]
                own = pool.own
            else:
                return _open_stream(got, protocol_factory, domid, port, port_s, poll)
        if endpoint is None:
            async with _loop_state() as state:
                assert state.own is not None
                endpoint, _mode = await client_connect(
                    state.xs, state.watches, hub.evtchn, own=state.own, server=domid,
                    port=port_s, read_min=read_min, write_min=write_min, timeout=timeout,
                    session=not dedicated)
                own = state.own
        protocol = protocol_factory()
        waiter = loop.create_future()
        transport = VchanTransport(loop, endpoint, protocol, hub, waiter=waiter, extra={
            "peername": (domid, port), "sockname": (own, port)})
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol
    finally:
        hub.unhold()


def _open_stream(session: Any, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 domid: int, port: int | str, port_s: str, busy_poll: float | None = None,
                 ) -> tuple[Any, asyncio.BaseProtocol]:
    """A new connection as a stream of ``session``: no XenStore, no round trip."""
    protocol = protocol_factory()
    if isinstance(protocol, SpliceProtocol):
        raise TypeError("a SpliceProtocol needs a ring of its own: pass read_min/write_min "
                        "to create_connection for a dedicated connection")
    transport = session.open_stream(port_s, protocol, busy_poll=busy_poll,
                                    extra={"peername": (domid, port),
                                           "sockname": (session.own, port)})
    transport.make_now()
    return transport, protocol
