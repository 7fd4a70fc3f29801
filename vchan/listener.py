"""Meeting through XenStore: raw libxenvchan servers and the listener protocol.

THEORY OF OPERATION
===================

A vchan address is ``(server domid S, port P)``; ``P`` is an int or a short
name.  A client in domain ``C`` looks at

    base = /local/domain/S/data/vchan/C/P

Raw mode (exactly libxenvchan; one client; any C peer can be either side)
    The server writes ``base/ring-ref`` and ``base/event-channel`` in one
    transaction, both with permissions ``[{S: none}, {C: read}]``, and
    removes ``base`` when the connection closes.  The client reads both keys
    and connects.

Listener mode (vchan's default for servers; many concurrent clients)
    Every ring is its own raw libxenvchan ring at its own path, so every
    ring stays byte-compatible; only the meeting differs.  A ring carries
    either one connection or, when the client asks for a session (the
    default of :func:`vchan.create_connection`), a session over which that
    client process opens any number of connections to the port without
    XenStore (:mod:`vchan.mux`).  Each side
    writes only to its own XenStore tree:

    1. The client picks a fresh random nonce and writes, in its own tree,

           /local/domain/C/data/vchan-req/S/P/<nonce> = "<read_min> <write_min>[ session]"

       with ``vchan-req/S/P`` readable by S (``[{C: none}, {S: read}]``;
       the request inherits that).  The sizes are the rings the client
       would like (0 for "server's choice").
    2. The server watches ``/local/domain/C/data/vchan-req/S/P`` of each
       peer domain.  For a nonce it has not seen, it sets up a ring and
       publishes it as a raw server at ``base/<nonce>``
       (``ring-ref``, ``event-channel``, and ``session = 1`` when it grants
       a session), or writes ``base/<nonce>/error`` if it cannot (e.g. its
       grant limit is reached).
    3. The client, watching ``base``, connects to ``base/<nonce>`` as a
       plain libxenvchan client, then deletes its request.
    4. The server sees the client's live byte go to 1, removes
       ``base/<nonce>`` and hands the connection to its protocol.  A ring
       nobody connects to within ``accept_timeout`` is torn down.

    Nonces make simultaneous clients independent: no two ever share a ring.
    A client that finds ``base/ring-ref`` (a raw server) connects to it
    directly instead, so one client API reaches both kinds of server.

Waiting.  A client whose server is not there yet waits on a XenStore watch
(never polling XenStore) up to its timeout, and checks once a second that
the server's domain still exists (binding an event channel to a missing
domain fails with ESRCH; that is how Xen answers "no such domain").

Both sides of the meeting are in this module.  Client: :func:`client_connect`
(steps 1 and 3; the XenStore part is :func:`vchan.handshake.client_rendezvous`).
Server: :func:`parse_request` and :func:`publish` (step 2, and raw mode's
publication), :func:`refuse` (step 2's error) and :func:`wait_client` (step
4); :class:`vchan.server.Server` drives them (it watches the request
directories, and removes what it published).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from . import handshake
from .addresses import check_ring_size, vchan_path
from .devices import EventChannel
from .endpoint import Endpoint, RingNotOfferedError
from .errors import NoSuchDomainError, VchanError
from .handshake import run_async
from .ring import LIVE_WAITING
from .xenstore import Perm, XenStore

if TYPE_CHECKING:
    from .hub import _EventHub

__all__ = [
    "WatchRegistry",
    "client_connect",
    "domain_exists",
    "parse_request",
    "publish",
    "refuse",
    "wait_client",
]

_NONCE = re.compile(r"^[0-9a-f]{16,64}$")

# XenStore counts a directory's child names against its node-size quota
# (2,048 bytes by default): a request directory holds about a hundred
# 16-character nonces.  Keep each process well below that per address.
MAX_PENDING_PER_ADDRESS = 32

# A raw server publishes its next ring when a client's connection ends,
# removing the old entry first or after closing that ring: a client that
# read the old entry finds it closed (or its grants gone) and waits this
# long for the entry to change before the error is final.
RAW_STALE_GRACE = 1.0


def raw_retry_grace(exc: OSError) -> float | None:
    """How long a client waits for a raw server's entry to change after
    ``exc`` connecting to the ring it names: as long as its caller waits
    (None) for a ring another client holds, ``RAW_STALE_GRACE`` for one that
    is closed or gone.  Raises ``exc`` when waiting cannot help (no domain)."""
    if isinstance(exc, (ProcessLookupError, NoSuchDomainError)):
        raise exc
    return None if isinstance(exc, RingNotOfferedError) and exc.taken else RAW_STALE_GRACE


def domain_exists(evtchn: EventChannel, domid: int) -> bool:
    """Whether domain ``domid`` exists (the hypervisor's own answer).

    Asks to bind port 0 of that domain: port 0 is reserved (never an
    unbound port waiting for us), so the bind always fails -- with ESRCH when
    there is no such domain, EINVAL when there is.  (Allocating an unbound
    port for the domain would not do: Xen does not check that the remote
    domain exists, so it succeeds for any domid.)

    A destroyed domain whose pages someone still maps lingers as a dying
    "zombie" until they are unmapped, and counts as existing here.  A
    hypervisor that cannot answer (the emulator's daemon died or is
    stopped) raises its error: nobody can say.
    """
    try:
        port = evtchn.bind_interdomain(domid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        if evtchn.failed is not None:
            raise
        return True
    evtchn.unbind(port)         # not expected: port 0 is never bindable
    return True


# XenStore allows each domain only a few transactions at once (10 by
# default), shared by all its programs: never hold more than a few per
# connection.
_TX_PER_CONNECTION = 4
_tx_slots: weakref.WeakKeyDictionary[XenStore, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def tx_slots(xs: XenStore) -> asyncio.Semaphore:
    """The transactions one asyncio XenStore connection may hold at once."""
    slots = _tx_slots.get(xs)
    if slots is None:
        slots = _tx_slots[xs] = asyncio.Semaphore(_TX_PER_CONNECTION)
    return slots


async def remove_if_empty(xs: XenStore, path: str) -> None:
    """Remove directory ``path`` if it has no children, atomically."""
    await run_async(handshake.remove_if_empty(path), xs, tx_slots=tx_slots(xs))


class WatchRegistry:
    """One XenStore watch per path, shared by every waiter of a connection.

    XenStore limits each domain to a few watches (128 by default); two hundred
    clients connecting to one server at once must not take two hundred.
    """

    def __init__(self, xs: XenStore) -> None:
        self.xs = xs
        self._subs: dict[str, set[asyncio.Event]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Future[None]] = {}

    @contextlib.asynccontextmanager
    async def watching(self, path: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever anything at or below ``path`` changes.

        It starts set (the state must be checked once after subscribing).
        """
        changed = asyncio.Event()
        changed.set()
        subs = self._subs.setdefault(path, set())
        subs.add(changed)
        try:
            while path not in self._tasks:
                starting = self._starting.get(path)
                if starting is None:
                    # The first subscriber registers the watch; the others
                    # that arrive meanwhile wait for it rather than add more.
                    starting = self._starting[path] = asyncio.get_running_loop().create_future()
                    try:
                        watch = await self.xs.watch(path)
                    except asyncio.CancelledError:
                        starting.cancel()           # its own cancellation: the others retry
                        raise
                    except BaseException as exc:
                        starting.set_exception(exc)
                        starting.exception()        # retrieved: the others re-raise it
                        raise
                    finally:
                        del self._starting[path]
                    self._tasks[path] = asyncio.get_running_loop().create_task(
                        self._pump(path, watch), name=f"vchan watch {path}")
                    starting.set_result(None)
                    break
                try:
                    await asyncio.shield(starting)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if starting.cancelled() and task is not None and not task.cancelling():
                        continue        # the subscriber registering it was cancelled, not us
                    raise
            yield changed
        finally:
            subs.discard(changed)
            if not subs:
                self._subs.pop(path, None)
                task = self._tasks.pop(path, None)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task

    async def _pump(self, path: str, watch: Any) -> None:
        try:
            async for _event in watch:
                for changed in self._subs.get(path, ()):
                    changed.set()
        except OSError:
            for changed in self._subs.get(path, ()):
                changed.set()       # waiters look, and see the failure
            raise
        finally:
            with contextlib.suppress(Exception):
                await watch.close()


# -- client side -----------------------------------------------------------------------


_pending: weakref.WeakKeyDictionary[XenStore, dict[tuple[int, str], asyncio.Semaphore]] = \
    weakref.WeakKeyDictionary()


def _pending_slots(xs: XenStore, key: tuple[int, str]) -> asyncio.Semaphore:
    table = _pending.get(xs)
    if table is None:
        table = _pending[xs] = {}
    slots = table.get(key)
    if slots is None:
        slots = table[key] = asyncio.Semaphore(MAX_PENDING_PER_ADDRESS)
    return slots



#: How long a client on the emulator waits for its server's domain to appear.
SIM_DOMAIN_GRACE = 3.0


def _no_such_server_domain(server: int, waited: float | None = None) -> NoSuchDomainError:
    from .backend import get_backend

    if get_backend().name != "sim":
        return NoSuchDomainError(f"vchan server domain {server} does not exist")
    waiting = f"; waited {waited:g} s for it" if waited else ""
    return NoSuchDomainError(
        f"vchan server domain {server} does not exist (on the emulator a domain exists "
        f"while a process of it runs: start the server in domain {server} first{waiting})")


def _server_domain_grace(evtchn: EventChannel, server: int, timeout: float | None) -> float:
    """0 if the server's domain exists; else how long to wait for it to
    appear (the emulator), or :class:`NoSuchDomainError` (Xen: at once)."""
    if domain_exists(evtchn, server):
        return 0.0
    from .backend import get_backend

    if get_backend().name != "sim":
        raise _no_such_server_domain(server)
    grace = SIM_DOMAIN_GRACE if timeout is None else min(SIM_DOMAIN_GRACE, timeout / 2)
    if not grace:
        raise _no_such_server_domain(server, grace)
    return grace


def wait_for_server_domain_sync(evtchn: EventChannel, server: int,
                                timeout: float | None) -> float:
    """:func:`wait_for_server_domain` for blocking code (:class:`vchan.Vchan`)."""
    grace = _server_domain_grace(evtchn, server, timeout)
    if not grace:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < grace:
        time.sleep(0.02)
        if domain_exists(evtchn, server):
            return time.monotonic() - start
    raise _no_such_server_domain(server, grace)


async def wait_for_server_domain(evtchn: EventChannel, server: int,
                                 timeout: float | None) -> float:
    """Make sure the server's domain exists; the seconds spent waiting for it.

    On Xen a missing domain is final: :class:`NoSuchDomainError` at once.
    On the emulator a domain exists while a process of it is connected, so a
    client started right after its server (``server & client``) would race
    the server's start, where on Xen both domains exist before their
    programs run.  There the client gives the server's domain up to
    :data:`SIM_DOMAIN_GRACE` seconds, and at most half its ``timeout``
    (``timeout=0``: none), to appear; then it says what to do.
    """
    grace = _server_domain_grace(evtchn, server, timeout)
    if not grace:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < grace:
        await asyncio.sleep(0.02)
        if domain_exists(evtchn, server):
            return time.monotonic() - start
    raise _no_such_server_domain(server, grace)


async def client_connect(xs: XenStore, watches: WatchRegistry, evtchn: EventChannel, *,
                         own: int, server: int, port: str, read_min: int, write_min: int,
                         timeout: float | None,
                         make_endpoint: Callable[[int, int], Endpoint] | None = None,
                         session: bool = False,
                         why: list[str] | None = None) -> tuple[Endpoint, str]:
    """Connect to ``(server, port)`` from domain ``own``; returns (endpoint, mode).

    Waits (on a watch) for a raw server at the path, or for a listener to
    answer a request, up to ``timeout`` seconds.  ``mode`` is ``"raw"``,
    ``"listener"`` (a ring for this one connection) or ``"session"`` (asked
    for with ``session=True`` and granted: a ring that carries many
    connections, see :mod:`vchan.mux`).  The meeting itself is
    :func:`vchan.handshake.client_rendezvous`, driven here by asyncio.

    A raw server's ring that is taken or closed (see
    :class:`~vchan.endpoint.RingNotOfferedError`) is waited past; ``why``
    (a list) gets the reason, for a caller's own timeout message.

    ``timeout=0`` looks once and waits for nothing: a raw server published
    now, or :class:`TimeoutError` saying why not (a listener's answer is a
    round trip away; no request is written).
    """
    check_ring_size(read_min, "read_min")
    check_ring_size(write_min, "write_min")
    if not domain_exists(evtchn, server):
        raise _no_such_server_domain(server)      # create_connection waited for it
    base = vchan_path(server, own, port)
    nonce = secrets.token_hex(8)
    connect = make_endpoint or (lambda ref, p: Endpoint.connect(server, ref, p, evtchn=evtchn))
    if timeout == 0:
        look = asyncio.Event()
        look.set()                      # the meeting's first look is at once
        answer = await run_async(handshake.client_rendezvous(
            own=own, server=server, port=port, nonce=nonce, read_min=read_min,
            write_min=write_min, session=session, wait=False), xs, changed=look)
        if answer is None:
            raise TimeoutError(handshake.not_ready(server, port, sessions=session))
        return connect(answer.ring_ref, answer.port), answer.mode

    busy = why if why is not None else []   # why the last raw ring was not ours to take

    async def wait() -> tuple[Endpoint, str]:
        async with _pending_slots(xs, (server, port)), watches.watching(base) as changed:
            while True:
                answer = await run_async(handshake.client_rendezvous(
                    own=own, server=server, port=port, nonce=nonce, read_min=read_min,
                    write_min=write_min, session=session), xs, changed=changed,
                    tx_slots=tx_slots(xs))
                try:
                    return connect(answer.ring_ref, answer.port), answer.mode
                except OSError as exc:
                    if answer.mode != "raw":
                        raise
                    # A raw server between clients (its entry names a ring it
                    # has closed) or serving another: wait for its next ring.
                    # Anything else fails once the entry stays as it is.
                    grace = raw_retry_grace(exc)
                    busy[:] = [str(exc)]
                    try:
                        await asyncio.wait_for(changed.wait(), grace)
                    except TimeoutError:
                        raise exc from None

    async def liveness() -> None:
        while True:
            await asyncio.sleep(1.0)
            if not domain_exists(evtchn, server):
                raise NoSuchDomainError(f"vchan server domain {server} went away "
                                        "while we waited for it")

    waiter = asyncio.ensure_future(wait())
    checker = asyncio.ensure_future(liveness())
    handed_over = False
    try:
        done, _ = await asyncio.wait({waiter, checker}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            result = waiter.result()
            handed_over = True
            return result
        if checker in done:
            checker.result()
        raise TimeoutError(f"no vchan server at domain {server} port {port} "
                           f"within {timeout} s" + (f" ({busy[0]})" if busy else ""))
    finally:
        for task in (waiter, checker):
            task.cancel()
        await asyncio.gather(waiter, checker, return_exceptions=True)
        if not handed_over and waiter.done() and not waiter.cancelled() \
                and waiter.exception() is None:
            waiter.result()[0].close()      # connected just as we gave up
        # Connected or not, the request has served its purpose.
        await run_async(handshake.client_cleanup(own=own, server=server, port=port,
                                                 nonce=nonce), xs, tx_slots=tx_slots(xs))


# -- server side -----------------------------------------------------------------------


async def publish(xs: XenStore, path: str, ring_ref: int, evtchn_port: int, own: int,
                  peer: int, *, session: bool = False) -> None:
    """Write ring-ref and event-channel in one transaction (libxenvchan's way)."""
    await run_async(handshake.publish(path, ring_ref, evtchn_port, own, peer, session=session),
                    xs, tx_slots=tx_slots(xs))



def parse_request(value: bytes) -> tuple[int, int, bool]:
    """The ring sizes a client asked for, from the server's point of view.

    Returns (server read_min, server write_min, session wanted): the
    client's write ring is the server's read ring.
    """
    try:
        words = value.split()
        session = words[2:] == [b"session"]
        if len(words) != 2 and not session:
            raise ValueError("unknown words")
        client_read, client_write = (int(v) for v in words[:2])
        check_ring_size(client_read, "read_min")
        check_ring_size(client_write, "write_min")
    except (ValueError, TypeError) as exc:
        raise VchanError(f"malformed vchan connection request {value!r}") from exc
    return client_write, client_read, session


def is_nonce(name: str) -> bool:
    return bool(_NONCE.match(name))


async def refuse(xs: XenStore, path: str, why: str, own: int, peer: int) -> None:
    """Answer a request with ``path/error`` (best effort: the client times out)."""
    with contextlib.suppress(OSError):
        await xs.write(f"{path}/error", why)
        await xs.set_perms(f"{path}/error", [Perm(own, "n"), Perm(peer, "r")])


async def wait_client(hub: _EventHub, endpoint: Any, timeout: float,
                      then: Callable[[], None] | None = None) -> bool:
    """Wait until the client marks itself live (it sends an event then).

    ``then``: the port's handler once connected (else the port is left
    without one).
    """
    changed = asyncio.Event()
    hub.register(endpoint.port, changed.set)
    connected = False
    try:
        async def client_live() -> bool:
            while True:
                live = endpoint.ring.peer_live()
                if live != LIVE_WAITING:
                    return bool(live)
                await changed.wait()
                changed.clear()

        try:
            connected = await asyncio.wait_for(client_live(), timeout)
        except TimeoutError:
            connected = False
        return connected
    finally:
        if connected and then is not None:
            hub.register(endpoint.port, then)
        else:
            hub.release(endpoint.port)
