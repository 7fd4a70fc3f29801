"""The asyncio XenStore client: :class:`XenStore`, :class:`Watch`, :class:`Transaction`.

It drives the operations of :mod:`vchan.xenstore.operations` over a
non-blocking descriptor registered with the loop: many requests in flight,
replies paired by ``req_id``, watch events routed by token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as _errno
import itertools
import os
import warnings
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from . import operations as ops
from . import wire
from .endpoint import Endpoint, copy_error, default_path, lost_error
from .operations import Call, TransactionRetry, TransactionState, WatchTable, async_method
from .wire import Op, WatchEvent

T = TypeVar("T")


class AsyncOperations:
    """The operations of a connection, and of a transaction of one."""

    read = async_method(ops.read)
    write = async_method(ops.write)
    mkdir = async_method(ops.mkdir)
    rm = async_method(ops.rm)
    directory = async_method(ops.directory)
    get_perms = async_method(ops.get_perms)
    set_perms = async_method(ops.set_perms)

    async def _run(self, call: Call[T]) -> T:
        raise NotImplementedError


class XenStore(AsyncOperations):
    """An asyncio XenStore connection; many requests may be in flight at once.

    (On a socket.  On ``/dev/xen/xenbus`` one at a time, as libxenstore
    does: Linux's xenbus device keeps a request's payload in one buffer per
    open file until its thread has sent it, so a second request written
    meanwhile replaces the first one's payload -- seen on real Xen as wrong
    answers and EINVAL.)

    Open with ``await XenStore.open()`` (or ``async with await
    XenStore.open() as xs``) and close with :meth:`close`.
    """

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        """Use :meth:`open`."""
        self._ep = endpoint
        self.path = endpoint.path
        self._loop = loop
        self._framer = wire.Framer()
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], Op, str]] = {}
        self._watches: WatchTable[Watch] = WatchTable()
        self._wqueue: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._req_ids = itertools.count(1)
        self._error: ConnectionError | None = None
        # The xenbus device: the request in flight, if any (see the class doc).
        self._one_at_a_time = None if endpoint.is_socket else asyncio.Lock()
        self._closed = False
        self._fd = endpoint.fd
        self._daemon = endpoint.emulator_daemon()
        #: Called with the error when the connection is lost or aborted.
        self.on_lost: Callable[[ConnectionError], None] | None = None
        # The loop holds only a weak reference: a leaked connection is
        # collected (and warns) instead of living as long as the loop.
        loop.add_reader(self._fd, _call_weak, weakref.ref(self), XenStore._on_readable)

    @classmethod
    async def open(cls, path: str | None = None) -> XenStore:
        """Connect to XenStore at ``path``, or where :func:`default_path` says."""
        loop = asyncio.get_running_loop()
        if path is None:
            # Asking the emulator (maybe starting it) blocks: not on the loop.
            path = os.environ.get("XENSTORED_PATH") or await asyncio.to_thread(default_path)
        assert path is not None
        endpoint = Endpoint(path, blocking=False)
        await endpoint.connect_async(loop)
        return cls(endpoint, loop)

    # -- state -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once closed or lost."""
        return self._closed or self._error is not None

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the emulator daemon behind this connection (None elsewhere)."""
        return self._daemon[0] if self._daemon is not None and self._daemon[0] else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self._error else "open"
        return (f"<XenStore {self.path} {state} pending={len(self._pending)} "
                f"watches={sum(len(w) for w in self._watches.values())}>")

    async def close(self) -> None:
        """Close the connection; pending requests fail, watches end."""
        if self._closed:
            return
        self._closed = True
        self._teardown(ConnectionAbortedError(
            _errno.ECONNABORTED, f"xenstore connection to {self.path} was closed"), lost=False)

    async def __aenter__(self) -> XenStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) or getattr(self, "_ep", None) is None:
            return
        if self._ep.fd >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            try:
                self._loop.remove_reader(self._fd)
                if self._writing:
                    self._loop.remove_writer(self._fd)
            except Exception:       # the loop may be closed already
                pass
            self._ep.close()

    def _teardown(self, err: ConnectionError, *, lost: bool) -> None:
        if self._ep.fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False
            self._ep.close()
        self._wqueue.clear()
        pending, self._pending = self._pending, {}
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(copy_error(err))
        for w in self._watches.take_all():
            w._finish(err if lost else None)

    def _lost(self, why: str) -> None:
        if self._closed or self._error is not None:
            return
        self.abort(lost_error(self._daemon, self.path, why))

    def abort(self, err: ConnectionError) -> None:
        """End the connection at once: pending requests and watches fail with
        ``err`` (a copy each), as do later requests.  What the owner of a
        connection does when it learns the daemon is gone or stopped."""
        if self._closed or self._error is not None:
            return
        self._error = err
        self._teardown(err, lost=True)
        if self.on_lost is not None:
            self.on_lost(err)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("xenstore connection is closed")
        if self._error is not None:
            raise copy_error(self._error)

    # -- I/O -------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc.strerror or str(exc))
            return
        if not data:
            self._lost("end of file")
            return
        self._framer.feed(data)
        while True:
            try:
                msg = self._framer.next_message()
            except wire.ProtocolError as exc:
                self._lost(str(exc))
                return
            if msg is None:
                return
            if msg.type == Op.WATCH_EVENT:
                for w, event in self._watches.route(msg.payload):
                    w._deliver(event)
                continue
            entry = self._pending.pop(msg.req_id, None)
            if entry is None:
                self._lost(f"reply to unknown request {msg.req_id}")
                return
            fut, op, what = entry
            if fut.done():          # the caller gave up (cancelled)
                continue
            if msg.type == Op.ERROR:
                fut.set_exception(wire.xs_error(wire.decode_error(msg.payload), op, what))
            elif msg.type != op:
                self._pending[msg.req_id] = entry
                self._lost(f"reply of type {msg.type} to a {op.name} request")
                return
            else:
                fut.set_result((msg.type, msg.payload))

    def _write(self, message: bytes) -> None:
        if self._wqueue:
            self._wqueue.append(message)
            return
        try:
            n = os.write(self._fd, message)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._lost(exc.strerror or str(exc))
            return
        if n < len(message):
            self._wqueue.append(message[n:])
            self._loop.add_writer(self._fd, _call_weak, weakref.ref(self), XenStore._on_writable)
            self._writing = True

    def _on_writable(self) -> None:
        while self._wqueue:
            if self._ep.is_socket and len(self._wqueue) > 1:
                # A socket takes any bytes; the xenbus device only one message per write.
                chunk = b"".join(self._wqueue)
                self._wqueue.clear()
                self._wqueue.append(chunk)
            head = self._wqueue[0]
            try:
                n = os.write(self._fd, head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                return
            if n < len(head):
                self._wqueue[0] = head[n:]
                return
            self._wqueue.popleft()
        self._loop.remove_writer(self._fd)
        self._writing = False

    def _next_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            if req_id and req_id not in self._pending:
                return req_id
            if req_id == 0:
                self._req_ids = itertools.count(1)

    async def _request(self, op: Op, payload: bytes, what: str, tx: int = 0) -> bytes:
        """Send one request; its reply's payload (an ERROR reply raises)."""
        self._check_open()
        wire.check_size(op, what, payload)
        lock = self._one_at_a_time
        if lock is not None:
            await lock.acquire()
        try:
            self._check_open()
            req_id = self._next_req_id()
            fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
            self._pending[req_id] = (fut, op, what)
            self._write(wire.pack(op, req_id, tx, payload))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            # Released once the reply is in, even if our caller gives up
            # before: until then the device still holds this request.
            fut.add_done_callback(lambda _: lock.release())
        _, reply = await asyncio.shield(fut) if lock is not None else await fut
        return reply

    async def _run(self, call: Call[T]) -> T:
        """Drive one operation: each request it yields, sent and awaited."""
        reply: bytes | None = None
        error: OSError | None = None
        while True:
            done, req = ops.step(call, reply, error)
            if done:
                return req  # type: ignore[no-any-return]
            try:
                reply, error = await self._request(*req), None
            except OSError as exc:
                reply, error = None, exc

    # -- operations (read, write, ... come from AsyncOperations) -----------------

    get_domain_path = async_method(ops.get_domain_path)

    async def watch(self, path: str, token: str | None = None) -> Watch:
        """Watch ``path`` and everything below it.

        The returned :class:`Watch` yields a :class:`WatchEvent` whenever
        something at or below ``path`` is created, changed or removed -- and
        once at once, as XenStore fires every new watch.
        """
        self._check_open()
        w = Watch(self, path, token if token is not None else ops.next_token())
        self._watches.add(w)    # before asking: the first event may beat the reply
        try:
            await self._run(ops.watch(path, w.token))
        except BaseException:
            self._watches.forget(w)
            raise
        return w

    async def _unwatch(self, w: Watch) -> None:
        self._watches.forget(w)
        if self.closed:
            return
        await self._run(ops.unwatch(w.path, w.token))

    def transaction(self) -> Transaction:
        """A transaction: ``async with xs.transaction() as tx: await tx.write(...)``.

        It commits on a clean exit and aborts on an exception; a commit that
        lost a race raises :class:`TransactionConflict` (see :meth:`transact`).
        """
        return Transaction(self)

    async def transact(self, fn: Callable[[Transaction], Awaitable[T]], *,
                       retries: int = 16, retry: TransactionRetry | None = None) -> T:
        """Run ``await fn(tx)`` in a transaction, rerunning it on a conflict.

        Returns what ``fn`` returned from the attempt that committed; raises
        :class:`TransactionConflict` after ``retries`` conflicting reruns.
        ``retry`` replaces that policy (:class:`TransactionRetry`).
        """
        policy = retry if retry is not None else TransactionRetry(retries)
        for attempt in itertools.count():
            try:
                async with self.transaction() as tx:
                    result = await fn(tx)
                return result
            except OSError as exc:
                pause = policy.pause(exc, attempt)
                if pause is None:
                    raise
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def reset_watches(self) -> None:
        """Drop every watch and transaction of this connection at XenStore.

        Every :class:`Watch` of the connection ends.
        """
        await self._run(ops.reset_watches())
        for w in self._watches.take_all():
            w._finish(None)


def _call_weak(ref: weakref.ref[XenStore], method: Callable[[XenStore], None]) -> None:
    xs = ref()
    if xs is not None:
        method(xs)


class Watch:
    """A registered watch: an async iterator of :class:`WatchEvent`.

    Events are never dropped: they queue until read.  Iteration ends after
    :meth:`close` (or after the connection was closed); it raises
    :class:`ConnectionResetError` once the queued events are read if the
    connection was lost.
    """

    def __init__(self, xs: XenStore, path: str, token: str) -> None:
        self._xs = xs
        self.path = path
        self.token = token
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: ConnectionError | None = None

    def __repr__(self) -> str:
        state = "closed" if self._ended else "active"
        return f"<Watch {self.path!r} token={self.token!r} {state} queued={len(self._events)}>"

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _deliver(self, event: WatchEvent) -> None:
        if not self._ended:
            self._events.append(event)
            self._wake()

    def _finish(self, error: ConnectionError | None) -> None:
        self._ended = True
        self._error = error
        self._wake()

    def pending(self) -> int:
        """How many events are queued, unread."""
        return len(self._events)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._events:
            if self._error is not None:
                raise copy_error(self._error)
            if self._ended:
                raise StopAsyncIteration
            self._waiter = self._xs._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    async def close(self) -> None:
        """Remove the watch at XenStore; iteration ends (queued events are dropped)."""
        if self._ended:
            return
        self._ended = True
        self._events.clear()
        self._wake()
        await self._xs._unwatch(self)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Transaction(TransactionState, AsyncOperations):
    """Operations bound to one XenStore transaction (see :meth:`XenStore.transaction`)."""

    def __init__(self, xs: XenStore) -> None:
        super().__init__()
        self._xs = xs

    async def _run(self, call: Call[T]) -> T:
        return await self._xs._run(ops.in_transaction(call, self._live()))

    async def start(self) -> Transaction:
        """Start the transaction (``async with`` does this)."""
        self._not_started()
        self.id = await self._xs._run(ops.transaction_start())
        return self

    async def commit(self) -> None:
        """Commit; :class:`TransactionConflict` if another change got in the way."""
        await self._xs._run(ops.transaction_end(self._ending(), True))

    async def abort(self) -> None:
        """Throw the transaction's changes away."""
        await self._xs._run(ops.transaction_end(self._ending(), False))

    async def __aenter__(self) -> Transaction:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        action = self._exit_action(exc_type is not None)
        if action == "commit":
            await self.commit()
        elif action == "abort":
            with contextlib.suppress(OSError, ValueError):
                await self.abort()      # the original exception matters more
