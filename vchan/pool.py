"""A client's sessions, one per server port, shared by its connections.

The first connection of an event loop to ``(domid, port)`` meets the server
through XenStore and asks for a session (:mod:`vchan.mux`); every later one,
as long as the session lives, is a frame on its ring.  Connections that ask
at the same moment share that one rendezvous: a thousand clients starting
together cost one XenStore conversation, not a thousand.

A session with no connections is closed after ``IDLE_CLOSE`` seconds (its
grants go back to the server's domain); a session the server stopped
(GOAWAY) takes no new connections and closes with its last one.  When the
event loop ends (``asyncio.run`` returning), every session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref

from .endpoint import Endpoint
from .mux import Session

__all__ = ["SessionPool", "session_pool"]

CLEANUP_WAIT = 2.0     # seconds a given-up rendezvous may take to tidy up
IDLE_CLOSE = 5.0


class _Setup:
    """One rendezvous in progress, and the callers waiting for it."""

    def __init__(self, task: asyncio.Task[tuple[Endpoint, str]], why: list[str]) -> None:
        self.task = task
        self.waiters = 0
        self.taken = False          # a one-connection answer went to a caller
        self.why = why              # what it waits for, if a raw server is busy


class SessionPool:
    """The sessions of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the pool is the value of its loop's entry in a
        # WeakKeyDictionary, and a strong reference back would keep every
        # ended loop (and its pool) alive.
        self._loop = weakref.ref(loop)
        self.sessions: dict[tuple[int, str], Session] = {}
        self._setups: dict[tuple[int, str], _Setup] = {}
        # Idle sessions: since when (loop time), and the one timer per session
        # that looks at it (not a timer per connection: a busy session's
        # timer just finds it busy, or idle for less long, and goes again).
        self._idle: dict[Session, float] = {}
        self._timers: dict[Session, asyncio.TimerHandle] = {}
        self._owner: asyncio.Task[None] | None = None
        self.own: int | None = None     # our domain id, once known

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop whose sessions these are."""
        loop = self._loop()
        if loop is None:
            raise RuntimeError("vchan session pool: its event loop is gone")
        return loop

    def __repr__(self) -> str:
        return f"<vchan.SessionPool sessions={len(self.sessions)} setting-up={len(self._setups)}>"

    def take_held(self, domid: int, port: str) -> Session | None:
        """The live session to ``(domid, port)`` this loop holds, if any, now
        busy (a new stream of it is about to open); else None."""
        session = self.sessions.get((domid, port))
        if session is None or not session.can_open():
            return None
        self._busy(session)
        return session

    async def connect(self, domid: int, port: str, timeout: float | None,
                      ) -> Session | tuple[Endpoint, str]:
        """A live session to ``(domid, port)``, or a connection of its own.

        The second form is what a server that grants no sessions (a raw
        libxenvchan server, ``sessions=False``) answers: a ring for this
        one connection and its mode.
        """
        key = (domid, port)
        while True:
            session = self.take_held(domid, port)
            if session is not None:
                return session
            setup = self._setups.get(key)
            if setup is None or setup.taken:
                setup = self._start(key)
            setup.waiters += 1
            try:
                if timeout is None:
                    endpoint, mode = await asyncio.shield(setup.task)
                else:
                    endpoint, mode = await asyncio.wait_for(asyncio.shield(setup.task),
                                                            timeout)
            except TimeoutError:
                if setup.task.done() and not setup.task.cancelled():
                    setup.task.result()     # its own error, not ours
                raise TimeoutError(f"no vchan server at domain {domid} port {port} "
                                   f"within {timeout} s" +
                                   (f" ({setup.why[0]})" if setup.why else "")) from None
            finally:
                setup.waiters -= 1
                if setup.waiters == 0 and not setup.task.done():
                    setup.task.cancel()     # nobody wants it any more
                    # Let it take its request out of XenStore before the
                    # caller hears of the timeout (a caller that then ends
                    # its loop would leave the request behind).
                    await asyncio.wait([setup.task], timeout=CLEANUP_WAIT)
            if mode == "session":
                session = self.sessions.get(key)
                if session is not None and session.can_open():
                    self._busy(session)
                    return session
                continue                    # it ended already: start again
            if not setup.taken:
                setup.taken = True
                return endpoint, mode
            # The server answers one connection per rendezvous: ask for ours.

    def _start(self, key: tuple[int, str]) -> _Setup:
        why: list[str] = []
        task = self.loop.create_task(self._rendezvous(key, why),
                                     name=f"vchan session to {key[0]}:{key[1]}")
        setup = self._setups[key] = _Setup(task, why)
        task.add_done_callback(lambda t: self._setup_done(key, setup, t))
        return setup

    def _setup_done(self, key: tuple[int, str], setup: _Setup,
                    task: asyncio.Task[tuple[Endpoint, str]]) -> None:
        if self._setups.get(key) is setup:
            del self._setups[key]
        if task.cancelled() or task.exception() is not None:
            return
        endpoint, mode = task.result()
        if mode != "session" and setup.waiters == 0 and not setup.taken:
            endpoint.close()                # connected just as everybody gave up

    async def _rendezvous(self, key: tuple[int, str], why: list[str],
                          ) -> tuple[Endpoint, str]:
        from .hub import _loop_state, event_hub
        from .listener import client_connect

        domid, port = key
        hub = event_hub(self.loop)
        hub.hold()
        try:
            async with _loop_state() as state:
                assert state.own is not None
                endpoint, mode = await client_connect(
                    state.xs, state.watches, hub.evtchn, own=state.own, server=domid,
                    port=port, read_min=0, write_min=0, timeout=None, session=True,
                    why=why)
                own = self.own = state.own
            if mode != "session":
                return endpoint, mode
            try:
                session = Session(self.loop, endpoint, hub, is_server=False, own=own,
                                  peer=domid, on_idle=self._on_idle, on_close=self._closed)
            except BaseException:
                endpoint.close()
                raise
            session.key = key       # type: ignore[attr-defined]
            session.start_client()
            self.sessions[key] = session
            self._own()
            self._on_idle(session)  # idle until its first stream
            return endpoint, mode
        finally:
            hub.unhold()

    # -- idle sessions ----------------------------------------------------------------

    def _busy(self, session: Session) -> None:
        self._idle.pop(session, None)

    def _on_idle(self, session: Session) -> None:
        """The session has no streams (or takes no new ones)."""
        key = getattr(session, "key", None)
        if session.draining and key is not None and self.sessions.get(key) is session:
            del self.sessions[key]
        if session.streams or session.closed:
            return
        if session.draining:
            session.close()
            return
        if session in self._idle or self.loop.is_closed():
            return
        self._idle[session] = self.loop.time()
        if session not in self._timers:
            self._timers[session] = self.loop.call_later(IDLE_CLOSE, self._idle_check, session)

    def _idle_check(self, session: Session) -> None:
        del self._timers[session]
        since = self._idle.get(session)
        if since is None or session.streams or session.closed:
            return                          # busy: its next idle moment sets a timer
        left = since + IDLE_CLOSE - self.loop.time()
        if left > 0:
            self._timers[session] = self.loop.call_later(left, self._idle_check, session)
            return
        del self._idle[session]
        session.close()

    def _closed(self, session: Session) -> None:
        self._busy(session)
        timer = self._timers.pop(session, None)
        if timer is not None:
            timer.cancel()
        key = getattr(session, "key", None)
        if key is not None and self.sessions.get(key) is session:
            del self.sessions[key]
        if not self.sessions and self._owner is not None:
            self._owner.cancel()
            self._owner = None

    def close(self) -> None:
        """Close every session (their streams are reset)."""
        for session in list(self.sessions.values()):
            session.close()
        for setup in list(self._setups.values()):
            setup.task.cancel()

    def _own(self) -> None:
        """A task that closes the sessions when the event loop ends."""
        if self._owner is None:
            self._owner = self.loop.create_task(self._hold(), name="vchan sessions")

    async def _hold(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self._owner is asyncio.current_task() or self._owner is None:
                self._owner = None      # (a done task still holds its loop)
                with contextlib.suppress(Exception):
                    self.close()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SessionPool] = \
    weakref.WeakKeyDictionary()


def session_pool(loop: asyncio.AbstractEventLoop) -> SessionPool:
    """The loop's session pool, created on first use."""
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = SessionPool(loop)
    return pool


async def close_sessions() -> None:
    """Close this event loop's idle client sessions now (rather than after
    ``IDLE_CLOSE`` seconds); sessions that carry connections stay."""
    pool = _pools.get(asyncio.get_running_loop())
    if pool is None:
        return
    for session in list(pool.sessions.values()):
        if not session.streams:
            session.close()
