"""The emulated hypervisor daemon: grant tables and event channels.

Run as ``python -m vchan.sim.hypervisor --dir DIR`` (``vchan sim start`` and
:func:`vchan.sim.ensure_running` do that).  The wire protocol is in
``kernel/sim_proto.h`` and ``docs/sim-protocol.md``; the client side is
``kernel/sim.c``.

Rules it keeps, those of the gntalloc / gntdev / evtchn design:

* A grant belongs to one granting domain and names one peer domain; only
  that peer may map it, and a read-only grant maps only read-only (the
  mapper gets a read-only file descriptor).
* A share or a mapping lives while any process holds it: the client keeps
  the write end of a "token" pipe per mapping (fork copies it, exec and
  death close it) and this daemon watches the read end.  EOF means the last
  user went away: the unmap notification fires (a byte cleared, an event
  sent) and a share's grants end.  Pages themselves are memfd pages and stay
  alive while anyone maps them, so a grant ended under a peer's mapping does
  not pull the memory away.
* Each domain may have at most ``grant-limit`` pages granted at once
  (ENOSPC beyond); the limit is re-read from ``DIR/grant-limit`` when that
  file changes, which ``vchan sim set grant-limit N`` writes.
* Event channels: a port pair is two eventfds created when the unbound end
  is allocated; processes signal each other's eventfd directly.  Closing a
  handle unbinds its ports; the remote end goes back to "unbound".
* A domain exists while a process of it holds a connection -- to this
  daemon or to its XenStore socket (domain 0 always exists).
* XenStore: the emulated xenstored (:mod:`vchan.sim.xenstored`) runs in this
  daemon's loop, one socket per domain under ``DIR/xenstore/``.
* Who may be which domain: anyone who reaches the sockets, unless
  ``DIR/domains.policy`` binds domains to users (:mod:`vchan.sim.policy`);
  then each connection's uid, as the kernel reports it (SO_PEERCRED),
  decides which domain it may claim, and only the emulator's own user (or
  root) may change or stop it.
* Every client is hostile input.  Each request has exactly the length its
  operation says, and every field is checked before anything is allocated
  (domain ids, counts, flags, notify offsets inside the mapping, ports bound
  in the caller's domain): a bad value is answered with an errno
  (docs/sim-protocol.md, "Validation"), never an exception in the daemon,
  and a request that fails leaves nothing behind.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..addresses import DOMID_FIRST_RESERVED, DOMID_MAX, is_domid
from ..xenstore.wire import XsError
from . import DEFAULT_GRANT_LIMIT
from . import policy as domain_policy
from .policy import Policy, PolicyError, describe_uid, peer_credentials
from .protocol import (
    HELLO,
    KIND_CONTROL,
    KIND_EVTCHN,
    KIND_GNTSHR,
    KIND_GNTTAB,
    REPLY,
    REQUEST,
    SEGMENT,
    VS_CONTROL,
    VS_EVT_BIND_INTERDOMAIN,
    VS_EVT_BIND_UNBOUND,
    VS_EVT_UNBIND,
    VS_GNT_MAP,
    VS_GNT_RELEASE,
    VS_GNT_SHARE,
    VS_HELLO,
    VS_MAX_FDS,
    VS_MAX_MSG,
    VS_VERSION,
)
from .xenstored import XenStored

log = logging.getLogger("vchan.sim")

PAGE = 4096
MAX_PORTS = 4096            # per domain
MAX_GRANT_LIMIT = (1 << 31) - 1     # gntalloc's limit is a C int
FIRST_REF = 8               # Xen reserves the first grant entries

_SHARE = struct.Struct("<IIIii")
_MAP = struct.Struct("<IIii")
_PAIR = struct.Struct("<II")
_ID = struct.Struct("<Q")
_U32 = struct.Struct("<I")
MAX_SHARE_PAGES = (VS_MAX_MSG - 64) // 4   # the refs of one share fit in one reply
MAX_MAP_PAGES = (VS_MAX_MSG - 64) // 8     # the (domid, ref) pairs fit in one request
ACCEPT_RETRY = 0.1          # out of descriptors: accept again after this long


class Fail(Exception):
    """A request fails with this errno."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or os.strerror(err))
        self.errno = err


def _fields(fmt: struct.Struct, body: bytes, what: str) -> tuple[Any, ...]:
    """The fields of a request body that must be exactly ``fmt`` long."""
    if len(body) != fmt.size:
        raise Fail(errno.EINVAL, f"{what}: {len(body)} bytes, expected {fmt.size}")
    return fmt.unpack(body)


def _flag(value: int, what: str) -> bool:
    if value not in (0, 1):
        raise Fail(errno.EINVAL, f"{what} must be 0 or 1, got {value}")
    return bool(value)


def _notify_offset(offset: int, npages: int) -> int:
    """-1 (none) or a byte inside the mapping, as gntalloc's SET_UNMAP_NOTIFY insists."""
    if offset != -1 and not 0 <= offset < npages * PAGE:
        raise Fail(errno.EINVAL, f"notify offset {offset} is outside the {npages} pages")
    return offset


def _closing(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(eq=False)
class MemFile:
    """A memfd holding the pages of one share; closed with its last user."""

    fd: int
    npages: int
    users: int = 0
    ro_fd: int = -1

    def readonly(self) -> int:
        if self.ro_fd < 0:
            # Re-opening through /proc gives a descriptor that can never be
            # mapped writable, not even with mprotect.
            self.ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self.ro_fd

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            os.close(self.fd)
            if self.ro_fd >= 0:
                os.close(self.ro_fd)


@dataclass(eq=False)
class Grant:
    ref: int
    owner: Domain
    peer: int
    writable: bool
    mem: MemFile
    page: int                   # page index in mem


@dataclass(eq=False)
class Mapping:
    """A share (our pages) or a mapping (a peer's), alive while its token is."""

    id: int
    domid: int
    shared: bool
    token: int                  # read end of the token pipe
    pages: list[tuple[MemFile, int]]    # (file, page) per page of the mapping
    grants: list[Grant]
    writable: bool
    notify_offset: int = -1
    notify_tx: int = -1         # a dup of the eventfd to signal, or -1


@dataclass(eq=False)
class Port:
    port: int
    domain: Domain
    remote_domid: int
    rx: int                     # eventfd the owner waits on
    tx: int                     # eventfd the owner signals
    conn: Conn | None
    remote: Port | None = None  # set while bound interdomain

    @property
    def state(self) -> str:
        return "interdomain" if self.remote else "unbound"


@dataclass(eq=False)
class Domain:
    domid: int
    conns: set[Conn] = field(default_factory=set)
    grants: dict[int, Grant] = field(default_factory=dict)
    ports: dict[int, Port] = field(default_factory=dict)
    next_ref: int = FIRST_REF
    # Freed grant references, reused oldest first as Xen's free list does; a
    # deque: a thousand 1 MiB-ring connections free half a million at once.
    free_refs: collections.deque[int] = field(default_factory=collections.deque)
    xs_present: bool = False    # a XenStore connection of the domain is open

    @property
    def alive(self) -> bool:
        return self.domid == 0 or self.xs_present or \
            any(c.kind != KIND_CONTROL for c in self.conns)

    def alloc_ref(self) -> int:
        if self.free_refs:
            return self.free_refs.popleft()
        ref = self.next_ref
        self.next_ref += 1
        return ref

    def alloc_port(self) -> int:
        for port in range(1, MAX_PORTS):
            if port not in self.ports:
                return port
        raise Fail(errno.ENOSPC, "no free event-channel port")


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    domid: int = -1
    kind: int = -1
    pid: int = 0
    uid: int = -1               # of the connecting process, as the kernel says


class Hypervisor:
    """The daemon's state and request handlers."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.domains: dict[int, Domain] = {}
        self.maps: dict[int, Mapping] = {}
        self.conns: set[Conn] = set()
        self.ids = itertools.count(1)
        self.limit_file = directory / "grant-limit"
        self.limit_mtime: float | None = None
        self.limit = DEFAULT_GRANT_LIMIT
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.listener: socket.socket | None = None
        self.xenstored: XenStored | None = None
        self.policy: Policy | None = None
        self.owner = os.getuid()

    # -- tables -----------------------------------------------------------

    def domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            dom = self.domains[domid] = Domain(domid)
        return dom

    def alive(self, domid: int) -> Domain | None:
        dom = self.domains.get(domid)
        if domid == 0:
            return self.domain(0)
        return dom if dom is not None and dom.alive else None

    def granted_pages(self, dom: Domain) -> int:
        return len(dom.grants)

    def grant_limit(self) -> int:
        try:
            mtime = self.limit_file.stat().st_mtime
        except FileNotFoundError:
            self.limit_mtime = None
            self.limit = DEFAULT_GRANT_LIMIT
            return self.limit
        if mtime != self.limit_mtime:
            try:
                self.limit = max(0, int(self.limit_file.read_text().strip()))
                self.limit_mtime = mtime
            except ValueError:
                log.warning("ignoring malformed %s", self.limit_file)
        return self.limit

    def _gc_domain(self, dom: Domain) -> None:
        if dom.domid != 0 and not (dom.conns or dom.grants or dom.ports or dom.xs_present):
            self.domains.pop(dom.domid, None)

    # -- XenStore coupling (vchan/sim/xenstored.py) -----------------------

    def _alive_changed(self, dom: Domain, was_alive: bool) -> None:
        """Tell xenstored when a domain appears or goes (@introduceDomain etc.)."""
        if self.xenstored is None or dom.alive == was_alive:
            return
        try:
            if dom.alive:
                self.xenstored.introduce(dom.domid)
            else:
                self.xenstored.release(dom.domid)
        except Exception:       # XenStore trouble must not fail a device request
            log.exception("xenstore: domain %d %s", dom.domid,
                          "introduction failed" if dom.alive else "release failed")

    def xenstore_presence(self, domid: int, present: bool) -> None:
        """xenstored: the domain's first XenStore connection opened / last closed."""
        dom = self.domain(domid)
        was_alive = dom.alive
        dom.xs_present = present
        self._alive_changed(dom, was_alive)
        self._gc_domain(dom)

    # -- connections ------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None and self.loop is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE, ENFILE, ENOBUFS): the listener
                # stays readable, so stop watching it for a moment rather
                # than spin; connections wait in the backlog meanwhile.
                log.warning("cannot accept a connection: %s; retrying in %.1f s",
                            exc.strerror, ACCEPT_RETRY)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            sock.setblocking(False)
            conn = Conn(sock)
            with contextlib.suppress(OSError):
                conn.pid, conn.uid, _gid = peer_credentials(sock)
            self.conns.add(conn)
            self.loop.add_reader(sock.fileno(), self.on_message, conn)

    def _resume_accepting(self) -> None:
        assert self.listener is not None and self.loop is not None
        if self.listener.fileno() >= 0 and self.stopping is not None \
                and not self.stopping.is_set():
            self.loop.add_reader(self.listener.fileno(), self.accept)

    def on_message(self, conn: Conn) -> None:
        try:
            data, anc, _flags, _ = conn.sock.recvmsg(
                VS_MAX_MSG, socket.CMSG_SPACE(VS_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(arr)
        for fd in fds:          # no request carries descriptors
            os.close(fd)
        if not data:
            self.drop(conn)
            return
        reply_fds: list[int] = []
        close_after: list[int] = []
        try:
            if len(data) < REQUEST.size:
                raise Fail(errno.EPROTO, "short request")
            op, length = REQUEST.unpack_from(data)
            body = data[REQUEST.size:]
            if length != len(body):
                raise Fail(errno.EPROTO, "bad length")
            if op != VS_HELLO and conn.kind < 0:
                raise Fail(errno.EPROTO, "HELLO first")
            payload = self.dispatch(conn, op, body, reply_fds, close_after)
            status = 0
        except Exception as exc:
            why = b""
            if isinstance(exc, Fail):
                status = -exc.errno
                log.debug("domain %d: request failed: %s", conn.domid, exc)
                if data[:4] == struct.pack("<I", VS_CONTROL):
                    why = str(exc).encode()[:4096]      # control answers say why
            elif isinstance(exc, struct.error | ValueError | RecursionError):
                status = -errno.EINVAL      # a malformed request
            elif isinstance(exc, OSError) and exc.errno:
                # The daemon itself ran short (EMFILE, ENOMEM...): say so.
                log.warning("domain %d: request failed: %s", conn.domid, exc)
                status = -exc.errno
            else:
                log.exception("request failed")
                status = -errno.EIO
            payload = why
            for fd in close_after:
                os.close(fd)
            reply_fds, close_after = [], []
        message = REPLY.pack(status, len(payload)) + payload
        try:
            if reply_fds:
                socket.send_fds(conn.sock, [message], reply_fds)
            else:
                conn.sock.send(message)
        except OSError:
            self.drop(conn)
        finally:
            for fd in close_after:
                os.close(fd)

    def drop(self, conn: Conn) -> None:
        """A connection closed: the process let go of its handle (or died)."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        assert self.loop is not None
        self.loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        if conn.domid < 0:
            return
        dom = self.domain(conn.domid)
        was_alive = dom.alive
        dom.conns.discard(conn)
        for port in [p for p in dom.ports.values() if p.conn is conn]:
            self.unbind(port)
        self._alive_changed(dom, was_alive)
        self._gc_domain(dom)

    # -- dispatch ---------------------------------------------------------

    def dispatch(self, conn: Conn, op: int, body: bytes, fds: list[int],
                 close_after: list[int]) -> bytes:
        if op == VS_HELLO:
            if conn.kind >= 0:
                # One domain and kind per connection, for its whole life.
                raise Fail(errno.EISCONN, "HELLO was already sent on this connection")
            version, domid, kind, pid = _fields(HELLO, body, "HELLO")
            if version != VS_VERSION:
                raise Fail(errno.EPROTONOSUPPORT, f"protocol version {version}")
            if domid >= DOMID_FIRST_RESERVED or kind > KIND_EVTCHN:
                raise Fail(errno.EINVAL)
            if kind != KIND_CONTROL:
                self.check_claim(conn, domid)
            conn.domid, conn.kind = domid, kind
            conn.pid = conn.pid or pid      # the kernel's word over the client's
            if kind != KIND_CONTROL:
                dom = self.domain(domid)
                was_alive = dom.alive
                dom.conns.add(conn)
                self._alive_changed(dom, was_alive)
            return struct.pack("<I", VS_VERSION)
        if op == VS_CONTROL:
            command = json.loads(body or b"{}")
            if not isinstance(command, dict):
                raise Fail(errno.EINVAL, "a control request is a JSON object")
            return json.dumps(self.control(command, conn)).encode()
        handler = {
            VS_GNT_SHARE: (KIND_GNTSHR, self.share),
            VS_GNT_MAP: (KIND_GNTTAB, self.map),
            VS_GNT_RELEASE: (None, self.release),
            VS_EVT_BIND_UNBOUND: (KIND_EVTCHN, self.bind_unbound),
            VS_EVT_BIND_INTERDOMAIN: (KIND_EVTCHN, self.bind_interdomain),
            VS_EVT_UNBIND: (KIND_EVTCHN, self.unbind_request),
        }.get(op)
        if handler is None:
            raise Fail(errno.ENOSYS, f"unknown op {op}")
        kind, fn = handler
        if kind is not None and conn.kind != kind:
            raise Fail(errno.EINVAL, "operation not valid on this handle")
        return fn(conn, body, fds, close_after)

    # -- grants -----------------------------------------------------------

    def _capture_port(self, dom: Domain, port: int) -> int:
        if port == -1:
            return -1
        p = dom.ports.get(port)
        if p is None:
            raise Fail(errno.EINVAL, f"port {port} is not bound")
        return os.dup(p.tx)

    def _new_token(self, close_after: list[int]) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        close_after.append(w)
        return r, w

    def share(self, conn: Conn, body: bytes, fds: list[int], close_after: list[int]) -> bytes:
        peer, count, writable, notify_offset, notify_port = _fields(_SHARE, body, "GNT_SHARE")
        if peer >= DOMID_FIRST_RESERVED:
            raise Fail(errno.EINVAL, f"no such peer domain id {peer}")
        if not 0 < count <= MAX_SHARE_PAGES:
            raise Fail(errno.EINVAL, f"cannot share {count} pages (1..{MAX_SHARE_PAGES})")
        writable = _flag(writable, "writable")
        _notify_offset(notify_offset, count)
        dom = self.domain(conn.domid)
        limit = self.grant_limit()
        if self.granted_pages(dom) + count > limit:
            raise Fail(errno.ENOSPC, f"grant limit {limit} reached")
        notify_tx = self._capture_port(dom, notify_port)
        try:
            memfd = os.memfd_create(f"vchan-d{dom.domid}", os.MFD_CLOEXEC)
        except BaseException:
            _closing([notify_tx] if notify_tx >= 0 else [])
            raise
        try:
            os.ftruncate(memfd, count * PAGE)
        except BaseException:
            _closing([memfd, notify_tx] if notify_tx >= 0 else [memfd])
            raise
        mem = MemFile(memfd, count, users=1)
        try:
            token, w = self._new_token(close_after)
        except BaseException:
            _closing([memfd, notify_tx] if notify_tx >= 0 else [memfd])
            raise
        grants = [Grant(dom.alloc_ref(), dom, peer, writable, mem, i) for i in range(count)]
        for g in grants:
            dom.grants[g.ref] = g
        m = Mapping(next(self.ids), dom.domid, True, token, [(mem, i) for i in range(count)],
                    grants, True, notify_offset, notify_tx)
        self._track(m)
        fds.extend([memfd, w])
        return struct.pack(f"<Q{count}I", m.id, *(g.ref for g in grants))

    def map(self, conn: Conn, body: bytes, fds: list[int], close_after: list[int]) -> bytes:
        if len(body) < _MAP.size:
            raise Fail(errno.EINVAL, f"GNT_MAP: {len(body)} bytes")
        count, writable, notify_offset, notify_port = _MAP.unpack_from(body)
        if not 0 < count <= MAX_MAP_PAGES or len(body) != _MAP.size + _PAIR.size * count:
            raise Fail(errno.EINVAL, f"GNT_MAP of {count} pages in {len(body)} bytes")
        writable = _flag(writable, "writable")
        _notify_offset(notify_offset, count)
        pairs = struct.unpack_from(f"<{2 * count}I", body, _MAP.size)
        dom = self.domain(conn.domid)
        grants: list[Grant] = []
        for i in range(count):
            domid, ref = pairs[2 * i], pairs[2 * i + 1]
            owner = self.domains.get(domid)
            g = owner.grants.get(ref) if owner else None
            if g is None:
                raise Fail(errno.EINVAL, f"no grant {ref} from domain {domid}")
            if g.peer != dom.domid:
                raise Fail(errno.EPERM, f"grant {ref} of domain {domid} is not for us")
            if writable and not g.writable:
                raise Fail(errno.EPERM, f"grant {ref} of domain {domid} is read-only")
            grants.append(g)
        if notify_offset >= 0 and not writable:
            raise Fail(errno.EINVAL, "cannot clear a byte of a read-only mapping")
        # Coalesce runs of pages that are consecutive in one file.
        segs: list[tuple[int, int, int, int]] = []     # first, npages, fd index, page
        files: list[int] = []
        for i, g in enumerate(grants):
            fd = g.mem.fd if writable else g.mem.readonly()
            if fd not in files:
                files.append(fd)
            idx = 1 + files.index(fd)                   # fds[0] is the token
            if segs and segs[-1][2] == idx and segs[-1][3] + segs[-1][1] == g.page:
                first, n, _, page = segs[-1]
                segs[-1] = (first, n + 1, idx, page)
            else:
                segs.append((i, 1, idx, g.page))
        if 1 + len(files) > VS_MAX_FDS or len(segs) >= VS_MAX_FDS:
            raise Fail(errno.E2BIG, "mapping spans too many files")
        notify_tx = self._capture_port(dom, notify_port)
        try:
            token, w = self._new_token(close_after)
        except BaseException:
            _closing([notify_tx] if notify_tx >= 0 else [])
            raise
        fds.append(w)
        fds.extend(files)
        for g in grants:
            g.mem.users += 1
        m = Mapping(next(self.ids), dom.domid, False, token, [(g.mem, g.page) for g in grants],
                    grants, bool(writable), notify_offset, notify_tx)
        self._track(m)
        out = struct.pack("<QII", m.id, len(segs), 0)
        for first, n, idx, page in segs:
            out += SEGMENT.pack(first, n, idx, 0, page * PAGE)
        return out

    def _track(self, m: Mapping) -> None:
        assert self.loop is not None
        self.maps[m.id] = m
        self.loop.add_reader(m.token, self._token_ready, m.id)

    def _token_ready(self, map_id: int) -> None:
        m = self.maps.get(map_id)
        if m is None:
            return
        try:
            data = os.read(m.token, 64)
        except BlockingIOError:
            return
        if not data:            # EOF: every holder is gone
            self.finish(m)

    def release(self, conn: Conn, body: bytes, fds: list[int], close_after: list[int]) -> bytes:
        (map_id,) = _fields(_ID, body, "GNT_RELEASE")
        m = self.maps.get(map_id)
        if m is None or m.domid != conn.domid:
            return struct.pack("<I", 0)
        # The caller closed its token before asking: if it held the last
        # copy, EOF is already visible and we settle it now.  (The token is
        # non-blocking: no select(), which cannot take descriptors >= 1024.)
        try:
            eof = not os.read(m.token, 64)
        except BlockingIOError:
            eof = False
        if eof:
            self.finish(m)
            return struct.pack("<I", 1)
        return struct.pack("<I", 0)

    def finish(self, m: Mapping) -> None:
        """The last user of a share or mapping went away."""
        assert self.loop is not None
        self.maps.pop(m.id, None)
        self.loop.remove_reader(m.token)
        os.close(m.token)
        if m.notify_offset >= 0:
            mem, page = m.pages[m.notify_offset // PAGE]
            # As the kernel does for a dead process: clear the byte...
            with contextlib.suppress(OSError):
                os.pwrite(mem.fd, b"\0", page * PAGE + m.notify_offset % PAGE)
        if m.notify_tx >= 0:
            # ... and signal the event channel named at set-up.
            with contextlib.suppress(OSError):
                os.eventfd_write(m.notify_tx, 1)
            os.close(m.notify_tx)
        if m.shared:
            for g in m.grants:
                owner = g.owner
                if owner.grants.get(g.ref) is g:
                    del owner.grants[g.ref]
                    owner.free_refs.append(g.ref)
            for dom in {g.owner for g in m.grants}:
                self._gc_domain(dom)
        for mem, _ in m.pages:
            if not m.shared:
                mem.release()
        if m.shared and m.pages:
            m.pages[0][0].release()

    # -- event channels ---------------------------------------------------

    def bind_unbound(self, conn: Conn, body: bytes, fds: list[int],
                     close_after: list[int]) -> bytes:
        (remote,) = _fields(_U32, body, "EVT_BIND_UNBOUND")
        if remote == DOMID_FIRST_RESERVED:      # DOMID_SELF
            remote = conn.domid
        if self.alive(remote) is None:
            raise Fail(errno.ESRCH, f"no domain {remote}")
        dom = self.domain(conn.domid)
        port = dom.alloc_port()
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        rx = os.eventfd(0, flags)
        try:
            tx = os.eventfd(0, flags)
        except BaseException:
            os.close(rx)
            raise
        p = Port(port, dom, remote, rx, tx, conn)
        dom.ports[port] = p
        fds.extend([p.rx, p.tx])
        return struct.pack("<I", port)

    def bind_interdomain(self, conn: Conn, body: bytes, fds: list[int],
                         close_after: list[int]) -> bytes:
        remote_domid, remote_port = _fields(_PAIR, body, "EVT_BIND_INTERDOMAIN")
        if remote_domid == DOMID_FIRST_RESERVED:    # DOMID_SELF
            remote_domid = conn.domid
        rdom = self.alive(remote_domid)
        if rdom is None:
            raise Fail(errno.ESRCH, f"no domain {remote_domid}")
        rp = rdom.ports.get(remote_port)
        if rp is None or rp.remote is not None or rp.remote_domid != conn.domid:
            raise Fail(errno.EINVAL, f"port {remote_port} of domain {remote_domid} "
                                     "is not waiting for us")
        dom = self.domain(conn.domid)
        port = dom.alloc_port()
        # Our end waits on what the remote signals, and signals what it waits on.
        rx = os.dup(rp.tx)
        try:
            tx = os.dup(rp.rx)
        except BaseException:
            os.close(rx)
            raise
        p = Port(port, dom, remote_domid, rx, tx, conn, remote=rp)
        rp.remote = p
        dom.ports[port] = p
        fds.extend([p.rx, p.tx])
        return struct.pack("<I", port)

    def unbind_request(self, conn: Conn, body: bytes, fds: list[int],
                       close_after: list[int]) -> bytes:
        (port,) = _fields(_U32, body, "EVT_UNBIND")
        p = self.domain(conn.domid).ports.get(port)
        if p is None:
            raise Fail(errno.ENOTCONN, f"port {port} is not bound")
        self.unbind(p)
        return b""

    def unbind(self, p: Port) -> None:
        p.domain.ports.pop(p.port, None)
        if p.remote is not None:
            # The other end reverts to unbound, still naming our domain.
            p.remote.remote = None
            p.remote.remote_domid = p.domain.domid
        os.close(p.rx)
        os.close(p.tx)
        self._gc_domain(p.domain)

    # -- who may be which domain (vchan/sim/policy.py) ----------------------

    def why_not(self, uid: int, domid: int) -> str | None:
        """None if a process of ``uid`` may claim ``domid``; else why not."""
        if self.policy is None:
            return None
        return self.policy.why_not(domid, uid)

    def check_claim(self, conn: Conn, domid: int) -> None:
        why = self.why_not(conn.uid, domid)
        if why is not None:
            log.warning("refused: pid %d claimed %s", conn.pid, why)
            raise Fail(errno.EACCES, why)

    def _check_admin(self, conn: Conn | None, what: str) -> None:
        if conn is None or self.policy is None or conn.uid in (self.owner, 0):
            return
        raise Fail(errno.EPERM, f"{what!r} is for {describe_uid(self.owner)}, who runs the "
                                f"emulator, and root; this process runs as "
                                f"{describe_uid(conn.uid)}")

    # -- control ----------------------------------------------------------

    def control(self, cmd: dict[str, Any], conn: Conn | None = None) -> dict[str, Any]:
        """Run a control command (``conn``: who asks; None for the daemon itself)."""
        what = cmd.get("cmd")
        if what in ("set", "stop"):
            self._check_admin(conn, str(what))
        if what == "may-claim":
            domid = cmd.get("domid")
            if not is_domid(domid):
                raise Fail(errno.EINVAL, f"may-claim needs a domid in 0..{DOMID_MAX}")
            uid = conn.uid if conn is not None else self.owner
            why = self.why_not(uid, domid)
            return {"domid": domid, "uid": uid, "allowed": why is None, "why": why}
        if what == "status":
            return self.status()
        if what == "domains":
            # What xc_domain_getinfo enumerates: the domains that exist now.
            return {"domains": sorted({0} | {d.domid for d in self.domains.values()
                                             if d.alive})}
        if what == "set":
            key, value = cmd.get("key"), cmd.get("value")
            if key == "grant-limit":
                if not isinstance(value, int) or isinstance(value, bool) or \
                        not 0 <= value <= MAX_GRANT_LIMIT:
                    raise Fail(errno.EINVAL, f"grant-limit must be a number of pages in "
                                             f"0..{MAX_GRANT_LIMIT}, got {value!r}")
                tmp = self.limit_file.with_suffix(".tmp")
                tmp.write_text(f"{value}\n")
                tmp.replace(self.limit_file)
                return {"grant-limit": self.grant_limit()}
            if isinstance(key, str) and key.startswith("xenstore-quota-") and self.xenstored:
                try:
                    return {key: self.xenstored.set_quota(key[len("xenstore-quota-"):], value)}
                except XsError as exc:
                    raise Fail(errno.EINVAL, str(exc)) from None
            raise Fail(errno.EINVAL, f"unknown setting {key!r}")
        if what == "xenstore-socket":
            domid = cmd.get("domid")
            if not is_domid(domid) or self.xenstored is None:
                raise Fail(errno.EINVAL, f"xenstore-socket needs a domid in 0..{DOMID_MAX}")
            if conn is not None:
                self.check_claim(conn, domid)
            return {"domid": domid, "path": str(self.xenstored.socket_for(domid))}
        if what == "stop":
            assert self.loop is not None and self.stopping is not None
            self.loop.call_soon(self.stopping.set)     # after this reply is sent
            return {"pid": os.getpid()}
        raise Fail(errno.EINVAL, f"unknown command {what!r}")

    def status(self) -> dict[str, Any]:
        domains = []
        for domid in sorted(self.domains):
            dom = self.domains[domid]
            domains.append({
                "domid": domid,
                "alive": dom.alive,
                "processes": sorted({c.pid for c in dom.conns if c.kind != KIND_CONTROL}),
                "handles": sum(1 for c in dom.conns if c.kind != KIND_CONTROL),
                "granted_pages": len(dom.grants),
                "ports": {str(p.port): {"state": p.state, "remote_domid": p.remote_domid,
                                        "remote_port": p.remote.port if p.remote else None}
                          for p in dom.ports.values()},
                "shares": sum(1 for m in self.maps.values() if m.domid == domid and m.shared),
                "mappings": sum(1 for m in self.maps.values()
                                if m.domid == domid and not m.shared),
            })
        return {
            "pid": os.getpid(),
            "dir": str(self.dir),
            "grant_limit": self.grant_limit(),
            "domains": domains,
            "connections": len(self.conns),
            "maps": len(self.maps),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "xenstore": self.xenstored.status() if self.xenstored else None,
            "policy": None if self.policy is None else {
                "file": self.policy.source, "rules": self.policy.describe()},
        }

    # -- main -------------------------------------------------------------

    def _open_to_others(self) -> bool:
        """Whether the policy gives domains to users other than ours (then
        the sockets must let them in, and the policy decides per connection)."""
        return self.policy is not None and bool(self.policy.uids() - {self.owner})

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.stopped_by: int | None = None      # the signal that stopped us
        path = self.dir / "hypervisor.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        shared = self._open_to_others()
        os.chmod(path, 0o666 if shared else 0o600)
        if shared:
            os.chmod(self.dir, 0o711)       # reachable, not listable
        listener.listen(512)
        listener.setblocking(False)
        self.listener = listener
        self.loop.add_reader(listener.fileno(), self.accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop_on, sig)
        self.xenstored = XenStored(self.dir, self.xenstore_presence,
                                   admit=self.why_not if self.policy else None,
                                   shared=shared)
        await self.xenstored.start()
        log.info("emulator %d serving on %s", os.getpid(), path)
        try:
            await self.stopping.wait()
        finally:
            await self.xenstored.stop()
            self.loop.remove_reader(listener.fileno())
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            listener.close()
            why = ": interrupted" if self.stopped_by == signal.SIGINT else ""
            log.info("emulator %d stopped%s", os.getpid(), why)

    def _stop_on(self, sig: int) -> None:
        self.stopped_by = sig
        if self.stopping is not None:
            self.stopping.set()


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground."""
    from . import state_dir

    parser = argparse.ArgumentParser(prog="python -m vchan.sim.hypervisor")
    parser.add_argument("--dir", type=Path, default=None, help="state directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--daemonize", action="store_true",
                        help="detach: fork, start a new session, and return at once")
    args = parser.parse_args(argv)
    directory: Path = args.dir or state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        policy = domain_policy.load(directory)
    except PolicyError as exc:
        print(f"vchan emulator: {exc}", file=sys.stderr)
        return 1
    if args.daemonize:
        if os.fork():
            os._exit(0)
        os.setsid()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lock = open(directory / "daemon.lock", "w")  # noqa: SIM115 -- held for our lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"vchan emulator: another daemon already runs in {directory}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    hypervisor = Hypervisor(directory)
    hypervisor.policy = policy
    if policy is not None:
        log.info("domains bound to users by %s: %s", policy.source,
                 "; ".join(policy.describe()) or "no domain for anyone")
    asyncio.run(hypervisor.serve())
    # Ctrl-C in the foreground: the status a shell gives a process SIGINT ended.
    return 130 if hypervisor.stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main())
