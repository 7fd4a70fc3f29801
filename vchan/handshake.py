"""The XenStore side of vchan's meetings, as I/O-free state machines.

RULES
=====

A meeting (publishing a raw server, a client's rendezvous with a raw or a
listener server, tidying up after it) is a generator that *yields* the
XenStore operations it needs -- :class:`Read`, :class:`Write`,
:class:`Mkdir`, :class:`Rm`, :class:`GetPerms`, :class:`SetPerms`,
:class:`Directory`, :class:`Transaction` (a nested meeting run in one
XenStore transaction, rerun on a conflict), :class:`WaitChange` (until
something under the watched path changes) and :class:`Sleep` -- and is
*sent* each result, or has the operation's ``OSError`` thrown into it.  It
never does I/O itself, never sleeps and never reads a clock; it returns what
the meeting found.

Two drivers run the same generators: :func:`run_async` with the asyncio
XenStore client (the transports and servers), :func:`run_sync` with the
blocking :class:`~vchan.xenstore.XenStoreSync` (:class:`vchan.Vchan`, which
so needs neither an event loop nor a thread).  Drivers own what is about
time: the watch behind :class:`WaitChange`, the caller's timeout, checking
that the peer domain still exists while waiting.

The meetings themselves (what is written where, who may read it) are
described in :mod:`vchan.listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .addresses import request_dir, vchan_path
from .xenstore import Perm, TransactionRetry

__all__ = [
    "Answer",
    "client_cleanup",
    "client_rendezvous",
    "not_ready",
    "publish",
    "remove_if_empty",
    "run_async",
    "run_sync",
]


# -- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    path: str


@dataclass(frozen=True)
class Write:
    path: str
    value: str


@dataclass(frozen=True)
class Mkdir:
    path: str


@dataclass(frozen=True)
class Rm:
    path: str


@dataclass(frozen=True)
class Directory:
    path: str


@dataclass(frozen=True)
class GetPerms:
    path: str


@dataclass(frozen=True)
class SetPerms:
    path: str
    perms: tuple[Perm, ...]


@dataclass(frozen=True)
class Transaction:
    """Run ``body()`` (a meeting) in one transaction; its result is sent back."""
    body: Callable[[], Meeting]


@dataclass(frozen=True)
class WaitChange:
    """Wait until something under the driver's watched path changes."""


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Read | Write | Mkdir | Rm | Directory | GetPerms | SetPerms | Transaction | WaitChange | Sleep
Meeting = Generator[Op, Any, Any]


@dataclass(frozen=True)
class Answer:
    """Where a client found its ring: ``mode`` is raw, listener or session."""
    ring_ref: int
    port: int
    mode: str


# -- meetings ----------------------------------------------------------------------------


def publish(path: str, ring_ref: int, evtchn_port: int, own: int, peer: int, *,
            session: bool = False) -> Meeting:
    """Write ring-ref and event-channel in one transaction (libxenvchan's way).

    ``session``: also say that the ring carries a session (vchan.mux).
    """
    perms = (Perm(own, "n"), Perm(peer, "r"))

    def body() -> Meeting:
        if session:
            yield Write(f"{path}/session", "1")
            yield SetPerms(f"{path}/session", perms)
        yield Write(f"{path}/ring-ref", str(ring_ref))
        yield SetPerms(f"{path}/ring-ref", perms)
        yield Write(f"{path}/event-channel", str(evtchn_port))
        yield SetPerms(f"{path}/event-channel", perms)

    yield Transaction(body)


def read_ring(path: str) -> Meeting:
    """(ring-ref, event-channel) at ``path``, or None if not (both) there."""
    try:
        ref = int((yield Read(f"{path}/ring-ref")))
        port = int((yield Read(f"{path}/event-channel")))
    except (FileNotFoundError, PermissionError, ValueError):
        return None
    if ref <= 0 or port <= 0:       # libxenvchan treats 0 as "not there"
        return None
    return ref, port


def remove_if_empty(path: str) -> Meeting:
    """Remove directory ``path`` if it has no children, atomically."""
    def body() -> Meeting:
        try:
            if (yield Directory(path)):
                return          # another process's request: it tidies up later
        except FileNotFoundError:
            return
        yield Rm(path)

    yield Transaction(body)


def write_request(reqdir: str, request: str, own: int, server: int, sizes: str) -> Meeting:
    """Put a client's request in its own tree, readable by the server."""
    # No transaction needed: the directory is made readable by the server
    # before any request is written into it (requests inherit that), and
    # concurrent clients making the same directory agree on everything.  A
    # client of this domain that finished may remove the directory while it
    # is empty (remove_if_empty, atomically): then we start again, and once
    # our request is in, it stays.
    perms = (Perm(own, "n"), Perm(server, "r"))
    for attempt in range(1000):
        try:
            yield Mkdir(reqdir)
            yield SetPerms(reqdir, perms)
            yield Write(request, sizes)
            # Removed between set_perms and write, the directory was made
            # anew by the write with its parent's permissions, and our
            # request inherited them: the server would not see us.  Put ours
            # back, request first (the server's watch fires again).
            if tuple((yield GetPerms(reqdir))) != perms:
                yield SetPerms(request, perms)
                yield SetPerms(reqdir, perms)
            return
        except FileNotFoundError:
            continue            # removed under us: again
        except OSError as exc:
            # The directory is full of other processes' requests (node-size
            # quota), or the domain of nodes: wait for some to go.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt == 999:
                raise
        yield Sleep(min(0.1, 0.005 * (attempt + 1)))
    raise OSError(errno.EAGAIN, f"could not write the vchan request {request}")


def client_rendezvous(*, own: int, server: int, port: str, nonce: str, read_min: int,
                      write_min: int, session: bool, wait: bool = True) -> Meeting:
    """A client meeting a raw server, or asking a listener for a ring.

    The driver watches ``vchan_path(server, own, port)``; the first
    :class:`WaitChange` returns at once (the state is looked at once after
    subscribing).  Returns an :class:`Answer`; raises
    ``ConnectionRefusedError`` with the server's reason when it refuses.
    Run :func:`client_cleanup` afterwards, whatever happened.

    ``wait=False`` (a timeout of 0) looks once and asks nobody: the
    :class:`Answer` of a raw server published now, else None (a listener's
    answer would be a round trip away).
    """
    base = vchan_path(server, own, port)
    reqdir = request_dir(own, server, port)
    requested = False
    while True:
        yield WaitChange()
        raw = yield from read_ring(base)
        if raw is not None:
            return Answer(raw[0], raw[1], "raw")
        if not wait:
            return None
        if not requested:
            sizes = f"{read_min} {write_min}" + (" session" if session else "")
            yield from write_request(reqdir, f"{reqdir}/{nonce}", own, server, sizes)
            requested = True
        answer = yield from read_ring(f"{base}/{nonce}")
        if answer is not None:
            mode = "listener"
            if session:
                try:
                    if (yield Read(f"{base}/{nonce}/session")) == b"1":
                        mode = "session"
                except (FileNotFoundError, PermissionError):
                    pass
            return Answer(answer[0], answer[1], mode)
        try:
            error = yield Read(f"{base}/{nonce}/error")
        except (FileNotFoundError, PermissionError):
            continue
        raise ConnectionRefusedError(
            errno.ECONNREFUSED, f"vchan server {server} port {port} refused the "
            f"connection: {error.decode(errors='replace')}")


def not_ready(server: int, port: int | str, *, sessions: bool) -> str:
    """What a client with ``timeout=0`` says when it would have to wait."""
    ready = "a raw server published now" + \
        (", or a port this event loop holds a session with" if sessions else "")
    return (f"no vchan server ready at domain {server} port {port} without waiting: "
            f"timeout=0 connects only to {ready}; a listener server (vchan's default) "
            "answers a request, a round trip away: give a timeout > 0")


def client_cleanup(*, own: int, server: int, port: str, nonce: str) -> Meeting:
    """Withdraw a client's request, and its port's directory once empty.

    (A client that reaches many ports must not fill its domain's node quota.)
    """
    reqdir = request_dir(own, server, port)
    with contextlib.suppress(OSError):
        yield Rm(f"{reqdir}/{nonce}")
    with contextlib.suppress(OSError):
        yield from remove_if_empty(reqdir)


# -- drivers -----------------------------------------------------------------------------

# XenStore allows each domain only a few transactions at once (10 by
# default), shared by all its programs: a driver holds at most a few at a
# time, and on a conflict or an exhausted quota waits a little (jittered:
# many rings published at once into one directory conflict with each other).
# The retry policy is XenStore.transact's own, with the quota errors added.
TX_RETRY = TransactionRetry(retries=199, also=frozenset({errno.EAGAIN, errno.ENOSPC,
                                                         errno.EDQUOT}), max_delay=0.05)


def _step(meeting: Meeting, value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``meeting``: (True, its result) once it returns, else (False, next op)."""
    try:
        return False, (meeting.throw(error) if error is not None else meeting.send(value))
    except StopIteration as stop:
        return True, stop.value


def _invoke(target: Any, op: Op) -> Any:
    """Call the XenStore client (or transaction) method for ``op``."""
    if isinstance(op, Read):
        return target.read(op.path)
    if isinstance(op, Write):
        return target.write(op.path, op.value)
    if isinstance(op, Mkdir):
        return target.mkdir(op.path)
    if isinstance(op, Rm):
        return target.rm(op.path)
    if isinstance(op, Directory):
        return target.directory(op.path)
    if isinstance(op, GetPerms):
        return target.get_perms(op.path)
    if isinstance(op, SetPerms):
        return target.set_perms(op.path, op.perms)
    raise TypeError(f"not a XenStore operation inside a transaction: {op!r}")


async def run_async(meeting: Meeting, xs: Any, *,
                    changed: asyncio.Event | None = None,
                    tx_slots: asyncio.Semaphore | None = None) -> Any:
    """Drive ``meeting`` with the asyncio XenStore client ``xs``.

    ``changed`` is the event behind :class:`WaitChange` (set when the
    watched path changes, and initially); ``tx_slots`` bounds the
    transactions this connection holds at once.
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        done, op = _step(meeting, value, error)
        if done:
            return op
        value, error = None, None
        try:
            if isinstance(op, WaitChange):
                if changed is None:
                    raise RuntimeError("this meeting waits, but nothing is watched")
                await changed.wait()
                changed.clear()
            elif isinstance(op, Sleep):
                await asyncio.sleep(op.seconds)
            elif isinstance(op, Transaction):
                if tx_slots is None:
                    value = await _transaction_async(op, xs)
                else:
                    async with tx_slots:
                        value = await _transaction_async(op, xs)
            else:
                value = await _invoke(xs, op)
        except OSError as exc:
            error = exc


async def _transaction_async(op: Transaction, xs: Any) -> Any:
    async def attempt(tx: Any) -> Any:
        body = op.body()
        value: Any = None
        error: BaseException | None = None
        while True:
            done, inner = _step(body, value, error)
            if done:
                return inner
            value, error = None, None
            try:
                value = await _invoke(tx, inner)
            except OSError as exc:
                error = exc

    return await xs.transact(attempt, retry=TX_RETRY)


def run_sync(meeting: Meeting, xs: Any, *, wait: Callable[[], None] | None = None) -> Any:
    """Drive ``meeting`` with the blocking :class:`~vchan.xenstore.XenStoreSync`.

    ``wait()`` blocks until the watched path changes (it raises, e.g.
    ``TimeoutError``, to give up); the first :class:`WaitChange` returns at
    once.
    """
    value: Any = None
    error: BaseException | None = None
    first_wait = True
    while True:
        done, op = _step(meeting, value, error)
        if done:
            return op
        value, error = None, None
        try:
            if isinstance(op, WaitChange):
                if wait is None:
                    raise RuntimeError("this meeting waits, but nothing is watched")
                if not first_wait:
                    wait()
                first_wait = False
            elif isinstance(op, Sleep):
                time.sleep(op.seconds)
            elif isinstance(op, Transaction):
                value = _transaction_sync(op, xs)
            else:
                value = _invoke(xs, op)
        except OSError as exc:
            error = exc


def _transaction_sync(op: Transaction, xs: Any) -> Any:
    def attempt(tx: Any) -> Any:
        body = op.body()
        value: Any = None
        error: BaseException | None = None
        while True:
            done, inner = _step(body, value, error)
            if done:
                return inner
            value, error = None, None
            try:
                value = _invoke(tx, inner)
            except OSError as exc:
                error = exc

    return xs.transact(attempt, retry=TX_RETRY)
