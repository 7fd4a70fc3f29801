"""The client's hints: which addresses are drop-in servers of this host,
read from XenStore's index and kept fresh by a watch on it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref

from ..errors import VchanError
from .common import FAILURE_TTL, HINT_TTL, INDEX, INDEX_WATCH_IDLE, _is_ip, _is_loopback, _normal

log = logging.getLogger("vchan.dropin")


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
        from ..backend import default_backend_name

        self.emulated = default_backend_name() == "sim"
        if self.emulated:
            from .. import sim

            # No emulator running: nobody to find (and none to start for it).
            if not await asyncio.to_thread(sim.is_running):
                self._readable = False
                return {}
        from ..hub import _loop_state

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
        from ..hub import _loop_state

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
        # Held while it runs, let go when it ends: a done task still holds
        # its loop, and this watch is the value of that loop's entry in a
        # WeakKeyDictionary.
        self._task: asyncio.Task[None] | None = loop.create_task(
            self._run(), name="vchan drop-in index watch")

    async def _run(self) -> None:
        from ..backend import default_backend_name
        from ..hub import _loop_state

        try:
            if default_backend_name() == "sim":
                from .. import sim

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
            self._task = None
            self.done = True
            self.ready = False
            self.ended = time.monotonic()
            # Changes from now on go unseen: what was read is believed for
            # HINT_TTL no longer (a new loop's lookups read the index again).
            self.hints._changed()



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
