"""The emulated hypervisor's xenstored: XenStore's wire protocol and rules.

It runs inside the emulator daemon's event loop (:mod:`vchan.sim.hypervisor`
starts and stops it).  Every emulated domain has its own Unix socket,
``<state dir>/xenstore/<domid>.sock``: a connection belongs to the domain of
the socket it came in on, and domain 0's socket is the privileged one.  The
client side is :mod:`vchan.xenstore`; Debian's ``xenstore-*`` tools work
unmodified with ``XENSTORED_PATH`` set to a socket.  docs/xenstore.md has
the whole contract and the differences from the real xenstored.

RULES (those of xenstored, tools/xenstored in Xen)
===================================================

Permissions.  A node has one or more entries ``(domid, n|r|w|b)``.  The
first names the owner, who may do everything, and by its letter what every
domain not listed later may do; a later entry for a domain (or for
DOMID_ANY) overrides that, first match wins.  Domain 0 may do everything.
Reading or listing needs READ on the node, changing or removing it WRITE,
creating it WRITE on the nearest existing ancestor, and ``set_perms`` being
the owner (only domain 0 may change the owner: EPERM).  A missing node
under an ancestor one may not access reads as EACCES, not ENOENT, so that
nothing leaks.  A created node copies its parent's entries; if an
unprivileged domain creates it, that domain becomes the owner.

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

Transactions.  A transaction sees the store plus its own changes.  Every
node it touches (reads, or reads to change it) is remembered with its
generation, a number every change of a node renews; the commit fails with
EAGAIN if any of them changed meanwhile, else applies all changes at once
and only then fires their watches.

Domains.  A domain exists while a process of it holds a hypervisor handle
or a XenStore connection.  When it appears, ``/local/domain/<id>`` is made
(as libxl would: owned by domain 0, readable by the domain, with ``domid``,
``name`` and a ``data`` directory the domain owns) and ``@introduceDomain``
fires.  When it goes, ``/local/domain/<id>`` and every node the domain owns
elsewhere are removed (as xenstored does without ``--keep-orphans``), then
``@releaseDomain`` fires.

Quotas apply to unprivileged domains only: nodes owned, watches and open
transactions per domain (summed over all the domain's connections, as
xenstored counts them: a domain does not get more by opening more
connections), nodes touched per transaction, entries per node, node size
and path length; ENOSPC (EINVAL for a path) beyond them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..xenstore import ABS_PATH_MAX, HEADER, PAYLOAD_MAX, Op, Perm, error_name

log = logging.getLogger("vchan.sim.xenstored")

NO_GEN = -1
READ, WRITE, OWNER = 1, 2, 4
ALL = READ | WRITE | OWNER
_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
DOMID_SELF = 0x7FF0
DOMID_ANY = 0x7FF5
DOMID_FIRST_RESERVED = 0x7FF0

#: xenstored's default hard quotas (Xen 4.17: tools/xenstore/xenstored_core.c;
#: 4.18 on: tools/xenstored/domain.c, the same numbers).  0 disables one.
DEFAULT_QUOTAS: dict[str, int] = {
    "nodes": 1000,              # nodes a domain may own
    "watches": 128,             # watches a domain may hold, over all its connections
    "transactions": 10,         # transactions a domain may have open, over all its connections
    "transaction-nodes": 1024,  # distinct nodes one transaction may touch
    "node-permissions": 5,      # permission entries per node
    "node-size": 2048,          # bytes a node may take (header, entries, value, child names)
    "path-max": 2048,           # path length below /local/domain/<id>/ (XENSTORE_REL_PATH_MAX)
}
QUOTA_NAMES = tuple(DEFAULT_QUOTAS)
QUOTA_MAX = (1 << 32) - 1       # xenstored keeps them in unsigned ints

#: A client that does not read its replies and events is cut off beyond this.
MAX_OUTPUT = 16 << 20

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_LOCAL = re.compile(r"/local/domain/(\d{1,5})/")
_DECIMAL = re.compile(r"\d+\Z")

# How a change matches watches (xenstored's enum watch_match).
EXACT, SUBTREE, DEPTH, NODEPTH = range(4)


class XsError(Exception):
    """A request fails with this errno (sent as its XenStore name)."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or error_name(err))
        self.errno = err


@dataclass(eq=False)
class Node:
    """One node: a value, permission entries (owner first), child names in order."""

    value: bytes
    perms: tuple[Perm, ...]
    children: list[str] = field(default_factory=list)
    gen: int = NO_GEN

    def copy(self) -> Node:
        return Node(self.value, self.perms, list(self.children), self.gen)

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def size(self) -> int:
        """Bytes xenstored would store: header, entries, value, child names."""
        return 16 + 8 * len(self.perms) + len(self.value) + \
            sum(len(c) + 1 for c in self.children)


def parent_of(path: str) -> str:
    """xenstored's get_parent(): the part before the last '/', or '/'."""
    slash = path.rfind("/", 1)
    return path[:slash] if slash > 0 else "/"


def join(path: str, child: str) -> str:
    return f"/{child}" if path == "/" else f"{path}/{child}"


def is_child(child: str, parent: str, depth: int = -1) -> bool:
    """Whether ``child`` is ``parent`` or below it, at most ``depth`` levels down."""
    if not child.startswith(parent):
        return False
    rest = child[len(parent):]
    if len(parent) > 1 and rest and rest[0] != "/":
        return False
    if depth < 0 or not rest:
        return True
    return rest.count("/") + (1 if len(parent) == 1 else 0) <= depth


def perm_for(domid: int, privileged: bool, perms: tuple[Perm, ...]) -> int:
    """What ``domid`` may do with a node of these entries (READ|WRITE|OWNER bits)."""
    if privileged or perms[0].domid == domid:
        return ALL
    for p in perms[1:]:
        if p.domid == domid or p.domid == DOMID_ANY:
            return _BITS[p.perm]
    return _BITS[perms[0].perm]


def _strings(payload: bytes) -> list[str]:
    """The NUL-terminated strings of a request (bytes after the last NUL are ignored)."""
    parts = payload.split(b"\0")[:-1]
    return [p.decode("latin-1") for p in parts]


def _onearg(payload: bytes) -> str | None:
    """xenstored's onearg(): exactly one string, NUL-terminated."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1].decode("latin-1")


def _parse_domid(text: str | None) -> int:
    if text is None or not _DECIMAL.match(text) or int(text) > 65535:
        raise XsError(errno.EINVAL)
    return int(text)


def _atoi(text: str) -> int:
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


OK = b"OK\0"


# -- views: the store as one request sees it ----------------------------------------


class View:
    """The global store (this class) or a transaction's view of it (:class:`Tx`)."""

    def __init__(self, xsd: XenStored) -> None:
        self.xsd = xsd

    def get(self, path: str) -> Node | None:
        return self.xsd.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        self.xsd.store_put(path, node)

    def delete(self, path: str) -> None:
        self.xsd.store_delete(path)

    def fire(self, path: str, match: int, node: Node | None,
             old_perms: tuple[Perm, ...] | None = None) -> None:
        self.xsd.fire_watches(path, match, node, old_perms)


class Tx(View):
    """A transaction: an overlay of changes plus the generations it relied on."""

    def __init__(self, xsd: XenStored, conn: Conn, tx_id: int) -> None:
        super().__init__(xsd)
        self.conn = conn
        self.id = tx_id
        self.overlay: dict[str, Node | None] = {}
        self.seen: dict[str, int] = {}          # path -> generation when first touched
        self.old_perms: dict[str, tuple[Perm, ...] | None] = {}
        self.events: dict[str, int] = {}        # path -> match, in first-fired order
        self.failed = 0

    def _touch(self, path: str) -> None:
        if path in self.seen:
            return
        limit = self.xsd.quota("transaction-nodes", self.conn)
        if limit and len(self.seen) >= limit:
            self.failed = errno.ENOSPC          # it cannot be committed any more
            raise XsError(errno.ENOSPC, "transaction touches too many nodes")
        node = self.xsd.nodes.get(path)
        self.seen[path] = node.gen if node is not None else NO_GEN
        self.old_perms[path] = node.perms if node is not None else None

    def get(self, path: str) -> Node | None:
        if path in self.overlay:
            return self.overlay[path]
        self._touch(path)
        return self.xsd.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        self._touch(path)
        node.gen = self.xsd.next_gen()
        self.overlay[path] = node

    def delete(self, path: str) -> None:
        self._touch(path)
        self.overlay[path] = None

    def fire(self, path: str, match: int, node: Node | None,
             old_perms: tuple[Perm, ...] | None = None) -> None:
        # Queued until the commit; a subtree match beats an exact one.
        if path not in self.events or match == SUBTREE:
            self.events[path] = match

    def commit(self) -> None:
        xsd = self.xsd
        if self.failed:
            raise XsError(self.failed)
        for path, gen in self.seen.items():
            node = xsd.nodes.get(path)
            if (node.gen if node is not None else NO_GEN) != gen:
                raise XsError(errno.EAGAIN, f"{path} changed during the transaction")
        conn = self.conn
        limit = xsd.quota("nodes", conn)
        if limit:
            delta = 0
            for path, new in self.overlay.items():
                old = xsd.nodes.get(path)
                delta += (new is not None and new.owner == conn.domid) - \
                    (old is not None and old.owner == conn.domid)
            if delta > 0 and xsd.owned[conn.domid] + delta > limit:
                raise XsError(errno.ENOSPC, f"domain {conn.domid} would own too many nodes")
        for path, new in self.overlay.items():
            if new is None:
                if path in xsd.nodes:
                    xsd.store_delete(path)
            else:
                xsd.store_put(path, new)
        for path, match in self.events.items():
            xsd.fire_watches(path, match, None, self.old_perms.get(path))


# -- connections -------------------------------------------------------------------


@dataclass(eq=False)
class WatchEntry:
    path: str           # absolute (or @special)
    token: str
    depth: int          # -1: no limit
    prefix_len: int     # > 0 for a relative watch: cut this much off event paths

    def event_path(self, path: str) -> str:
        return path[self.prefix_len:]


class Conn(asyncio.Protocol):
    """One client connection, belonging to one domain."""

    def __init__(self, xsd: XenStored, domid: int) -> None:
        self.xsd = xsd
        self.domid = domid
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
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
        self.buf += data
        buf = self.buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > PAYLOAD_MAX:
                # xenstored kills such a connection at once (docs/misc/xenstore.txt).
                log.warning("domain %d sent a %d-byte message: dropping it", self.domid, length)
                self.close()
                return
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + HEADER.size:end])
            pos = end
            self.xsd.handle(self, mtype, req_id, tx_id, payload)
            if self.transport is None or self.transport.is_closing():
                return
        del buf[:pos]

    def send(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload)
        if transport.get_write_buffer_size() > MAX_OUTPUT:
            log.warning("domain %d does not read what xenstored sends: dropping it", self.domid)
            self.close()

    def send_event(self, path: str, token: str) -> None:
        payload = path.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"
        if len(payload) <= PAYLOAD_MAX:
            self.send(Op.WATCH_EVENT, 0, 0, payload)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


@dataclass
class Request:
    conn: Conn
    type: int
    req_id: int
    tx_id: int
    payload: bytes
    tx: Tx | None

    @property
    def view(self) -> View:
        return self.tx if self.tx is not None else self.conn.xsd.root_view


Handler = Callable[["XenStored", Request], bytes | None]
_NOTID, _PRIV = 1, 2


# -- the daemon --------------------------------------------------------------------


class XenStored:
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
        self.nodes: dict[str, Node] = {}
        self.owned: Counter[int] = Counter()
        self.gen = 0
        self.conns: dict[Conn, None] = {}       # ordered: events go out in connection order
        self.per_domain: Counter[int] = Counter()
        # Watches and open transactions per domain, over all its connections:
        # the quotas are per domain, as in xenstored (struct domain's acc[]).
        self.watch_count: Counter[int] = Counter()
        self.tx_count: Counter[int] = Counter()
        self.introduced: set[int] = set()
        self.quotas = dict(DEFAULT_QUOTAS)
        self.requests: dict[int, int] = {}     # requests handled, per domain
        self.root_view = View(self)
        self._presence = presence or self._own_presence
        self._listeners: dict[int, socket.socket] = {}
        self._servers: dict[int, asyncio.AbstractServer] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._setup_structure()

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

    # -- the store -------------------------------------------------------------

    def next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def store_put(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self.owned[old.owner] -= 1
        node.gen = self.next_gen()
        self.owned[node.owner] += 1
        self.nodes[path] = node

    def store_delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.owned[old.owner] -= 1

    def _setup_structure(self) -> None:
        dom0 = (Perm(0, "n"),)
        self.store_put("/", Node(b"", dom0, ["tool", "local"]))
        self.store_put("/tool", Node(b"", dom0, ["xenstored"]))
        self.store_put("/tool/xenstored", Node(b"", dom0))
        self.store_put("/local", Node(b"", dom0, ["domain", "vchan-dropin"]))
        self.store_put("/local/domain", Node(b"", dom0))
        # The index of vchan drop-in servers (vchan.dropin), which a toolstack
        # makes in dom0 (docs/dropin.md): every domain may add its entries.
        self.store_put("/local/vchan-dropin", Node(b"", (Perm(0, "b"),)))
        # As current xenstored: any domain may watch @releaseDomain.
        self.store_put("@releaseDomain", Node(b"", (Perm(0, "n"), Perm(DOMID_ANY, "r"))))
        self.store_put("@introduceDomain", Node(b"", dom0))

    def quota(self, name: str, conn: Conn) -> int:
        """The quota ``name`` for ``conn`` (0: none; domain 0 has none)."""
        return 0 if conn.privileged else self.quotas[name]

    def set_quota(self, name: str, value: Any) -> int:
        if name not in self.quotas:
            raise XsError(errno.EINVAL, f"unknown xenstore quota {name!r} "
                                        f"(known: {', '.join(QUOTA_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 0 <= value <= QUOTA_MAX:
            raise XsError(errno.EINVAL, f"xenstore quota {name} must be in 0..{QUOTA_MAX}, "
                                        f"got {value!r}")
        self.quotas[name] = value
        return value

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
            entry = _HANDLERS.get(mtype)
            if entry is None:
                raise XsError(errno.ENOSYS, f"unknown message type {mtype}")
            fn, flags = entry
            if flags & _PRIV and not conn.privileged:
                raise XsError(errno.EACCES, "privileged operation")
            tx = None
            if not flags & _NOTID and tx_id:
                tx = conn.txs.get(tx_id)
                if tx is None:
                    raise XsError(errno.ENOENT, f"no transaction {tx_id}")
            reply = fn(self, Request(conn, mtype, req_id, tx_id, payload, tx))
            if reply is None:
                return
            if len(reply) > PAYLOAD_MAX:
                raise XsError(errno.E2BIG, "reply too long")
            conn.send(mtype, req_id, tx_id, reply)
        except XsError as exc:
            log.debug("domain %d: %s failed: %s", conn.domid, _op_name(mtype), exc)
            conn.send(Op.ERROR, req_id, tx_id, error_name(exc.errno).encode() + b"\0")
        except Exception:
            log.exception("xenstore request %s of domain %d failed", _op_name(mtype), conn.domid)
            conn.send(Op.ERROR, req_id, tx_id, b"EIO\0")

    # -- path and permission helpers -------------------------------------------

    def canonicalize(self, conn: Conn, raw: str | None, allow_special: bool) -> str:
        if raw is None or not _VALID.match(raw) or (raw[:1] == "@" and not allow_special):
            raise XsError(errno.EINVAL, f"invalid path {raw!r}")
        name = raw if raw[:1] in ("/", "@") else f"{conn.home}/{raw}"
        m = _LOCAL.match(name)
        local_off = m.end() if m else 0
        if (name.endswith("/") and name != "/") or "//" in name or len(name) > ABS_PATH_MAX:
            raise XsError(errno.EINVAL, f"invalid path {name!r}")
        limit = self.quota("path-max", conn)
        if limit and len(name) - local_off > limit:
            raise XsError(errno.EINVAL, f"path too long: {name[:60]!r}...")
        return name

    def get_checked(self, conn: Conn, view: View, name: str, perm: int) -> Node:
        """The node, if ``conn`` may ``perm`` it; else ENOENT or EACCES as xenstored says."""
        node = view.get(name)
        if node is not None:
            if perm_for(conn.domid, conn.privileged, node.perms) & perm == perm:
                return node
            err = errno.EACCES
        else:
            err = errno.ENOENT
        # Don't tell a domain more than the nearest ancestor lets it know.
        parent_perm = 0
        path = name
        while True:
            path = parent_of(path)
            ancestor = view.get(path)
            if ancestor is not None:
                parent_perm = perm_for(conn.domid, conn.privileged, ancestor.perms)
                break
            if path == "/":
                break
        raise XsError(err if parent_perm & perm else errno.EACCES)

    def check_size(self, conn: Conn | None, node: Node) -> None:
        if conn is None:
            return
        limit = self.quota("node-size", conn)
        if limit and node.size() >= limit:
            raise XsError(errno.ENOSPC, f"node of {node.size()} bytes")

    def _create(self, conn: Conn | None, view: View, name: str, value: bytes) -> Node:
        """Create ``name`` and missing parents (write permission was checked)."""
        missing = [name]
        path = parent_of(name)
        while (ancestor := view.get(path)) is None:
            if path == "/":
                raise XsError(errno.EIO, "no root node")
            missing.append(path)
            path = parent_of(path)
        if conn is not None and view is self.root_view:
            limit = self.quota("nodes", conn)
            if limit and self.owned[conn.domid] + len(missing) > limit:
                raise XsError(errno.ENOSPC, f"domain {conn.domid} owns too many nodes")
        chain = [(path, ancestor.copy())]
        for new_path in reversed(missing):
            parent_node = chain[-1][1]
            perms = parent_node.perms
            if conn is not None and not conn.privileged:
                # Unprivileged domains own what they create.
                perms = (Perm(conn.domid, perms[0].perm), *perms[1:])
            parent_node.children.append(new_path[new_path.rfind("/") + 1:])
            chain.append((new_path, Node(b"", perms)))
        chain[-1][1].value = value
        for _, node in chain:
            self.check_size(conn, node)
        for path, node in chain:
            view.put(path, node)
        return chain[-1][1]

    def _rm_subtree(self, view: View, root: str) -> None:
        """Remove ``root`` and below, deepest first, firing watches as xenstored does."""
        top = view.get(root)
        if top is None:
            return
        stack: list[tuple[str, Node, Iterator[str]]] = [(root, top, iter(list(top.children)))]
        while stack:
            path, node, children = stack[-1]
            child = next(children, None)
            if child is not None:
                child_path = join(path, child)
                child_node = view.get(child_path)
                if child_node is not None:
                    stack.append((child_path, child_node, iter(list(child_node.children))))
                continue
            stack.pop()
            view.delete(path)
            view.fire(path, SUBTREE if path == root else EXACT, node, node.perms)
        parent_path = parent_of(root)
        parent = view.get(parent_path)
        if parent is not None:
            new = parent.copy()
            base = root[root.rfind("/") + 1:]
            if base in new.children:
                new.children.remove(base)
            view.put(parent_path, new)

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

    # -- the operations ----------------------------------------------------------

    def op_read(self, req: Request) -> bytes:
        name = self.canonicalize(req.conn, _onearg(req.payload), False)
        return self.get_checked(req.conn, req.view, name, READ).value

    def op_write(self, req: Request) -> bytes:
        conn, view = req.conn, req.view
        nul = req.payload.find(b"\0")
        if nul < 0:
            raise XsError(errno.EINVAL)
        name = self.canonicalize(conn, req.payload[:nul].decode("latin-1"), False)
        value = req.payload[nul + 1:]
        try:
            node = self.get_checked(conn, view, name, WRITE)
        except XsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            new = self._create(conn, view, name, value)
        else:
            new = node.copy()
            new.value = value
            self.check_size(conn, new)
            view.put(name, new)
        view.fire(name, SUBTREE, new)
        return OK

    def op_mkdir(self, req: Request) -> bytes:
        conn, view = req.conn, req.view
        name = self.canonicalize(conn, _onearg(req.payload), False)
        try:
            self.get_checked(conn, view, name, WRITE)
        except XsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            view.fire(name, SUBTREE, self._create(conn, view, name, b""))
        return OK

    def op_rm(self, req: Request) -> bytes:
        conn, view = req.conn, req.view
        name = self.canonicalize(conn, _onearg(req.payload), False)
        try:
            self.get_checked(conn, view, name, WRITE)
        except XsError as exc:
            # Not there is fine -- if its parent is.
            if exc.errno == errno.ENOENT and view.get(parent_of(name)) is not None:
                return OK
            raise
        if name == "/":
            raise XsError(errno.EINVAL, "cannot remove /")
        self._rm_subtree(view, name)
        return OK

    def op_directory(self, req: Request) -> bytes:
        name = self.canonicalize(req.conn, _onearg(req.payload), False)
        node = self.get_checked(req.conn, req.view, name, READ)
        return b"".join(c.encode("latin-1") + b"\0" for c in node.children)

    def op_directory_part(self, req: Request) -> bytes:
        args = _strings(req.payload)
        if len(args) != 2 or req.payload.count(b"\0") != 2:
            raise XsError(errno.EINVAL)
        name = self.canonicalize(req.conn, args[0], False)
        node = self.get_checked(req.conn, req.view, name, READ)
        children = b"".join(c.encode("latin-1") + b"\0" for c in node.children)
        off = _atoi(args[1])
        gen = str(node.gen).encode() + b"\0"
        if off < 0 or off >= len(children):
            return gen + b"\0"
        maxlen = PAYLOAD_MAX - len(gen) - 1
        end = off
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - off > maxlen:
                break
            end = nxt
        chunk = children[off:end]
        return gen + chunk + (b"\0" if end == len(children) else b"")

    def op_get_perms(self, req: Request) -> bytes:
        name = self.canonicalize(req.conn, _onearg(req.payload), True)
        node = self.get_checked(req.conn, req.view, name, READ)
        return b"".join(p.to_wire().encode() + b"\0" for p in node.perms)

    def op_set_perms(self, req: Request) -> bytes:
        conn, view = req.conn, req.view
        args = _strings(req.payload)
        if len(args) < 2:
            raise XsError(errno.EINVAL)
        limit = self.quota("node-permissions", conn)
        if limit and len(args) - 1 > limit:
            raise XsError(errno.ENOSPC, "too many permission entries")
        try:
            perms = tuple(Perm.from_wire(a) for a in args[1:])
        except ValueError:
            raise XsError(errno.EINVAL, "malformed permission") from None
        name = self.canonicalize(conn, args[0], True)
        node = self.get_checked(conn, view, name, WRITE | OWNER)
        if not conn.privileged and perms[0].domid != node.owner:
            raise XsError(errno.EPERM, "only domain 0 may change the owner")
        new = node.copy()
        new.perms = perms
        self.check_size(conn, new)
        view.put(name, new)
        view.fire(name, SUBTREE, new, node.perms)
        return OK

    def op_watch(self, req: Request) -> None:
        conn = req.conn
        args = _strings(req.payload)
        depth = -1
        if len(args) == 3:
            depth = _atoi(args[2])
            if depth < 0:
                raise XsError(errno.EINVAL)
        elif len(args) != 2:
            raise XsError(errno.EINVAL)
        relative = args[0][:1] not in ("/", "@")
        name = self.canonicalize(conn, args[0], True)
        token = args[1]
        if any(w.path == name and w.token == token for w in conn.watches):
            raise XsError(errno.EEXIST)
        limit = self.quota("watches", conn)
        if limit and self.watch_count[conn.domid] >= limit:
            raise XsError(errno.ENOSPC, f"domain {conn.domid} has too many watches")
        w = WatchEntry(name, token, depth, len(conn.home) + 1 if relative else 0)
        self.add_watch(conn, w)
        conn.send(req.type, req.req_id, req.tx_id, OK)
        conn.send_event(w.event_path(name), token)     # every new watch fires once
        return None

    def op_unwatch(self, req: Request) -> bytes:
        conn = req.conn
        args = _strings(req.payload)
        if len(args) != 2:
            raise XsError(errno.EINVAL)
        name = self.canonicalize(conn, args[0], True)
        for w in conn.watches:
            if w.path == name and w.token == args[1]:
                self.remove_watch(conn, w)
                return OK
        raise XsError(errno.ENOENT)

    def op_transaction_start(self, req: Request) -> bytes:
        conn = req.conn
        if req.tx is not None:
            raise XsError(errno.EBUSY, "no nested transactions")
        limit = self.quota("transactions", conn)
        if limit and self.tx_count[conn.domid] >= limit:
            raise XsError(errno.ENOSPC, f"domain {conn.domid} has too many transactions")
        while conn.next_tx == 0 or conn.next_tx in conn.txs:
            conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
        tx_id = conn.next_tx
        conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
        self.add_transaction(conn, Tx(self, conn, tx_id))
        return str(tx_id).encode() + b"\0"

    def op_transaction_end(self, req: Request) -> bytes:
        arg = _onearg(req.payload)
        if arg not in ("T", "F"):
            raise XsError(errno.EINVAL)
        tx = req.tx
        if tx is None:
            raise XsError(errno.ENOENT, "not in a transaction")
        self.end_transaction(req.conn, tx)      # gone whatever the outcome
        if arg == "T":
            tx.commit()
        return OK

    def op_get_domain_path(self, req: Request) -> bytes:
        domid = _parse_domid(_onearg(req.payload))
        return f"/local/domain/{domid}".encode() + b"\0"

    def op_is_domain_introduced(self, req: Request) -> bytes:
        domid = _parse_domid(_onearg(req.payload))
        return b"T\0" if domid == DOMID_SELF or domid in self.introduced else b"F\0"

    def op_reset_watches(self, req: Request) -> bytes:
        self.drop_watches(req.conn)
        self.drop_transactions(req.conn)
        return OK

    def op_control(self, req: Request) -> bytes:
        args = _strings(req.payload)
        if not args:
            raise XsError(errno.EINVAL)
        cmd, params = args[0], args[1:]
        if cmd == "help":
            text = "check\nhelp\nlog\nlogfile\nmemreport\nprint\nquota\n"
        elif cmd in ("check", "log", "logfile", "memreport"):
            text = "OK"
        elif cmd == "print":
            log.info("xenstore-control: %s", " ".join(params))
            text = "OK"
        elif cmd == "quota":
            text = self._control_quota(params)
        else:
            raise XsError(errno.EINVAL, f"unsupported control command {cmd!r}")
        return text.encode("latin-1") + b"\0"

    def _control_quota(self, params: list[str]) -> str:
        if not params:
            return "".join(f"{name:<20}{value}\n" for name, value in self.quotas.items())
        if params[0] == "set" and len(params) == 3:
            if not _DECIMAL.match(params[2]):
                raise XsError(errno.EINVAL)
            self.set_quota(params[1], int(params[2]))
            return "OK"
        domid = _parse_domid(params[0]) if len(params) == 1 else -1
        if domid < 0:
            raise XsError(errno.EINVAL)
        return (f"{'nodes':<20}{self.owned[domid]}\n"
                f"{'watches':<20}{self.watch_count[domid]}\n"
                f"{'transactions':<20}{self.tx_count[domid]}\n")

    def op_unsupported(self, req: Request) -> bytes:
        raise XsError(errno.ENOSYS, "not emulated")


def _op_name(mtype: int) -> str:
    try:
        return Op(mtype).name
    except ValueError:
        return f"type {mtype}"


_HANDLERS: dict[int, tuple[Handler, int]] = {
    Op.CONTROL: (XenStored.op_control, _PRIV),
    Op.DIRECTORY: (XenStored.op_directory, 0),
    Op.READ: (XenStored.op_read, 0),
    Op.GET_PERMS: (XenStored.op_get_perms, 0),
    Op.WATCH: (XenStored.op_watch, _NOTID),
    Op.UNWATCH: (XenStored.op_unwatch, _NOTID),
    Op.TRANSACTION_START: (XenStored.op_transaction_start, 0),
    Op.TRANSACTION_END: (XenStored.op_transaction_end, 0),
    Op.INTRODUCE: (XenStored.op_unsupported, _PRIV),
    Op.RELEASE: (XenStored.op_unsupported, _PRIV),
    Op.GET_DOMAIN_PATH: (XenStored.op_get_domain_path, 0),
    Op.WRITE: (XenStored.op_write, 0),
    Op.MKDIR: (XenStored.op_mkdir, 0),
    Op.RM: (XenStored.op_rm, 0),
    Op.SET_PERMS: (XenStored.op_set_perms, 0),
    Op.IS_DOMAIN_INTRODUCED: (XenStored.op_is_domain_introduced, _PRIV),
    Op.RESUME: (XenStored.op_unsupported, _PRIV),
    Op.SET_TARGET: (XenStored.op_unsupported, _PRIV),
    Op.RESET_WATCHES: (XenStored.op_reset_watches, 0),
    Op.DIRECTORY_PART: (XenStored.op_directory_part, 0),
}
