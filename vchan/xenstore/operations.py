"""Each XenStore operation of the clients, written once, without I/O.

An operation is a generator (:data:`Call`): it *yields* the
:class:`Request` s it needs -- most one, DIRECTORY of a large node several
-- and is *sent* each reply's payload, or has the reply's ``OSError``
thrown into it; it returns the operation's result.  The asyncio client
awaits each request, the blocking client waits for it: two drivers
(:func:`async_method`, :func:`sync_method`) make the methods of both from
the same generator, and a transaction is a driver that runs every request
in its transaction id.  What is shared by the drivers' watches and
transactions (routing events, retrying a transaction) is here too.
"""

from __future__ import annotations

import errno
import functools
import itertools
import random
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, Protocol, TypeVar

from . import wire
from .wire import Op, Perm, TransactionConflict, WatchEvent

T = TypeVar("T")
P = ParamSpec("P")


class Request(NamedTuple):
    """One request to send: its type, payload, transaction and what errors name."""

    op: Op
    payload: bytes
    what: str               # for messages: "xenstore READ <what>: ENOENT"
    tx: int = 0


#: An operation: yields requests, is sent their replies, returns its result.
Call = Generator[Request, bytes, T]


class HasTxId(Protocol):
    @property
    def id(self) -> int: ...


TxArg = int | HasTxId


_tokens = itertools.count(1)


def next_token() -> str:
    """A token for a watch the caller did not name (unique in this process)."""
    return f"vchan-{next(_tokens)}"


def tx_id(tx: TxArg) -> int:
    return tx if isinstance(tx, int) else tx.id


def step(call: Call[T], reply: bytes | None, error: OSError | None) -> tuple[bool, Any]:
    """Resume ``call``: (True, its result) once it returns, else (False, next request)."""
    try:
        return False, (call.throw(error) if error is not None else call.send(reply))  # type: ignore[arg-type]
    except StopIteration as stop:
        return True, stop.value


# -- the operations ---------------------------------------------------------------------


def read(path: str, *, tx: TxArg = 0) -> Call[bytes]:
    """The value of ``path``."""
    return (yield Request(Op.READ, wire.arg(path), path, tx_id(tx)))


def write(path: str, value: bytes | str, *, tx: TxArg = 0) -> Call[None]:
    """Set ``path`` to ``value`` (creating it and missing parents)."""
    payload = wire.write_request(path, value)
    wire.expect_ok(Op.WRITE, path, (yield Request(Op.WRITE, payload, path, tx_id(tx))))


def mkdir(path: str, *, tx: TxArg = 0) -> Call[None]:
    """Make sure ``path`` exists (an existing value is left alone)."""
    wire.expect_ok(Op.MKDIR, path, (yield Request(Op.MKDIR, wire.arg(path), path, tx_id(tx))))


def rm(path: str, *, tx: TxArg = 0) -> Call[None]:
    """Remove ``path`` and everything below it (fine if it is not there)."""
    wire.expect_ok(Op.RM, path, (yield Request(Op.RM, wire.arg(path), path, tx_id(tx))))


def directory(path: str, *, tx: TxArg = 0) -> Call[list[str]]:
    """The names of the children of ``path``."""
    tx_ = tx_id(tx)
    try:
        return wire.reply_strings((yield Request(Op.DIRECTORY, wire.arg(path), path, tx_)))
    except OSError as exc:
        if exc.errno != errno.E2BIG:
            raise
    # Too many children for one reply: page through them, restarting
    # if the node changes under us (as libxenstore does).
    pager = wire.DirectoryPager()
    while True:
        payload = wire.directory_part_request(path, pager.offset)
        names = pager.feed((yield Request(Op.DIRECTORY_PART, payload, path, tx_)))
        if names is not None:
            return names


def get_perms(path: str, *, tx: TxArg = 0) -> Call[list[Perm]]:
    """The permission entries of ``path`` (owner first)."""
    return wire.decode_perms((yield Request(Op.GET_PERMS, wire.arg(path), path, tx_id(tx))))


def set_perms(path: str, perms: Iterable[Perm | str], *, tx: TxArg = 0) -> Call[None]:
    """Replace the permission entries of ``path``."""
    payload = wire.set_perms_request(path, perms)
    wire.expect_ok(Op.SET_PERMS, path, (yield Request(Op.SET_PERMS, payload, path, tx_id(tx))))


def get_domain_path(domid: int) -> Call[str]:
    """The home path of a domain, ``/local/domain/<domid>``."""
    what = str(domid)
    return wire.reply_string((yield Request(Op.GET_DOMAIN_PATH, wire.domid_request(domid), what)))


def watch(path: str, token: str) -> Call[None]:
    wire.expect_ok(Op.WATCH, path,
                   (yield Request(Op.WATCH, wire.watch_request(path, token), path)))


def unwatch(path: str, token: str) -> Call[None]:
    # The reply is not looked at: an unwatch that the daemon forgot already is fine.
    yield Request(Op.UNWATCH, wire.watch_request(path, token), path)


def transaction_start() -> Call[int]:
    return wire.decode_transaction_start((yield Request(Op.TRANSACTION_START, b"\0", "")))


def transaction_end(tx: int, commit: bool) -> Call[None]:
    what = "T" if commit else "F"
    reply = yield Request(Op.TRANSACTION_END, wire.transaction_end_request(commit), what, tx)
    wire.expect_ok(Op.TRANSACTION_END, what, reply)


def reset_watches() -> Call[None]:
    wire.expect_ok(Op.RESET_WATCHES, "", (yield Request(Op.RESET_WATCHES, b"\0", "")))


# -- the two drivers --------------------------------------------------------------------


class AsyncRunner(Protocol):
    async def _run(self, call: Call[T]) -> T: ...


class SyncRunner(Protocol):
    def _run(self, call: Call[T]) -> T: ...


def async_method(op: Callable[P, Call[T]]) -> Callable[Concatenate[AsyncRunner, P],
                                                        Coroutine[Any, Any, T]]:
    """The asyncio client's method for operation ``op`` (its signature and doc)."""
    @functools.wraps(op)
    async def method(self: AsyncRunner, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(op(*args, **kwargs))
    return method


def sync_method(op: Callable[P, Call[T]]) -> Callable[Concatenate[SyncRunner, P], T]:
    """The blocking client's method for operation ``op`` (its signature and doc)."""
    @functools.wraps(op)
    def method(self: SyncRunner, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(op(*args, **kwargs))
    return method


def in_transaction(call: Call[T], tx: int) -> Call[T]:
    """``call`` with every request in transaction ``tx`` (a transaction's driver)."""
    reply: bytes | None = None
    error: OSError | None = None
    while True:
        done, req = step(call, reply, error)
        if done:
            return req  # type: ignore[no-any-return]
        if req.tx not in (0, tx):
            raise ValueError("a transaction's operations run in that transaction")
        try:
            reply, error = (yield req._replace(tx=tx)), None
        except OSError as exc:
            reply, error = None, exc


# -- what both clients' watches and transactions share -----------------------------------


class _Watch(Protocol):
    path: str
    token: str


W = TypeVar("W", bound=_Watch)


class WatchTable(dict[str, list[W]], Generic[W]):
    """A connection's watches by token; routes each event to its watches."""

    def add(self, w: W) -> None:
        self.setdefault(w.token, []).append(w)

    def forget(self, w: W) -> None:
        group = self.get(w.token)
        if group and w in group:
            group.remove(w)
            if not group:
                del self[w.token]

    def take_all(self) -> list[W]:
        """Every watch, the table left empty."""
        everyone = [w for group in self.values() for w in group]
        self.clear()
        return everyone

    def route(self, payload: bytes) -> list[tuple[W, WatchEvent]]:
        """The watches a WATCH_EVENT goes to, each with the event (none: removed already)."""
        event = wire.decode_event(payload)
        group = self.get(event.token) if event is not None else None
        if event is None or not group:
            return []
        # Two watches may share a token: the one whose path the event is under.
        matching = [w for w in group if wire.watch_matches(w.path, event.path)] or group
        return [(w, event) for w in matching]


class TransactionState:
    """What both kinds of transaction keep: the id and whether it ended."""

    def __init__(self) -> None:
        self.id = 0
        self._done = False

    def __repr__(self) -> str:
        state = "done" if self._done else "open" if self.id else "not started"
        return f"<{type(self).__name__} {self.id} {state}>"

    def _live(self) -> int:
        if not self.id or self._done:
            raise ValueError("the transaction is not active")
        return self.id

    def _not_started(self) -> None:
        if self.id:
            raise ValueError("the transaction was started already")

    def _ending(self) -> int:
        tx = self._live()
        self._done = True
        return tx

    def _exit_action(self, failed: bool) -> str | None:
        """What leaving the ``with`` block does: "commit", "abort" or None."""
        if self._done or not self.id:
            return None
        return "abort" if failed else "commit"


@dataclass(frozen=True)
class TransactionRetry:
    """When a failed transaction is run again, and after how long.

    One policy for every transaction vchan runs (``XenStore.transact``,
    ``XenStoreSync.transact`` and the listener's meetings): a conflict at
    commit (:class:`TransactionConflict`) is always worth another attempt,
    the errnos of ``also`` too, up to ``retries`` reruns; before each, a
    random pause of up to 1 ms per attempt so far, at most ``max_delay``
    seconds, so that racing writers do not collide again in step.
    """

    retries: int = 16
    also: frozenset[int] = frozenset()
    max_delay: float = 0.01

    def pause(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before rerunning after failed ``attempt`` (from 0); None: raise."""
        if attempt >= self.retries:
            return None
        if not isinstance(exc, TransactionConflict) and \
                not (isinstance(exc, OSError) and exc.errno in self.also):
            return None
        return random.uniform(0, min(self.max_delay, 0.001 * (attempt + 1)))
