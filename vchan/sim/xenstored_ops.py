"""The emulated xenstored's requests: one function per operation.

Each reads its request with :mod:`vchan.xenstore.wire` (the codec the
clients use), applies xenstored's rules through the store
(:mod:`vchan.sim.xenstore_model`) and returns the reply's payload, or
raises :class:`XsError` for an ERROR reply.  :data:`HANDLERS` maps each
message type to its function and whether it needs domain 0 or ignores the
transaction id.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..xenstore import wire
from ..xenstore.wire import Op, Perm, XsError
from .xenstore_model import OWNER, READ, SUBTREE, WRITE, Node, Tx, View, WatchEntry, parent_of

if TYPE_CHECKING:
    from .xenstored import Conn, XenStored

log = logging.getLogger("vchan.sim.xenstored")


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
NOTID, PRIV = 1, 2


def _domid(text: str | None) -> int:
    domid = wire.decode_domid(text)
    if domid is None:
        raise XsError(errno.EINVAL)
    return domid


def _writable(xsd: XenStored, conn: Conn, view: View, name: str) -> Node | None:
    """The node at ``name`` if ``conn`` may write it, or None where there is
    none and ``conn`` may know that (ENOENT); any other refusal raises."""
    try:
        return xsd.get_checked(conn, view, name, WRITE)
    except XsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return None


def op_read(xsd: XenStored, req: Request) -> bytes:
    name = xsd.canonicalize(req.conn, wire.one_arg(req.payload), False)
    return xsd.get_checked(req.conn, req.view, name, READ).value


def op_write(xsd: XenStored, req: Request) -> bytes:
    conn, view = req.conn, req.view
    parsed = wire.decode_write(req.payload)
    if parsed is None:
        raise XsError(errno.EINVAL)
    name = xsd.canonicalize(conn, parsed[0], False)
    value = parsed[1]
    node = _writable(xsd, conn, view, name)
    if node is None:
        new = xsd._create(conn, view, name, value)
    else:
        new = node.copy()
        new.value = value
        xsd.check_size(conn, new)
        view.put(name, new)
    view.fire(name, SUBTREE, new)
    return wire.OK


def op_mkdir(xsd: XenStored, req: Request) -> bytes:
    conn, view = req.conn, req.view
    name = xsd.canonicalize(conn, wire.one_arg(req.payload), False)
    if _writable(xsd, conn, view, name) is None:
        view.fire(name, SUBTREE, xsd._create(conn, view, name, b""))
    return wire.OK


def op_rm(xsd: XenStored, req: Request) -> bytes:
    conn, view = req.conn, req.view
    name = xsd.canonicalize(conn, wire.one_arg(req.payload), False)
    if _writable(xsd, conn, view, name) is None:
        # Not there is fine -- if its parent is.
        if view.get(parent_of(name)) is not None:
            return wire.OK
        raise XsError(errno.ENOENT)
    if name == "/":
        raise XsError(errno.EINVAL, "cannot remove /")
    xsd._rm_subtree(view, name)
    return wire.OK


def op_directory(xsd: XenStored, req: Request) -> bytes:
    name = xsd.canonicalize(req.conn, wire.one_arg(req.payload), False)
    node = xsd.get_checked(req.conn, req.view, name, READ)
    return wire.strings_reply(node.children)


def op_directory_part(xsd: XenStored, req: Request) -> bytes:
    parsed = wire.decode_directory_part(req.payload)
    if parsed is None:
        raise XsError(errno.EINVAL)
    name = xsd.canonicalize(req.conn, parsed[0], False)
    node = xsd.get_checked(req.conn, req.view, name, READ)
    return wire.directory_part_reply(node.gen, node.children, parsed[1])


def op_get_perms(xsd: XenStored, req: Request) -> bytes:
    name = xsd.canonicalize(req.conn, wire.one_arg(req.payload), True)
    node = xsd.get_checked(req.conn, req.view, name, READ)
    return wire.perms_reply(node.perms)


def op_set_perms(xsd: XenStored, req: Request) -> bytes:
    conn, view = req.conn, req.view
    parsed = wire.decode_set_perms(req.payload)
    if parsed is None:
        raise XsError(errno.EINVAL)
    path, entries = parsed
    limit = xsd.quota("node-permissions", conn)
    if limit and len(entries) > limit:
        raise XsError(errno.ENOSPC, "too many permission entries")
    try:
        perms = tuple(Perm.from_wire(e) for e in entries)
    except ValueError:
        raise XsError(errno.EINVAL, "malformed permission") from None
    name = xsd.canonicalize(conn, path, True)
    node = xsd.get_checked(conn, view, name, WRITE | OWNER)
    if not conn.privileged and perms[0].domid != node.owner:
        raise XsError(errno.EPERM, "only domain 0 may change the owner")
    new = node.copy()
    new.perms = perms
    xsd.check_size(conn, new)
    view.put(name, new)
    view.fire(name, SUBTREE, new, node.perms)
    return wire.OK


def op_watch(xsd: XenStored, req: Request) -> None:
    conn = req.conn
    parsed = wire.decode_watch(req.payload)
    if parsed is None:
        raise XsError(errno.EINVAL)
    path, token, depth = parsed
    relative = path[:1] not in ("/", "@")
    name = xsd.canonicalize(conn, path, True)
    if any(w.path == name and w.token == token for w in conn.watches):
        raise XsError(errno.EEXIST)
    limit = xsd.quota("watches", conn)
    if limit and xsd.watch_count[conn.domid] >= limit:
        raise XsError(errno.ENOSPC, f"domain {conn.domid} has too many watches")
    w = WatchEntry(name, token, depth, len(conn.home) + 1 if relative else 0)
    xsd.add_watch(conn, w)
    conn.send(req.type, req.req_id, req.tx_id, wire.OK)
    conn.send_event(w.event_path(name), token)     # every new watch fires once
    return None


def op_unwatch(xsd: XenStored, req: Request) -> bytes:
    conn = req.conn
    parsed = wire.decode_unwatch(req.payload)
    if parsed is None:
        raise XsError(errno.EINVAL)
    name = xsd.canonicalize(conn, parsed[0], True)
    for w in conn.watches:
        if w.path == name and w.token == parsed[1]:
            xsd.remove_watch(conn, w)
            return wire.OK
    raise XsError(errno.ENOENT)


def op_transaction_start(xsd: XenStored, req: Request) -> bytes:
    conn = req.conn
    if req.tx is not None:
        raise XsError(errno.EBUSY, "no nested transactions")
    limit = xsd.quota("transactions", conn)
    if limit and xsd.tx_count[conn.domid] >= limit:
        raise XsError(errno.ENOSPC, f"domain {conn.domid} has too many transactions")
    while conn.next_tx == 0 or conn.next_tx in conn.txs:
        conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
    tx_id = conn.next_tx
    conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
    xsd.add_transaction(conn, Tx(xsd, conn, tx_id))
    return wire.transaction_start_reply(tx_id)


def op_transaction_end(xsd: XenStored, req: Request) -> bytes:
    commit = wire.decode_transaction_end(req.payload)
    if commit is None:
        raise XsError(errno.EINVAL)
    tx = req.tx
    if tx is None:
        raise XsError(errno.ENOENT, "not in a transaction")
    xsd.end_transaction(req.conn, tx)      # gone whatever the outcome
    if commit:
        tx.commit()
    return wire.OK


def op_get_domain_path(xsd: XenStored, req: Request) -> bytes:
    domid = _domid(wire.one_arg(req.payload))
    return wire.string_reply(f"/local/domain/{domid}")


def op_is_domain_introduced(xsd: XenStored, req: Request) -> bytes:
    domid = _domid(wire.one_arg(req.payload))
    return wire.bool_reply(domid == wire.DOMID_SELF or domid in xsd.introduced)


def op_reset_watches(xsd: XenStored, req: Request) -> bytes:
    xsd.drop_watches(req.conn)
    xsd.drop_transactions(req.conn)
    return wire.OK


def op_control(xsd: XenStored, req: Request) -> bytes:
    args = wire.request_strings(req.payload)
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
        text = _control_quota(xsd, params)
    else:
        raise XsError(errno.EINVAL, f"unsupported control command {cmd!r}")
    return wire.string_reply(text)


def _control_quota(xsd: XenStored, params: list[str]) -> str:
    if not params:
        return "".join(f"{name:<20}{value}\n" for name, value in xsd.quotas.items())
    if params[0] == "set" and len(params) == 3:
        if not wire.is_decimal(params[2]):
            raise XsError(errno.EINVAL)
        xsd.set_quota(params[1], int(params[2]))
        return "OK"
    domid = _domid(params[0]) if len(params) == 1 else -1
    if domid < 0:
        raise XsError(errno.EINVAL)
    return (f"{'nodes':<20}{xsd.owned[domid]}\n"
            f"{'watches':<20}{xsd.watch_count[domid]}\n"
            f"{'transactions':<20}{xsd.tx_count[domid]}\n")


def op_unsupported(xsd: XenStored, req: Request) -> bytes:
    raise XsError(errno.ENOSYS, "not emulated")


def op_name(mtype: int) -> str:
    try:
        return Op(mtype).name
    except ValueError:
        return f"type {mtype}"


HANDLERS: dict[int, tuple[Handler, int]] = {
    Op.CONTROL: (op_control, PRIV),
    Op.DIRECTORY: (op_directory, 0),
    Op.READ: (op_read, 0),
    Op.GET_PERMS: (op_get_perms, 0),
    Op.WATCH: (op_watch, NOTID),
    Op.UNWATCH: (op_unwatch, NOTID),
    Op.TRANSACTION_START: (op_transaction_start, 0),
    Op.TRANSACTION_END: (op_transaction_end, 0),
    Op.INTRODUCE: (op_unsupported, PRIV),
    Op.RELEASE: (op_unsupported, PRIV),
    Op.GET_DOMAIN_PATH: (op_get_domain_path, 0),
    Op.WRITE: (op_write, 0),
    Op.MKDIR: (op_mkdir, 0),
    Op.RM: (op_rm, 0),
    Op.SET_PERMS: (op_set_perms, 0),
    Op.IS_DOMAIN_INTRODUCED: (op_is_domain_introduced, PRIV),
    Op.RESUME: (op_unsupported, PRIV),
    Op.SET_TARGET: (op_unsupported, PRIV),
    Op.RESET_WATCHES: (op_reset_watches, 0),
    Op.DIRECTORY_PART: (op_directory_part, 0),
}
