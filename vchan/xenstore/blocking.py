"""The blocking XenStore client: XenStoreSync, SyncWatch, SyncTransaction.

It drives the same operations as the asyncio client
(:mod:`vchan.xenstore.operations`) on a plain blocking descriptor: one
request at a time, watch events that arrive meanwhile queued for their
watches.  No event loop, no thread.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import select
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TypeVar

from . import operations as ops
from . import wire
from .endpoint import (
    EMULATOR_SLICE,
    Endpoint,
    copy_error,
    default_path,
    emulator_failure,
    lost_error,
)
from .operations import Call, TransactionRetry, TransactionState, WatchTable, sync_method
from .wire import Op, WatchEvent

T = TypeVar("T")


class SyncOperations:
    """The operations of a blocking connection, and of a transaction of one."""

    read = sync_method(ops.read)
    write = sync_method(ops.write)
    mkdir = sync_method(ops.mkdir)
    rm = sync_method(ops.rm)
    directory = sync_method(ops.directory)
    get_perms = sync_method(ops.get_perms)
    set_perms = sync_method(ops.set_perms)

    def _run(self, call: Call[T]) -> T:
        raise NotImplementedError


class XenStoreSync(SyncOperations):
    """A blocking XenStore connection for scripts: one request at a time.

    ``with XenStoreSync() as xs: xs.write("data/x", "1")``.  Thread-safe (a
    lock serialises requests).  ``timeout`` bounds every wait for a reply
    (None: wait forever).
    """

    def __init__(self, path: str | None = None, *, timeout: float | None = 30.0) -> None:
        self._ep: Endpoint | None = None
        endpoint = Endpoint(path if path is not None else default_path(), blocking=True)
        endpoint.connect_blocking()
        self._ep = endpoint
        self.path = endpoint.path
        self.timeout = timeout
        self._daemon = endpoint.emulator_daemon()
        self._framer = wire.Framer()
        self._watches: WatchTable[SyncWatch] = WatchTable()
        self._lock = threading.RLock()
        self._req_ids = itertools.count(1)
        self._error: ConnectionError | None = None

    def __repr__(self) -> str:
        state = "closed" if self._ep is None else "lost" if self._error else "open"
        return f"<XenStoreSync {self.path} {state}>"

    @property
    def closed(self) -> bool:
        return self._ep is None or self._error is not None

    def close(self) -> None:
        """Close the connection; its watches end."""
        with self._lock:
            if self._ep is not None:
                self._ep.close()
                self._ep = None
            for w in self._watches.take_all():
                w._ended = True

    def __enter__(self) -> XenStoreSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ep", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()

    def _fd(self) -> int:
        if self._ep is None:
            raise ValueError("xenstore connection is closed")
        if self._error is not None:
            raise copy_error(self._error)
        return self._ep.fd

    def _fail(self, err: ConnectionError) -> ConnectionError:
        self._error = err
        if self._ep is not None:
            self._ep.close()
        return err

    def _lost(self, why: str) -> ConnectionError:
        return self._fail(lost_error(self._daemon, self.path, why))

    def _read_message(self, deadline: float | None) -> wire.Message | None:
        """One message, or None when ``deadline`` passed first."""
        fd = self._fd()
        while True:
            try:
                msg = self._framer.next_message()
            except wire.ProtocolError as exc:
                raise self._lost(str(exc)) from None
            if msg is not None:
                return msg
            if deadline is not None or self._daemon is not None:
                # On the emulator, wait in slices and look at its daemon in
                # between: a stopped one would keep us here for ever.
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if self._daemon is not None:
                    left = EMULATOR_SLICE if left is None else min(left, EMULATOR_SLICE)
                assert left is not None
                poller = select.poll()  # not select(): descriptors may be >= 1024
                poller.register(fd, select.POLLIN)
                if not poller.poll(left * 1000):
                    failure = emulator_failure(self._daemon)
                    if failure is not None:
                        raise self._fail(failure)
                    if deadline is None or time.monotonic() < deadline:
                        continue
                    return None
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError as exc:
                raise self._lost(exc.strerror or str(exc)) from None
            if not data:
                raise self._lost("end of file")
            self._framer.feed(data)

    def _queue_event(self, payload: bytes) -> None:
        for w, event in self._watches.route(payload):
            w._events.append(event)

    def _request(self, op: Op, payload: bytes, what: str, tx: int = 0) -> bytes:
        """Send one request and wait for its reply's payload (an ERROR reply raises)."""
        wire.check_size(op, what, payload)
        with self._lock:
            fd = self._fd()
            req_id = next(self._req_ids) & 0xFFFFFFFF or 1
            message = wire.pack(op, req_id, tx, payload)
            try:
                view = memoryview(message)
                while view:             # one write per message (xenbus needs that)
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError as exc:
                raise self._lost(exc.strerror or str(exc)) from None
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while True:
                msg = self._read_message(deadline)
                if msg is None:
                    raise self._lost(f"no reply to {op.name} {what} within {self.timeout} s")
                if msg.type == Op.WATCH_EVENT:
                    self._queue_event(msg.payload)
                    continue
                if msg.req_id != req_id:
                    raise self._lost(f"reply to unknown request {msg.req_id}")
                if msg.type == Op.ERROR:
                    raise wire.xs_error(wire.decode_error(msg.payload), op, what)
                if msg.type != op:
                    raise self._lost(f"reply of type {msg.type} to a {op.name} request")
                return msg.payload

    def _run(self, call: Call[T]) -> T:
        """Drive one operation: each request it yields, sent and waited for."""
        reply: bytes | None = None
        error: OSError | None = None
        while True:
            done, req = ops.step(call, reply, error)
            if done:
                return req  # type: ignore[no-any-return]
            try:
                reply, error = self._request(*req), None
            except OSError as exc:
                reply, error = None, exc

    # -- operations (read, write, ... come from SyncOperations) ------------------

    get_domain_path = sync_method(ops.get_domain_path)

    def watch(self, path: str, token: str | None = None, *,
              timeout: float | None = None) -> SyncWatch:
        """Watch ``path``; iterate the result for events (see :class:`SyncWatch`)."""
        w = SyncWatch(self, path, token if token is not None else ops.next_token(), timeout)
        with self._lock:
            self._watches.add(w)
            try:
                self._run(ops.watch(path, w.token))
            except BaseException:
                self._watches.forget(w)
                raise
        return w

    def transaction(self) -> SyncTransaction:
        """A transaction as a context manager (commit on success, abort on error)."""
        return SyncTransaction(self)

    def transact(self, fn: Callable[[SyncTransaction], T], *, retries: int = 16,
                 retry: TransactionRetry | None = None) -> T:
        """Run ``fn(tx)`` in a transaction, rerunning it on a conflict
        (as :meth:`XenStore.transact <vchan.xenstore.XenStore.transact>`)."""
        policy = retry if retry is not None else TransactionRetry(retries)
        for attempt in itertools.count():
            try:
                with self.transaction() as tx:
                    result = fn(tx)
                return result
            except OSError as exc:
                pause = policy.pause(exc, attempt)
                if pause is None:
                    raise
            time.sleep(pause)
        raise AssertionError("unreachable")


class SyncWatch:
    """A watch of :class:`XenStoreSync`: an iterator of :class:`WatchEvent`.

    Iteration waits up to ``timeout`` seconds (None: forever) for each event
    and *ends* when none came in time; :meth:`wait` raises
    :class:`TimeoutError` instead.
    """

    def __init__(self, xs: XenStoreSync, path: str, token: str, timeout: float | None) -> None:
        self._xs = xs
        self.path = path
        self.token = token
        self.timeout = timeout
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._ended = False

    def __repr__(self) -> str:
        return f"<SyncWatch {self.path!r} token={self.token!r} queued={len(self._events)}>"

    def wait(self, timeout: float | None = None) -> WatchEvent:
        """The next event, waiting up to ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        xs = self._xs
        with xs._lock:
            while not self._events:
                if self._ended:
                    raise ValueError("the watch is closed")
                msg = xs._read_message(deadline)
                if msg is None:
                    raise TimeoutError(f"no xenstore event on {self.path} within {timeout} s")
                if msg.type != Op.WATCH_EVENT:
                    raise xs._lost(f"unexpected reply {msg.req_id} of type {msg.type}")
                xs._queue_event(msg.payload)
            return self._events.popleft()

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        if self._ended and not self._events:
            raise StopIteration
        try:
            return self.wait(self.timeout)
        except TimeoutError:
            raise StopIteration from None

    def close(self) -> None:
        """Remove the watch at XenStore."""
        if self._ended:
            return
        self._ended = True
        self._events.clear()
        xs = self._xs
        with xs._lock:
            xs._watches.forget(self)
            if not xs.closed:
                xs._run(ops.unwatch(self.path, self.token))

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncTransaction(TransactionState, SyncOperations):
    """Operations bound to one transaction of :class:`XenStoreSync`."""

    def __init__(self, xs: XenStoreSync) -> None:
        super().__init__()
        self._xs = xs

    def _run(self, call: Call[T]) -> T:
        return self._xs._run(ops.in_transaction(call, self._live()))

    def start(self) -> SyncTransaction:
        self._not_started()
        self.id = self._xs._run(ops.transaction_start())
        return self

    def commit(self) -> None:
        """Commit; :class:`TransactionConflict` if another change got in the way."""
        self._xs._run(ops.transaction_end(self._ending(), True))

    def abort(self) -> None:
        """Throw the transaction's changes away."""
        self._xs._run(ops.transaction_end(self._ending(), False))

    def __enter__(self) -> SyncTransaction:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        action = self._exit_action(exc_type is not None)
        if action == "commit":
            self.commit()
        elif action == "abort":
            with contextlib.suppress(OSError, ValueError):
                self.abort()            # the original exception matters more
