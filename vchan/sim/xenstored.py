"""The emulated hypervisor's xenstored: its sockets, connections, watches and domains.

It runs inside the emulator daemon's event loop (:mod:`vchan.sim.hypervisor`
starts and stops it).  Every emulated domain has its own Unix socket,
``<state dir>/xenstore/<domid>.sock``: a connection belongs to the domain of
the socket it came in on, and domain 0's socket is the privileged one.  The
client side is :mod:`vchan.xenstore`; Debian's ``xenstore-*`` tools work
unmodified with ``XENSTORED_PATH`` set to a socket.  docs/xenstore.md has
the whole contract and the differences from the real xenstored.

RULES (those of xenstored, tools/xenstored in Xen)
===================================================

The store's rules (permissions, transactions, quotas) are in
:mod:`vchan.sim.xenstore_model`; the requests, parsed and answered with
:mod:`vchan.xenstore.wire` (the clients' own codec), in
:mod:`vchan.sim.xenstored_ops`.

Watches.  A change to a node fires every watch on it or on an ancestor
(writes, mkdir of a new node, set_perms); removal fires, for each removed
node deepest first, the watches on that exact node -- and for the removed
subtree's root also the watches above it.  A watch fires once at once when
set.  A domain is sent an event only if it may read the node (before the
change, for removals and permission changes) or its parent.
``@introduceDomain`` and ``@releaseDomain`` fire when an emulated domain
comes and goes (``@releaseDomain/<domid>`` for one domain); any domain may
watch ``@releaseDomain``, ``@introduceDomain`` is for domain 0 unless its
permissions say otherwise.

Domains.  A domain exists while a process of it holds a hypervisor handle
or a XenStore connection.  When it appears, ``/local/domain/<id>`` is made
(as libxl would: owned by domain 0, readable by the domain, with ``domid``,
``name`` and a ``data`` directory the domain owns) and ``@introduceDomain``
fires.  When it goes, ``/local/domain/<id>`` and every node the domain owns
elsewhere are removed (as xenstored does without ``--keep-orphans``), then
``@releaseDomain`` fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..addresses import DOMID_FIRST_RESERVED
from ..xenstore import wire
from ..xenstore.wire import Op, Perm, XsError
from .xenstore_model import (
    DEPTH,
    EXACT,
    NODEPTH,
    READ,
    SUBTREE,
    Node,
    Store,
    Tx,
    WatchEntry,
    is_child,
    join,
    parent_of,
    perm_for,
)
from .xenstored_ops import HANDLERS, NOTID, PRIV, Request, op_name

log = logging.getLogger("vchan.sim.xenstored")

#: A client that does not read its replies and events is cut off beyond this.
MAX_OUTPUT = 16 << 20


# -- connections -------------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One client connection, belonging to one domain."""

    def __init__(self, xsd: XenStored, domid: int) -> None:
        self.xsd = xsd
        self.domid = domid
        self.transport: asyncio.Transport | None = None
        self.framer = wire.Framer()
        self.watches: list[WatchEntry] = []
        self.txs: dict[int, Tx] = {}
        self.next_tx = 1

    def __repr__(self) -> str:
        return f"<xenstored Conn dom{self.domid} watches={len(self.watches)} tx={len(self.txs)}>"

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.xsd.conn_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.xsd.conn_lost(self)

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        while True:
            try:
                msg = self.framer.next_message()
            except wire.ProtocolError as exc:
                # xenstored kills such a connection at once (docs/misc/xenstore.txt).
                log.warning("domain %d sent a %s: dropping it", self.domid, exc)
                self.close()
                return
            if msg is None:
                return
            self.xsd.handle(self, *msg)
            if self.transport is None or self.transport.is_closing():
                return

    def send(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(wire.pack(mtype, req_id, tx_id, payload))
        if transport.get_write_buffer_size() > MAX_OUTPUT:
            log.warning("domain %d does not read what xenstored sends: dropping it", self.domid)
            self.close()

    def send_event(self, path: str, token: str) -> None:
        payload = wire.event_payload(path, token)
        if payload is not None:
            self.send(Op.WATCH_EVENT, 0, 0, payload)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


# -- the daemon --------------------------------------------------------------------


class XenStored(Store):
    """The store, the watches and the per-domain sockets."""

    def __init__(self, directory: Path,
                 presence: Callable[[int, bool], None] | None = None, *,
                 admit: Callable[[int, int], str | None] | None = None,
                 shared: bool = False) -> None:
        """``presence(domid, present)`` is called when a domain's first XenStore
        connection opens and its last closes; without it, that alone decides
        whether the domain exists.

        ``admit(uid, domid)`` says why a process of ``uid`` (SO_PEERCRED) may
        not be domain ``domid`` -- its connection to that domain's socket is
        then closed at once -- or None to let it in.  ``shared``: the
        sockets are for every user (0666, directory 0711); ``admit`` decides.
        """
        self.dir = directory / "xenstore"
        self._admit = admit
        self._shared = shared
        self.conns: dict[Conn, None] = {}       # ordered: events go out in connection order
        self.per_domain: Counter[int] = Counter()
        # Watches and open transactions per domain, over all its connections:
        # the quotas are per domain, as in xenstored (struct domain's acc[]).
        self.watch_count: Counter[int] = Counter()
        self.tx_count: Counter[int] = Counter()
        self.introduced: set[int] = set()
        self.requests: dict[int, int] = {}     # requests handled, per domain
        self._presence = presence or self._own_presence
        self._listeners: dict[int, socket.socket] = {}
        self._servers: dict[int, asyncio.AbstractServer] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        super().__init__()

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Serve domain 0's socket (others are made as domains appear)."""
        self._loop = asyncio.get_running_loop()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o711 if self._shared else 0o700)
        self.introduce(0)

    async def stop(self) -> None:
        """Close every socket and connection."""
        self._stopping = True
        for task in list(self._starting):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        for conn in list(self.conns):
            conn.close()
        for server in self._servers.values():
            server.close()
        for domid, sock in self._listeners.items():
            if domid not in self._servers:
                sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path(domid).unlink()
        await asyncio.sleep(0)          # let the transports call connection_lost
        self._servers.clear()
        self._listeners.clear()

    def socket_path(self, domid: int) -> Path:
        return self.dir / f"{domid}.sock"

    def socket_for(self, domid: int) -> Path:
        """The socket of ``domid``, made (and served) if it is not there yet."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise XsError(errno.EINVAL, f"no such domain id {domid}")
        path = self.socket_path(domid)
        if domid in self._listeners:
            return path
        assert self._loop is not None, "start() first"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o666 if self._shared else 0o600)
            sock.listen(256)        # connections wait here until the server runs
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listeners[domid] = sock
        task = self._loop.create_task(self._serve(domid, sock))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)
        return path

    async def _serve(self, domid: int, sock: socket.socket) -> None:
        assert self._loop is not None
        server = await self._loop.create_unix_server(lambda: Conn(self, domid), sock=sock)
        if self._stopping:
            server.close()
            return
        self._servers[domid] = server

    # -- connections -----------------------------------------------------------

    def conn_made(self, conn: Conn) -> None:
        if self._stopping:
            conn.close()
            return
        if self._admit is not None:
            why = self._why_not(conn)
            if why is not None:
                log.warning("xenstore: refused a connection: %s", why)
                conn.close()
                return
        self.conns[conn] = None
        self.per_domain[conn.domid] += 1
        if self.per_domain[conn.domid] == 1:
            self._presence(conn.domid, True)

    def _why_not(self, conn: Conn) -> str | None:
        assert self._admit is not None and conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        try:
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except (OSError, AttributeError):
            return f"domain {conn.domid}: the peer's credentials cannot be read"
        return self._admit(uid, conn.domid)

    def conn_lost(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        del self.conns[conn]
        self.drop_watches(conn)
        self.drop_transactions(conn)
        conn.transport = None
        self.per_domain[conn.domid] -= 1
        if self.per_domain[conn.domid] <= 0:
            del self.per_domain[conn.domid]
            if not self._stopping:
                self._presence(conn.domid, False)

    # -- per-domain accounting of watches and transactions ------------------------

    @staticmethod
    def _uncount(counter: Counter[int], domid: int, n: int) -> None:
        left = counter[domid] - n
        if left > 0:
            counter[domid] = left
        else:
            del counter[domid]

    def add_watch(self, conn: Conn, watch: WatchEntry) -> None:
        conn.watches.append(watch)
        self.watch_count[conn.domid] += 1

    def remove_watch(self, conn: Conn, watch: WatchEntry) -> None:
        conn.watches.remove(watch)
        self._uncount(self.watch_count, conn.domid, 1)

    def drop_watches(self, conn: Conn) -> None:
        self._uncount(self.watch_count, conn.domid, len(conn.watches))
        conn.watches.clear()

    def add_transaction(self, conn: Conn, tx: Tx) -> None:
        conn.txs[tx.id] = tx
        self.tx_count[conn.domid] += 1

    def end_transaction(self, conn: Conn, tx: Tx) -> None:
        del conn.txs[tx.id]
        self._uncount(self.tx_count, conn.domid, 1)

    def drop_transactions(self, conn: Conn) -> None:
        self._uncount(self.tx_count, conn.domid, len(conn.txs))
        conn.txs.clear()

    def _own_presence(self, domid: int, present: bool) -> None:
        if present:
            self.introduce(domid)
        else:
            self.release(domid)

    # -- domains -----------------------------------------------------------------

    def introduce(self, domid: int) -> None:
        """A domain came to life: its socket, its home (as libxl), @introduceDomain."""
        self.socket_for(domid)
        if domid in self.introduced:
            return
        self.introduced.add(domid)
        home = f"/local/domain/{domid}"
        readable = (Perm(0, "n"),) if domid == 0 else (Perm(0, "n"), Perm(domid, "r"))
        for path, value, perms in (
            (home, None, readable),
            (f"{home}/domid", str(domid).encode(), readable),
            (f"{home}/name", b"Domain-0" if domid == 0 else f"dom{domid}".encode(), readable),
            (f"{home}/data", None, (Perm(domid, "n"),)),
        ):
            self._tool_write(path, value, perms)
        if domid != 0:
            self.fire_special("@introduceDomain", domid)
        log.info("xenstore: domain %d introduced", domid)

    def release(self, domid: int) -> None:
        """A domain is gone: drop its home and every node it owns, fire @releaseDomain."""
        if domid == 0 or domid not in self.introduced:
            return
        self.introduced.discard(domid)
        for conn in [c for c in self.conns if c.domid == domid]:
            self.drop_watches(conn)
            self.drop_transactions(conn)
        home = f"/local/domain/{domid}"
        if home in self.nodes:
            self._rm_subtree(self.root_view, home)
        # Nodes the domain owns elsewhere go too (xenstored's domain_tree_remove()).
        for path in self._owned_roots(domid):
            if path in self.nodes:
                self._rm_subtree(self.root_view, path)
        self.fire_special("@releaseDomain", domid)
        log.info("xenstore: domain %d released", domid)

    def _owned_roots(self, domid: int) -> list[str]:
        """Topmost nodes owned by ``domid`` (their subtrees go with them)."""
        roots: list[str] = []
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = self.nodes.get(path)
            if node is None:
                continue
            if node.owner == domid and path != "/":
                roots.append(path)
                continue
            stack.extend(join(path, c) for c in reversed(node.children))
        return roots

    def _tool_write(self, path: str, value: bytes | None, perms: tuple[Perm, ...]) -> None:
        """What the toolstack (domain 0) does when it builds a domain's home."""
        view = self.root_view
        node = view.get(path)
        if node is None:
            self._create(None, view, path, value or b"")
            node = view.get(path)
            assert node is not None
        new = node.copy()
        if value is not None:
            new.value = value
        new.perms = perms
        view.put(path, new)
        view.fire(path, SUBTREE, new, node.perms)

    def fire_special(self, name: str, domid: int) -> None:
        node = self.nodes[name]
        self.fire_watches(name, NODEPTH, node, None)
        self.fire_watches(f"{name}/{domid}", DEPTH, node, None)

    # -- watches ---------------------------------------------------------------

    def fire_watches(self, path: str, match: int, node: Node | None,
                     old_perms: tuple[Perm, ...] | None) -> None:
        for conn in list(self.conns):
            if not conn.watches or not self._watch_permitted(conn, path, node, old_perms):
                continue
            for w in list(conn.watches):
                if match == EXACT:
                    send = path == w.path
                elif match == SUBTREE:
                    send = is_child(path, w.path, w.depth)
                elif match == DEPTH:
                    send = path == w.path or (w.depth > 0 and is_child(path, w.path, w.depth))
                else:
                    send = path == w.path and w.depth < 0
                if send:
                    conn.send_event(w.event_path(path), w.token)

    def _watch_permitted(self, conn: Conn, path: str, node: Node | None,
                         old_perms: tuple[Perm, ...] | None) -> bool:
        if conn.privileged:
            return True
        if old_perms is not None and perm_for(conn.domid, False, old_perms) & READ:
            return True
        if node is None:
            node = self.nodes.get(path)
            if node is None:
                return False
        if perm_for(conn.domid, False, node.perms) & READ:
            return True
        parent = self.nodes.get(parent_of(path))
        return parent is not None and bool(perm_for(conn.domid, False, parent.perms) & READ)

    # -- requests --------------------------------------------------------------

    def handle(self, conn: Conn, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        # Counted per domain, so tests can assert what a protocol costs
        # XenStore (``vchan sim status``: xenstore.requests).
        self.requests[conn.domid] = self.requests.get(conn.domid, 0) + 1
        try:
            entry = HANDLERS.get(mtype)
            if entry is None:
                raise XsError(errno.ENOSYS, f"unknown message type {mtype}")
            fn, flags = entry
            if flags & PRIV and not conn.privileged:
                raise XsError(errno.EACCES, "privileged operation")
            tx = None
            if not flags & NOTID and tx_id:
                tx = conn.txs.get(tx_id)
                if tx is None:
                    raise XsError(errno.ENOENT, f"no transaction {tx_id}")
            reply = fn(self, Request(conn, mtype, req_id, tx_id, payload, tx))
            if reply is None:
                return
            if len(reply) > wire.PAYLOAD_MAX:
                raise XsError(errno.E2BIG, "reply too long")
            conn.send(mtype, req_id, tx_id, reply)
        except XsError as exc:
            log.debug("domain %d: %s failed: %s", conn.domid, op_name(mtype), exc)
            conn.send(Op.ERROR, req_id, tx_id, wire.encode_error(exc.errno))
        except Exception:
            log.exception("xenstore request %s of domain %d failed", op_name(mtype), conn.domid)
            conn.send(Op.ERROR, req_id, tx_id, wire.encode_error(errno.EIO))

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "nodes": sum(1 for p in self.nodes if p[:1] == "/"),
            "connections": {str(d): n for d, n in sorted(self.per_domain.items())},
            "watches": sum(len(c.watches) for c in self.conns),
            "transactions": sum(len(c.txs) for c in self.conns),
            # What each domain is charged against its quotas (domain 0 too,
            # though it has none).
            "usage": {str(d): {"nodes": self.owned[d], "watches": self.watch_count[d],
                               "transactions": self.tx_count[d]}
                      for d in sorted(set(self.per_domain) | set(self.watch_count)
                                      | set(self.tx_count))},
            "introduced": sorted(self.introduced),
            "quotas": dict(self.quotas),
            "requests": {str(d): n for d, n in sorted(self.requests.items())},
        }
