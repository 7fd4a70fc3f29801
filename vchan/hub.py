"""What the vchan connections of one event loop share.

:class:`_EventHub`: one event-channel handle per event loop, watched with
``loop.add_reader``.  Every transport and session of the loop registers its
local port with it; one call takes every fired port and hands each to its
handler.  Where a port has a descriptor of its own (the emulator's
eventfds) the loop watches that instead: a wake-up is then one ``read``,
not ``epoll_wait`` + ``read`` + ``epoll_ctl`` on the handle's set and a
trip through the dispatch loop.  It also watches that the peer domains still exist (a destroyed
domain sends no unmap notification), and on the emulator that its daemon
does (nothing at all would tell a loop whose daemon died or was stopped).

:class:`_LoopState`: one XenStore connection per event loop (with one watch
per path, however many waiters), for the clients' rendezvous and the
servers, closed once nothing has used it for a short while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ._native import ffi, lib
from .devices import EventChannel

log = logging.getLogger("vchan")


# -- the loop's event hub --------------------------------------------------------------


class _PeerWatcher(Protocol):
    """What the hub tells when a peer domain is found gone (a transport, a session)."""

    def _peer_domain_gone(self, domid: int) -> None: ...

    def _hypervisor_failed(self, exc: BaseException) -> None: ...


class _EventHub:
    """The event-channel handle of one event loop, shared by its transports.

    It also watches that the peer domains of its transports still exist: a
    domain destroyed outright (``xl destroy``) runs no kernel to perform its
    unmap notifications, so nothing would ever tell us.  Every
    ``LIVENESS_INTERVAL`` seconds each distinct peer domain is asked for
    (binding an event channel to a missing domain fails with ESRCH).

    A destroyed domain whose pages we still map lingers as a dying zombie
    that the hypervisor answers for like a live one; the toolstack removes
    its XenStore home (``/local/domain/<id>``) at once, though.  So a domain
    that may read other domains' homes (dom0) also looks there, without
    blocking the loop: a missing home is a domain gone.  Where XenStore
    refuses (an unprivileged domU), only the hypervisor's answer counts.

    On the emulator, the daemon that plays the hypervisor is a process that
    can die or be stopped, and then nothing tells anyone: peers' crashes go
    unnoticed, XenStore waits for ever.  So every ``EMULATOR_INTERVAL``
    seconds the hub looks at the daemon (its connection at end of file, its
    process stopped: no request, see ``vk_sim_check``), and a
    :class:`vchan.sim.watch.DaemonWatch` asks it something every second
    without blocking (a daemon that runs but answers nothing).  If it failed,
    the hub fails everything of the loop with the same :class:`vchan.sim.EmulatorError`:
    each transport and session, the loop's XenStore connection (and so
    every connection being set up and every server).  New connections then
    get a new hub, and a new daemon if the old one is gone.
    """

    LIVENESS_INTERVAL = 0.5
    EMULATOR_INTERVAL = 0.2

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.evtchn = EventChannel()
        self.handlers: dict[int, Callable[..., None]] = {}
        self._port_fds: dict[int, int] = {}   # ports the loop watches directly
        self._direct = True                     # until the backend says it cannot
        self.holds = 0
        self.fd = self.evtchn.fileno()
        self.peers: dict[int, set[_PeerWatcher]] = {}
        self._liveness: asyncio.TimerHandle | None = None
        self._homes: asyncio.Task[None] | None = None
        self._homes_readable = True     # False once XenStore refuses us a peer's home
        self._own: int | None = None
        self._dev = self.evtchn._dev
        self._ports = ffi.new("uint32_t[64]")
        self.failed: BaseException | None = None
        self._emulator: asyncio.TimerHandle | None = None
        self._watch: Any = None
        if self.evtchn.backend.name == "sim":
            self._emulator = loop.call_later(self.EMULATOR_INTERVAL, self._check_emulator)
            self._watch = _watch_daemon(self)
        loop.add_reader(self.fd, self._dispatch)

    def watch_peer(self, domid: int, transport: _PeerWatcher) -> None:
        self.peers.setdefault(domid, set()).add(transport)
        if self._liveness is None:
            self._liveness = self.loop.call_later(self.LIVENESS_INTERVAL, self._check_peers)

    def unwatch_peer(self, domid: int, transport: _PeerWatcher) -> None:
        watchers = self.peers.get(domid)
        if watchers is not None:
            watchers.discard(transport)
            if not watchers:
                del self.peers[domid]
        if not self.peers and self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None

    def _check_peers(self) -> None:
        from .listener import domain_exists

        self._liveness = None
        if self.evtchn.closed:
            return
        for domid in list(self.peers):
            try:
                gone = not domain_exists(self.evtchn, domid)
            except OSError:
                continue
            if gone:
                self._domain_gone(domid)
        if (self._homes_readable and self._homes is None
                and any(domid != self._own for domid in self.peers)):
            self._homes = self.loop.create_task(self._check_homes(),
                                                name="vchan peer domain homes")
        if self.peers:
            self._liveness = self.loop.call_later(self.LIVENESS_INTERVAL, self._check_peers)

    def _domain_gone(self, domid: int) -> None:
        for transport in list(self.peers.get(domid, ())):
            transport._peer_domain_gone(domid)

    def _check_emulator(self) -> None:
        self._emulator = None
        if self.evtchn.closed:
            return
        failure = self.evtchn.check()
        if failure is not None:
            self._hypervisor_failed(failure)
        else:
            self._emulator = self.loop.call_later(self.EMULATOR_INTERVAL, self._check_emulator)

    def _hypervisor_failed(self, exc: BaseException) -> None:
        """The emulator's daemon died or stopped: fail everything of the loop."""
        if self.failed is not None:
            return
        self.failed = exc
        log.warning("vchan: %s", exc)
        if _hubs.get(self.loop) is self:
            del _hubs[self.loop]        # new connections get a new hub
        if self._watch is not None:
            self._watch.close()
        for timer in (self._liveness, self._emulator):
            if timer is not None:
                timer.cancel()
        self._liveness = self._emulator = None
        for watchers in list(self.peers.values()):
            for transport in list(watchers):
                transport._hypervisor_failed(exc)
        state = _states.get(self.loop)
        if state is not None and state.daemon_pid in (None, self._dev.server or None):
            state.fail(exc)             # (not one already on a new daemon)
        self._close_if_unused()

    async def _check_homes(self) -> None:
        """Whether each peer domain still has its XenStore home (dom0 may look)."""
        try:
            async with _loop_state() as state:
                self._own = state.own
                for domid in list(self.peers):
                    if domid == state.own or domid not in self.peers:
                        continue
                    try:
                        await state.xs.read(f"/local/domain/{domid}")
                    except FileNotFoundError:
                        if not self.evtchn.closed:
                            self._domain_gone(domid)
                    except PermissionError:
                        self._homes_readable = False    # not privileged: never again
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:    # XenStore unavailable or closing: next round
            if self.loop.get_debug():
                log.debug("vchan: could not look at peer domains' homes: %r", exc)
        finally:
            if self._homes is asyncio.current_task():
                self._homes = None

    def register(self, port: int, handler: Callable[..., None], *,
                 consumes: bool = False) -> None:
        """Call ``handler`` whenever ``port`` fires (replacing its handler).

        With ``consumes``, where the port has a descriptor of its own the
        handler is called as ``handler(fd)`` and reads the event off it
        first itself (``vk_fd_consume``): a call fewer per wake-up; where it
        has not, ``handler()`` as always."""
        self.handlers[port] = handler
        if not self._direct:
            return
        fd = self._port_fds.get(port)
        if fd is None:
            try:
                fd = self.evtchn.port_fd(port)
            except OSError:
                fd = None               # (not bound yet) the dispatch loop serves it
            else:
                if fd is None:          # Xen: the dispatch loop serves every port
                    self._direct = False
            if fd is None:
                return
            self._port_fds[port] = fd
        if consumes:
            self.loop.add_reader(fd, handler, fd)
        else:
            self.loop.add_reader(fd, self._fire, fd, handler)

    def unregister(self, port: int) -> None:
        """``port`` has no handler any more (the hub closes when none has)."""
        self.release(port)
        self._close_if_unused()

    def release(self, port: int) -> None:
        """Forget ``port``'s handler, leaving the hub open."""
        self.handlers.pop(port, None)
        fd = self._port_fds.pop(port, None)
        if fd is not None:
            self._unwatch(port, fd)

    def _unwatch(self, port: int, fd: int) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(fd)
        os.close(fd)
        if not self.evtchn.closed:
            with contextlib.suppress(OSError):  # (unbound already: nothing to put back)
                self.evtchn.port_unwatch(port)

    @staticmethod
    def _fire(fd: int, handler: Callable[[], None]) -> None:
        # Consume first: an event from now on makes the descriptor readable
        # again, and the handler looks at its ring after this.
        lib.vk_fd_consume(fd)
        handler()

    def hold(self) -> None:
        """Keep the hub open while something is being set up on it."""
        self.holds += 1

    def unhold(self) -> None:
        self.holds -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if not self.handlers and self.holds <= 0:
            self.close()

    def close(self) -> None:
        if _hubs.get(self.loop) is self:
            del _hubs[self.loop]
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None
        if self._emulator is not None:
            self._emulator.cancel()
            self._emulator = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._homes is not None:
            self._homes.cancel()
            self._homes = None
        for port, fd in list(self._port_fds.items()):
            self._unwatch(port, fd)
        self._port_fds.clear()
        if not self.evtchn.closed:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
            self.evtchn.close()

    def _dispatch(self) -> None:
        # One call takes every fired port and unmasks it: an event from now
        # on fires again, and each handler looks at its ring after this.
        ports = self._ports
        handlers = self.handlers
        while not self.evtchn.closed:     # a handler may have closed us
            n = lib.vk_take_events(self._dev, ports, 64)
            if n <= 0:
                if n < 0:
                    log.error("vchan event channel failed: %s", os.strerror(-n))
                return
            for i in range(n):
                handler = handlers.get(ports[i])
                if handler is not None:
                    handler()
            if n < 64:
                return


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _EventHub] = \
    weakref.WeakKeyDictionary()


def _watch_daemon(hub: _EventHub) -> Any:
    """A DaemonWatch for the hub's emulator daemon (None if it cannot connect:
    then the daemon is going, which vk_sim_check sees)."""
    from .sim.watch import DaemonWatch

    directory = hub.evtchn.backend.sim_dir
    if directory is None:
        return None
    try:
        return DaemonWatch(hub.loop, directory, hub._hypervisor_failed)
    except OSError:
        return None


def event_hub(loop: asyncio.AbstractEventLoop) -> _EventHub:
    """The loop's event hub, created on first use."""
    hub = _hubs.get(loop)
    if hub is None or hub.evtchn.closed or hub.evtchn.failed is not None:
        hub = _hubs[loop] = _EventHub(loop)
    return hub


# -- the loop's XenStore connection ----------------------------------------------------


class _LoopState:
    """What the vchan connections of one event loop share.

    One XenStore connection (with one watch per path, however many waiters)
    and one event-channel hub.  The XenStore connection is owned by a task,
    so that ``asyncio.run()`` closes it when the loop ends; it is also closed
    after a short idle period with no connection being set up and no server
    (and, where peers' homes are readable, no connection to another domain
    whose home the event hub's liveness probe reads).
    """

    IDLE_CLOSE = 2.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.xs: Any = None
        self.watches: Any = None
        self.own: int | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        self._idle: asyncio.TimerHandle | None = None
        self._owner: asyncio.Task[None] | None = None

    async def acquire(self) -> _LoopState:
        self.users += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            if self._ready is None:
                self._ready = self.loop.create_future()
                self._owner = self.loop.create_task(self._own(), name="vchan xenstore")
            await asyncio.shield(self._ready)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._idle is None and not self.loop.is_closed():
            self._idle = self.loop.call_later(self.IDLE_CLOSE, self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        self._idle = None
        if self.users == 0:
            self._stop.set()

    @property
    def daemon_pid(self) -> int | None:
        """The emulator daemon behind the XenStore connection (None: not known)."""
        return self.xs.daemon_pid if self.xs is not None else None

    def fail(self, exc: BaseException) -> None:
        """The XenStore daemon is gone or stopped: every request and watch
        fails with ``exc``; the next user gets a new connection."""
        if isinstance(exc, ConnectionError) and self.xs is not None:
            self.xs.abort(exc)
        if _states.get(self.loop) is self:
            del _states[self.loop]
        self._stop.set()

    def _xs_lost(self, exc: ConnectionError) -> None:
        # Lost, aborted: nobody gets this connection any more.  If the
        # emulator's daemon died (XenStore hears of it first), the loop's
        # hub fails too, at once: its connections are on the same daemon.
        if _states.get(self.loop) is self:
            del _states[self.loop]
        self._stop.set()
        from .sim import EmulatorError

        hub = _hubs.get(self.loop)
        if isinstance(exc, EmulatorError) and hub is not None and \
                (hub._dev.server or None) in (None, self.daemon_pid):
            hub._hypervisor_failed(exc)

    async def _own(self) -> None:
        from .listener import WatchRegistry
        from .xenstore import XenStore

        assert self._ready is not None
        try:
            self.xs = await XenStore.open()
            self.xs.on_lost = self._xs_lost
            self.watches = WatchRegistry(self.xs)
            self.own = await own_domid_async(self.xs)
        except BaseException as exc:
            _states.pop(self.loop, None)
            if isinstance(exc, asyncio.CancelledError):
                # (Ctrl-C while connecting: an exception stored here, with every
                # waiter cancelled too, was logged as "never retrieved".)
                self._ready.cancel()
            else:
                self._ready.set_exception(exc)
            if self.xs is not None:
                await self.xs.close()
            return
        self._ready.set_result(None)
        try:
            await self._stop.wait()
        finally:
            if _states.get(self.loop) is self:
                del _states[self.loop]
            if not self.xs.closed:      # (a lost one keeps saying why to late users)
                await self.xs.close()


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = \
    weakref.WeakKeyDictionary()


def _state_of(loop: asyncio.AbstractEventLoop) -> _LoopState:
    """The loop's shared state (not acquired), made anew if it is stopping
    (or its XenStore connection was lost)."""
    state = _states.get(loop)
    if state is None or state._stop.is_set() or (state.xs is not None and state.xs.closed):
        state = _states[loop] = _LoopState(loop)
    return state


@contextlib.asynccontextmanager
async def _loop_state() -> AsyncIterator[_LoopState]:
    state = _state_of(asyncio.get_running_loop())
    await state.acquire()
    try:
        yield state
    finally:
        state.release()


async def own_domid_async(xs: Any) -> int:
    """This process's domain id (the emulator's VCHAN_DOMID, or XenStore's domid)."""
    from .backend import get_backend

    backend = get_backend()
    if backend.domid is not None:
        return backend.domid
    return int(await xs.read("domid"))
