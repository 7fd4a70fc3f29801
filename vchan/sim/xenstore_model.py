"""The emulated xenstored's store: nodes, permissions, transactions, quotas.

:class:`Store` holds the tree and applies xenstored's rules to it;
:class:`View` is the store as one request sees it, :class:`Tx` a
transaction's view.  The daemon (:mod:`vchan.sim.xenstored`) adds the
connections, watches and domains; the requests are in
:mod:`vchan.sim.xenstored_ops`.

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

Transactions.  A transaction sees the store plus its own changes.  Every
node it touches (reads, or reads to change it) is remembered with its
generation, a number every change of a node renews; the commit fails with
EAGAIN if any of them changed meanwhile, else applies all changes at once
and only then fires their watches.

Quotas apply to unprivileged domains only: nodes owned, watches and open
transactions per domain (summed over all the domain's connections, as
xenstored counts them: a domain does not get more by opening more
connections), nodes touched per transaction, entries per node, node size
and path length; ENOSPC (EINVAL for a path) beyond them.
"""

from __future__ import annotations

import errno
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..xenstore.wire import ABS_PATH_MAX, Perm, XsError

if TYPE_CHECKING:
    from .xenstored import Conn

NO_GEN = -1
READ, WRITE, OWNER = 1, 2, 4
ALL = READ | WRITE | OWNER
_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
DOMID_ANY = 0x7FF5

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

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_LOCAL = re.compile(r"/local/domain/(\d{1,5})/")

# How a change matches watches (xenstored's enum watch_match).
EXACT, SUBTREE, DEPTH, NODEPTH = range(4)


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


# -- views: the store as one request sees it ----------------------------------------


class View:
    """The global store (this class) or a transaction's view of it (:class:`Tx`)."""

    def __init__(self, xsd: Store) -> None:
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

    def __init__(self, xsd: Store, conn: Conn, tx_id: int) -> None:
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


@dataclass(eq=False)
class WatchEntry:
    path: str           # absolute (or @special)
    token: str
    depth: int          # -1: no limit
    prefix_len: int     # > 0 for a relative watch: cut this much off event paths

    def event_path(self, path: str) -> str:
        return path[self.prefix_len:]


class Store:
    """The tree of nodes and what each domain owns of it, under xenstored's rules."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.owned: Counter[int] = Counter()
        self.gen = 0
        self.quotas = dict(DEFAULT_QUOTAS)
        self.root_view = View(self)
        self._setup_structure()

    def fire_watches(self, path: str, match: int, node: Node | None,
                     old_perms: tuple[Perm, ...] | None) -> None:
        """Tell the watchers of ``path`` (the daemon's business)."""
        raise NotImplementedError

    # -- the tree --------------------------------------------------------------

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

    # -- paths and permissions -------------------------------------------------

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
