"""One libxenvchan connection: its pages, its ring and its event channel.

:class:`Endpoint` does what ``libxenvchan_server_init`` and
``libxenvchan_client_init`` do between XenStore and the ring, exactly as
they do it, so either side can be a C libxenvchan program:

server
    bind an unbound event-channel port for the client's domain; share page 0
    and the ring pages with an unmap notification that clears ``srv_live``
    (byte 21) and signals the port; lay out page 0 (orders, live bytes, the
    first notify request, the grant list: left ring's pages first).  The
    caller publishes :attr:`ring_ref` and :attr:`evtchn_port` in XenStore.

client
    bind to the server's port; map page 0 read-write with an unmap
    notification that clears ``cli_live`` (byte 20); check the orders; map
    the write ring read-write and the read ring read-only; mark itself live,
    ask to hear of writes and send the first event.

Endpoints never block and never touch XenStore; :class:`vchan.Vchan`, the
asyncio transport and the listener build on them.  Device handles for
sharing and mapping are opened once per process and shared.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import threading
from typing import Any

from ._native import ffi
from .addresses import check_ring_size
from .devices import EventChannel, GrantMapper, GrantSharer, Pages
from .ring import (
    LIVE_CONNECTED,
    LIVE_WAITING,
    OFFSET_CLI_LIVE,
    OFFSET_SRV_LIVE,
    PAGE_SIZE,
    Ring,
    client_orders,
    ring_pages,
    server_orders,
)

__all__ = ["DEFAULT_RING_SIZE", "Endpoint", "RingNotOfferedError"]

# 1 MiB each way (the largest libxenvchan ring): 513 granted pages, 2 MiB,
# per connection on the server's side.  Measured with `vchan bench` (64 KiB
# writes, median of 5, emulator, 2 cores; see docs/benchmarks.md): streams
# 1.9 / 2.0 GB/s with 256 KiB rings and 3.0 / 3.3 GB/s with 1 MiB (asyncio /
# uvloop); BufferedProtocol 1.9 / 2.3 and 8.7 / 9.8 GB/s; 64 KiB rings 0.6.
# Every time the ring fills or empties costs a wake-up, and Python pays for
# each.  gntalloc allows a domain 1,024 granted pages by default, so when a
# server runs short, connections that did not ask for a size get smaller
# rings (FALLBACK_RING_SIZES) instead of an error; servers expecting many
# clients should ask for less (read_min / write_min: 64 KiB = 33 pages).
DEFAULT_RING_SIZE = 1 << 20
FALLBACK_RING_SIZES = (256 * 1024, 64 * 1024, 16 * 1024, 4 * 1024, 0)   # 0: in page 0


class _Devices:
    """The process's gntalloc and gntdev handles, opened on first use.

    A handle whose emulator failed (its daemon died or was stopped) is
    replaced by a new one on next use: a restarted daemon serves that.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self._sharer: GrantSharer | None = None
        self._mapper: GrantMapper | None = None

    @property
    def sharer(self) -> GrantSharer:
        with self.lock:
            if self._sharer is None or self._sharer.closed or self._sharer.failed:
                if self._sharer is not None:
                    self._sharer.close()    # its mappings stay valid
                self._sharer = GrantSharer()
            return self._sharer

    @property
    def mapper(self) -> GrantMapper:
        with self.lock:
            if self._mapper is None or self._mapper.closed or self._mapper.failed:
                if self._mapper is not None:
                    self._mapper.close()
                self._mapper = GrantMapper()
            return self._mapper

    def close(self) -> None:
        """Close both handles (mappings made through them stay valid).  In a
        forked child, which got them from its parent, only its copies go."""
        for handle in (self._sharer, self._mapper):
            if handle is not None:
                handle.close()


_devices: _Devices | None = None


@atexit.register
def _close_devices() -> None:
    # The shared handles live as long as the process: closed as it exits,
    # not left to the collector (which warns of unclosed handles).
    if _devices is not None:
        _devices.close()


def devices() -> _Devices:
    """This process's shared device handles (a forked child gets its own)."""
    global _devices
    if _devices is None or _devices.pid != os.getpid():
        if _devices is not None:
            _devices.close()        # the parent's, copied by a fork
        _devices = _Devices()
    return _devices


class RingNotOfferedError(ConnectionRefusedError):
    """The ring a server published is not waiting for a client.

    Its client is connected (a raw server serves one at a time) or it is
    closed (the server is between clients and its XenStore entry is stale).
    A client waits for the server to publish its next ring;
    :attr:`taken` says which case (taken: wait as long as the caller does).
    """

    def __init__(self, message: str, *, taken: bool) -> None:
        super().__init__(errno.ECONNREFUSED, message)
        self.taken = taken


def _check_offered(page0: Any, server: int, ring_ref: int) -> None:
    """Refuse a control page that no server offers now (before writing to it).

    A server lays out page 0 with ``cli_live`` waiting and ``srv_live``
    connected; a client sets ``cli_live`` connected.  libxenvchan's client
    does not look, and on a ring taken by another client it would take it
    over from under that client.
    """
    cli, srv = page0[OFFSET_CLI_LIVE][0], page0[OFFSET_SRV_LIVE][0]
    if cli == LIVE_WAITING and srv == LIVE_CONNECTED:
        return
    if cli == LIVE_CONNECTED and srv == LIVE_CONNECTED:
        raise RingNotOfferedError(f"the ring of vchan server domain {server} (grant "
                                  f"{ring_ref}) serves another client", taken=True)
    raise RingNotOfferedError(f"the ring of vchan server domain {server} (grant {ring_ref}) "
                              f"is closed (cli_live {cli}, srv_live {srv})", taken=False)


def _diagnose(server: int, ring_ref: int) -> None:
    """Raise :class:`RingNotOfferedError` if the ring is not offered (else return)."""
    try:
        page0 = devices().mapper.map(server, [ring_ref], writable=False)
    except OSError:
        return          # its grant is gone: the caller's error says enough
    try:
        _check_offered(page0.buffer(), server, ring_ref)
    finally:
        page0.close()


class Endpoint:
    """One end of a libxenvchan connection.

    ``evtchn`` is the event-channel handle the endpoint's port is bound on;
    the endpoint closes it too when it ``owns_evtchn`` (otherwise it only
    unbinds its port: the asyncio layer shares one handle per loop).
    """

    ring: Ring
    pages: list[Pages]

    def __init__(self, *, is_server: bool, peer_domid: int, evtchn: EventChannel, port: int,
                 owns_evtchn: bool) -> None:
        self.is_server = is_server
        self.peer_domid = peer_domid
        self.evtchn = evtchn
        self.port = port
        self.owns_evtchn = owns_evtchn
        self.pages = []
        self.ring_ref = 0
        self.closed = False
        self.quiet = False      # close without a word to the peer (see keep_quiet)

    # -- set-up ---------------------------------------------------------------

    @classmethod
    def serve(cls, peer_domid: int, *, read_min: int = DEFAULT_RING_SIZE,
              write_min: int = DEFAULT_RING_SIZE,
              evtchn: EventChannel | None = None) -> Endpoint:
        """Set up the server side of a ring for ``peer_domid``.

        ``read_min`` / ``write_min`` are the minimum sizes of the rings this
        server reads and writes (libxenvchan's ``left_min`` / ``right_min``).
        """
        check_ring_size(read_min, "read_min")
        check_ring_size(write_min, "write_min")
        read_order, write_order = server_orders(read_min, write_min)
        own = evtchn is None
        ev = evtchn if evtchn is not None else EventChannel()
        self: Endpoint | None = None
        try:
            port = ev.bind_unbound(peer_domid)
            self = cls(is_server=True, peer_domid=peer_domid, evtchn=ev, port=port,
                       owns_evtchn=own)
            nread, nwrite = ring_pages(read_order), ring_pages(write_order)
            # One allocation for page 0 and both rings: one grant per page as
            # libxenvchan has, but one mapping to keep track of.
            pages = devices().sharer.share(peer_domid, 1 + nread + nwrite,
                                           notify_offset=OFFSET_SRV_LIVE, notify_port=port)
            self.pages.append(pages)
            mem = memoryview(pages.buffer())
            left = mem[PAGE_SIZE:PAGE_SIZE * (1 + nread)] if nread else None
            right = mem[PAGE_SIZE * (1 + nread):] if nwrite else None
            self.ring = Ring.server(mem[:PAGE_SIZE], read_order, write_order, left, right)
            iface = ffi.cast("struct vchan_interface *", pages.pointer)
            for i, ref in enumerate(pages.refs[1:]):
                iface.grants[i] = ref
            self.ring_ref = pages.refs[0]
            return self
        except BaseException:
            _undo(self, ev if own else None)
            raise

    @classmethod
    def serve_shrinking(cls, peer_domid: int, *, read_min: int, write_min: int,
                        evtchn: EventChannel | None = None) -> Endpoint:
        """:meth:`serve`, retried with smaller rings while grants run out."""
        sizes = [(read_min, write_min)] + [
            (min(read_min, s), min(write_min, s)) for s in FALLBACK_RING_SIZES]
        for i, (r, w) in enumerate(sizes):
            try:
                return cls.serve(peer_domid, read_min=r, write_min=w, evtchn=evtchn)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or i == len(sizes) - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def connect(cls, server_domid: int, ring_ref: int, remote_port: int, *,
                evtchn: EventChannel | None = None) -> Endpoint:
        """Connect to a server's ring (``ring-ref`` and ``event-channel``)."""
        own = evtchn is None
        ev = evtchn if evtchn is not None else EventChannel()
        self: Endpoint | None = None
        try:
            try:
                port = ev.bind_interdomain(server_domid, remote_port)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The server's port is bound already, or closed: its ring
                # taken by another client, or closed (say which).
                _diagnose(server_domid, ring_ref)
                raise
            self = cls(is_server=False, peer_domid=server_domid, evtchn=ev, port=port,
                       owns_evtchn=own)
            mapper = devices().mapper
            page0 = mapper.map(server_domid, [ring_ref], notify_offset=OFFSET_CLI_LIVE,
                               notify_port=port)
            self.pages.append(page0)
            _check_offered(page0.buffer(), server_domid, ring_ref)
            read_order, write_order = client_orders(page0.buffer())
            nwrite, nread = ring_pages(write_order), ring_pages(read_order)
            # Copy the grant list out of the shared page before using it.
            iface = ffi.cast("struct vchan_interface *", page0.pointer)
            refs = [int(iface.grants[i]) for i in range(nwrite + nread)]
            wr = rd = None
            if nwrite:      # the left ring: we write it
                wr = mapper.map(server_domid, refs[:nwrite], writable=True)
                self.pages.append(wr)
            if nread:       # the right ring: we only read it
                rd = mapper.map(server_domid, refs[nwrite:], writable=False)
                self.pages.append(rd)
            self.ring = Ring.client(page0.buffer(), rd.buffer() if rd else None,
                                    wr.buffer() if wr else None,
                                    orders=(read_order, write_order))
            self.ring_ref = ring_ref
            self.flush_notify()         # wake the server up
            return self
        except BaseException:
            _undo(self, ev if own else None)
            raise

    # -- events ---------------------------------------------------------------

    def notify(self) -> None:
        """Signal the peer."""
        self.evtchn.notify(self.port)

    def flush_notify(self) -> None:
        """Signal the peer if the ring asked for it."""
        if self.ring.take_notify():
            self.evtchn.notify(self.port)

    # -- teardown -------------------------------------------------------------

    def keep_quiet(self) -> None:
        """Make :meth:`close` leave the shared ring as it is and not notify.

        For when the hypervisor failed (the emulator's daemon died or was
        stopped): each side must learn that from the hypervisor itself, not
        take the other's going for a clean close.
        """
        self.quiet = True

    def close(self) -> None:
        """Close as libxenvchan_close does: live 0, notify, unmap, unbind."""
        if self.closed:
            return
        self.closed = True
        ring = getattr(self, "ring", None)
        try:
            # From a finalizer the pages may be unmapped already (the garbage
            # collector finalizes a cycle in any order): then the ring is
            # gone, and the unmap told the peer.
            if ring is not None and not self.quiet and not any(p.closed for p in self.pages):
                ring.close()
                with contextlib.suppress(OSError):
                    self.notify()
        finally:
            for pages in reversed(self.pages):
                pages.close()
            self.pages = []
            if ring is not None:
                ring.release()
            if self.owns_evtchn:
                self.evtchn.close()
            elif not self.evtchn.closed:
                with contextlib.suppress(OSError):
                    self.evtchn.unbind(self.port)

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        state = "closed" if self.closed else f"port {self.port}"
        return f"<Endpoint {role} peer={self.peer_domid} {state}>"

    def __del__(self) -> Any:
        if not getattr(self, "closed", True):
            import warnings

            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()


def _undo(endpoint: Endpoint | None, own_evtchn: EventChannel | None) -> None:
    """Release what a failed serve()/connect() set up: the endpoint, or else the
    event-channel handle it opened for itself."""
    if endpoint is not None:
        endpoint.close()
    elif own_evtchn is not None:
        own_evtchn.close()
