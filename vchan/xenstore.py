"""A XenStore client: the wire protocol over a socket, ``/dev/xen/xenbus`` or the emulator.

THEORY OF OPERATION
===================

Every message either way is a 16-byte header ``{u32 type, req_id, tx_id,
len}`` (native byte order, i.e. little-endian on every platform Xen runs
vchan on) followed by ``len <= 4096`` bytes of payload
(``xen/io/xs_wire.h``).  Requests carry NUL-terminated strings; a reply
echoes the request's ``type``, ``req_id`` and ``tx_id``, or has type
``XS_ERROR`` and the *name* of an errno (``"ENOENT"``).  XenStore also sends
unsolicited ``XS_WATCH_EVENT`` messages (``path\\0token\\0``, ``req_id`` 0)
whenever a watched node changes -- once straight away when the watch is set.

* :class:`XenStore` (asyncio) keeps any number of requests in flight on one
  connection and pairs replies by ``req_id``; watch events go to the
  :class:`Watch` registered under their token (an async iterator of
  :class:`WatchEvent`).  If the connection dies, every pending request and
  every watch fails with :class:`ConnectionResetError` naming xenstore.
* :class:`XenStoreSync` is the blocking twin for scripts: one request at a
  time on a plain blocking descriptor, watch events queued while it waits.
* On the emulated hypervisor (a socket ``<dir>/xenstore/<domid>.sock``) the
  daemon behind the socket is a process that can die or be stopped: a
  connection lost because it died, and a blocking wait on a stopped one,
  fail with :class:`vchan.sim.EmulatorError` naming it.
  :meth:`XenStore.abort` fails a connection with an error of the caller's.
* Errors are :class:`OSError` with the errno XenStore named, so Python picks
  the subclass (``FileNotFoundError``, ``PermissionError``, ...), and the
  message ``"xenstore READ /path: ENOENT"``.  A transaction that loses a
  race raises :class:`TransactionConflict` at commit; :meth:`XenStore.transact`
  reruns the whole transaction then.

Where the daemon is (``path=None``): ``$XENSTORED_PATH``; else, under the
emulated hypervisor (``vchan.backend.default_backend_name() == "sim"``), the
emulator's socket for this process's domain ``$VCHAN_DOMID``; else
``/var/run/xenstored/socket`` when it exists (dom0); else
``/dev/xen/xenbus`` (a guest).  A path that is a socket is connected to;
anything else is opened as the xenbus character device, on which every
``write()`` must carry exactly one message (the kernel drops the rest).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as _errno
import itertools
import os
import select
import socket
import stat
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import ClassVar, Literal, NamedTuple, TypeVar

__all__ = [
    "ABS_PATH_MAX",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "Op",
    "Perm",
    "SyncTransaction",
    "SyncWatch",
    "Transaction",
    "TransactionConflict",
    "Watch",
    "WatchEvent",
    "XenStore",
    "XenStoreSync",
    "default_path",
    "error_name",
    "error_number",
]

# -- the wire contract (xen/io/xs_wire.h) ------------------------------------


class Op(IntEnum):
    """Message types (``enum xsd_sockmsg_type``)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


HEADER = struct.Struct("=IIII")
PAYLOAD_MAX = 4096          # XENSTORE_PAYLOAD_MAX, both directions
ABS_PATH_MAX = 3072         # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048         # XENSTORE_REL_PATH_MAX
DOMID_SELF = 0x7FF0

#: ``xsd_errors`` in xs_wire.h, in its order: the names XenStore sends.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
_BY_NAME: dict[str, int] = {name: getattr(_errno, name) for name in XSD_ERRORS}
_BY_NUMBER = {num: name for name, num in _BY_NAME.items()}


def error_number(name: str) -> int:
    """The errno for a XenStore error name (unknown names mean EINVAL, as in libxenstore)."""
    return _BY_NAME.get(name, _errno.EINVAL)


def error_name(number: int) -> str:
    """The XenStore error name for an errno (EINVAL for one XenStore cannot send)."""
    return _BY_NUMBER.get(number, "EINVAL")


def _xs_error(err: int, op: Op | str, what: str) -> OSError:
    name = op.name if isinstance(op, Op) else op
    text = f"xenstore {name} {what}: {error_name(err)}" if what else \
        f"xenstore {name}: {error_name(err)}"
    if err == _errno.EAGAIN and name == Op.TRANSACTION_END.name:
        return TransactionConflict(err, text)
    return OSError(err, text)


class TransactionConflict(OSError):
    """A transaction lost a race (EAGAIN at commit): run it again."""


PermLetter = Literal["n", "r", "w", "b"]
_PERM_LETTERS = ("n", "r", "w", "b")


@dataclass(frozen=True)
class Perm:
    """One permission entry of a node: ``domid`` may ``perm``.

    ``perm`` is ``"n"`` (none), ``"r"`` (read), ``"w"`` (write) or ``"b"``
    (both).  The first entry of a node names its owner (who may always do
    everything) and, by its ``perm``, what every domain not listed after it
    may do.  On the wire an entry is the letter then the decimal domid:
    ``"r5"``.
    """

    domid: int
    perm: PermLetter = "n"

    def __post_init__(self) -> None:
        if self.perm not in _PERM_LETTERS:
            raise ValueError(f"permission must be one of n, r, w, b; got {self.perm!r}")
        if isinstance(self.domid, bool) or not isinstance(self.domid, int) \
                or not 0 <= self.domid <= 0xFFFF:
            raise ValueError(f"permission domid must be an int in 0..65535, got {self.domid!r}")

    @property
    def can_read(self) -> bool:
        return self.perm in ("r", "b")

    @property
    def can_write(self) -> bool:
        return self.perm in ("w", "b")

    def to_wire(self) -> str:
        """The wire form, e.g. ``"r5"``."""
        return f"{self.perm}{self.domid}"

    @classmethod
    def from_wire(cls, text: str) -> Perm:
        """Parse the wire form (``"b0"``, ``"n12"``); ValueError if malformed."""
        digits = text[1:]
        if text[:1] not in _PERM_LETTERS or not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"malformed XenStore permission {text!r}")
        letter: PermLetter = text[0]  # type: ignore[assignment]
        return cls(int(text[1:]), letter)

    def __str__(self) -> str:
        return self.to_wire()


class WatchEvent(NamedTuple):
    """One watch firing: the node that changed and the watch's token."""

    path: str
    token: str


def _strings(payload: bytes) -> list[str]:
    """NUL-terminated strings of a payload (a trailing unterminated part counts too)."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _arg(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"XenStore strings cannot contain NUL: {text!r}")
    return raw + b"\0"


def _value(value: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _perms_payload(path: str, perms: Iterable[Perm | str]) -> bytes:
    entries = [p if isinstance(p, Perm) else Perm.from_wire(p) for p in perms]
    if not entries:
        raise ValueError("a node needs at least one permission entry (its owner)")
    return _arg(path) + b"".join(_arg(p.to_wire()) for p in entries)


def _check_size(op: Op, what: str, payload: bytes) -> None:
    if len(payload) > PAYLOAD_MAX:
        # As libxenstore: never send what xenstored would kill us for.
        raise OSError(_errno.E2BIG, f"xenstore {op.name} {what}: E2BIG "
                                    f"({len(payload)} bytes > {PAYLOAD_MAX})")


def _ok(op: Op, what: str, payload: bytes) -> None:
    if payload.rstrip(b"\0") != b"OK":
        raise _protocol(f"{op.name} {what}: expected OK, got {payload[:40]!r}")


def _protocol(why: str) -> ConnectionResetError:
    return ConnectionResetError(_errno.ECONNRESET, f"xenstore protocol error: {why}")


def _tx_id(tx: int | Transaction | SyncTransaction) -> int:
    return tx if isinstance(tx, int) else tx.id


def _parse_directory_part(payload: bytes) -> tuple[str, bytes]:
    gen, _, rest = payload.partition(b"\0")
    return gen.decode("ascii", "replace"), rest


def _page(names: bytearray, reply: bytes, gen0: list[str]) -> bool | None:
    """Fold one XS_DIRECTORY_PART reply into ``names``.

    Returns True when the list is complete, False to ask for more, None when
    the node changed meanwhile (start again).  A reply is ``gen\\0`` then
    NUL-terminated names, with one more NUL after the last name of the list.
    """
    gen, chunk = _parse_directory_part(reply)
    if not gen0:
        gen0.append(gen)
    elif gen != gen0[0]:
        names.clear()
        gen0.clear()
        return None
    if chunk in (b"", b"\0"):
        return True
    if chunk.endswith(b"\0\0"):
        names += chunk[:-1]
        return True
    names += chunk
    return False


# -- where the daemon is -------------------------------------------------------

_EMULATOR_SLICE = 0.05      # a blocking wait looks at the emulator's daemon this often

XENSTORED_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"


def default_path() -> str:
    """Where XenStore is for this process (see the module docstring).

    Under the emulator this may start the emulator and asks it for the
    socket of this process's domain; it blocks meanwhile.
    """
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    from .backend import BackendError, _sim_domid, default_backend_name

    if default_backend_name() == "sim":
        from . import sim

        try:
            domid = _sim_domid()
            directory = sim.ensure_running()
            answer = sim.control({"cmd": "xenstore-socket", "domid": domid}, directory)
        except sim.EmulatorError:
            raise                   # there but stopped or silent: it says so itself
        except (BackendError, sim.SimError) as exc:
            raise ConnectionRefusedError(
                _errno.ECONNREFUSED, f"xenstore: the emulator cannot be reached: {exc}") from exc
        return str(answer["path"])
    if os.path.exists(XENSTORED_SOCKET):
        return XENSTORED_SOCKET
    return XENBUS_DEVICE


def _emulator_daemon(endpoint: _Endpoint) -> tuple[int, str] | None:
    """(pid, state directory) when ``endpoint`` is connected to the vchan
    emulator's xenstored (``<dir>/xenstore/<domid>.sock`` beside
    ``<dir>/hypervisor.sock``); else None."""
    if endpoint._sock is None:
        return None
    where = os.path.dirname(os.path.abspath(endpoint.path))
    if os.path.basename(where) != "xenstore":
        return None
    directory = os.path.dirname(where)
    if not os.path.exists(os.path.join(directory, "hypervisor.sock")):
        return None
    from .sim import peer_pid

    return peer_pid(endpoint._sock), directory


def _emulator_failure(daemon: tuple[int, str] | None) -> ConnectionError | None:
    """The emulator's failure, if its daemon (see above) is gone or stopped."""
    if daemon is None:
        return None
    from .sim import daemon_state, emulator_error

    state = daemon_state(daemon[0])
    return emulator_error(state, daemon[0], daemon[1]) if state else None


class _Endpoint:
    """An open descriptor to XenStore: a Unix socket or the xenbus device."""

    def __init__(self, path: str, *, blocking: bool) -> None:
        self.path = path
        self.fd = -1
        self._sock: socket.socket | None = None
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise OSError(exc.errno, f"xenstore: cannot reach {path}: {exc.strerror}") from None
        self.is_socket = stat.S_ISSOCK(mode)
        if self.is_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(blocking)
            self._sock = sock
            self.fd = sock.fileno()
            return
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | (0 if blocking else os.O_NONBLOCK)
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise OSError(exc.errno, f"xenstore: cannot open {path}: {exc.strerror}") from None

    def _connect_failed(self, exc: OSError) -> OSError:
        self.close()
        return OSError(exc.errno, f"xenstore: cannot connect to {self.path}: {exc.strerror}")

    def connect_blocking(self) -> None:
        if self._sock is not None:
            try:
                self._sock.connect(self.path)
            except OSError as exc:
                raise self._connect_failed(exc) from None

    async def connect_async(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is not None:
            try:
                await loop.sock_connect(self._sock, self.path)
            except OSError as exc:
                raise self._connect_failed(exc) from None
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Release the descriptor (idempotent); ``fd`` becomes -1."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        else:
            os.close(fd)


class _Framer:
    """Splits a byte stream into (type, req_id, tx_id, payload) messages."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self.buf += data
        out = []
        pos = 0
        buf = self.buf
        while len(buf) - pos >= HEADER.size:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > PAYLOAD_MAX:
                raise _protocol(f"message of {length} bytes (more than {PAYLOAD_MAX})")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            out.append((mtype, req_id, tx_id, bytes(buf[pos + HEADER.size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def has_message(self) -> bool:
        if len(self.buf) < HEADER.size:
            return False
        length: int = HEADER.unpack_from(self.buf)[3]
        return len(self.buf) >= HEADER.size + length


def _watch_matches(watch_path: str, event_path: str) -> bool:
    if event_path == watch_path or watch_path == "/":
        return True
    return event_path.startswith(watch_path + "/")


T = TypeVar("T")


# -- asyncio ---------------------------------------------------------------------


W = TypeVar("W", bound="Watch | SyncWatch")


def _forget_watch(table: dict[str, list[W]], w: W) -> None:
    """Drop watch ``w`` from a token -> watches table (both clients keep one)."""
    group = table.get(w.token)
    if group and w in group:
        group.remove(w)
        if not group:
            del table[w.token]


class XenStore:
    """An asyncio XenStore connection; many requests may be in flight at once.

    (On a socket.  On ``/dev/xen/xenbus`` one at a time, as libxenstore
    does: Linux's xenbus device keeps a request's payload in one buffer per
    open file until its thread has sent it, so a second request written
    meanwhile replaces the first one's payload -- seen on real Xen as wrong
    answers and EINVAL.)

    Open with ``await XenStore.open()`` (or ``async with await
    XenStore.open() as xs``) and close with :meth:`close`.
    """

    _tokens: ClassVar[itertools.count[int]] = itertools.count(1)

    def __init__(self, endpoint: _Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        """Use :meth:`open`."""
        self._ep = endpoint
        self.path = endpoint.path
        self._loop = loop
        self._framer = _Framer()
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], Op, str]] = {}
        self._watches: dict[str, list[Watch]] = {}
        self._wqueue: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._req_ids = itertools.count(1)
        self._error: ConnectionError | None = None
        # The xenbus device: the request in flight, if any (see the class doc).
        self._one_at_a_time = None if endpoint.is_socket else asyncio.Lock()
        self._closed = False
        self._fd = endpoint.fd
        self._daemon = _emulator_daemon(endpoint)
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
        endpoint = _Endpoint(path, blocking=False)
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
                fut.set_exception(_copy_error(err))
        watches, self._watches = self._watches, {}
        for group in watches.values():
            for w in group:
                w._finish(err if lost else None)

    def _lost(self, why: str) -> None:
        if self._closed or self._error is not None:
            return
        err = _emulator_failure(self._daemon) or ConnectionResetError(
            _errno.ECONNRESET, f"xenstore connection to {self.path} lost: {why}")
        self.abort(err)

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
            raise _copy_error(self._error)

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
        try:
            messages = self._framer.feed(data)
        except ConnectionResetError as exc:
            self._lost(str(exc))
            return
        for mtype, req_id, _tx, payload in messages:
            if mtype == Op.WATCH_EVENT:
                self._on_event(payload)
                continue
            entry = self._pending.pop(req_id, None)
            if entry is None:
                self._lost(f"reply to unknown request {req_id}")
                return
            fut, op, what = entry
            if fut.done():          # the caller gave up (cancelled)
                continue
            if mtype == Op.ERROR:
                fut.set_exception(_xs_error(error_number(payload.rstrip(b"\0").decode(
                    "ascii", "replace")), op, what))
            elif mtype != op:
                self._pending[req_id] = entry
                self._lost(f"reply of type {mtype} to a {op.name} request")
                return
            else:
                fut.set_result((mtype, payload))

    def _on_event(self, payload: bytes) -> None:
        parts = _strings(payload)
        if len(parts) < 2:
            return
        event = WatchEvent(parts[0], parts[1])
        group = self._watches.get(event.token)
        if not group:
            return              # a watch we already removed
        matching = [w for w in group if _watch_matches(w.path, event.path)] or group
        for w in matching:
            w._deliver(event)

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
        self._check_open()
        _check_size(op, what, payload)
        lock = self._one_at_a_time
        if lock is not None:
            await lock.acquire()
        try:
            self._check_open()
            req_id = self._next_req_id()
            fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
            self._pending[req_id] = (fut, op, what)
            self._write(HEADER.pack(op, req_id, tx, len(payload)) + payload)
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

    # -- operations ------------------------------------------------------------

    async def read(self, path: str, *, tx: int | Transaction = 0) -> bytes:
        """The value of ``path``."""
        return await self._request(Op.READ, _arg(path), path, _tx_id(tx))

    async def write(self, path: str, value: bytes | str, *, tx: int | Transaction = 0) -> None:
        """Set ``path`` to ``value`` (creating it and missing parents)."""
        payload = _arg(path) + _value(value)
        _ok(Op.WRITE, path, await self._request(Op.WRITE, payload, path, _tx_id(tx)))

    async def mkdir(self, path: str, *, tx: int | Transaction = 0) -> None:
        """Make sure ``path`` exists (an existing value is left alone)."""
        _ok(Op.MKDIR, path, await self._request(Op.MKDIR, _arg(path), path, _tx_id(tx)))

    async def rm(self, path: str, *, tx: int | Transaction = 0) -> None:
        """Remove ``path`` and everything below it (fine if it is not there)."""
        _ok(Op.RM, path, await self._request(Op.RM, _arg(path), path, _tx_id(tx)))

    async def directory(self, path: str, *, tx: int | Transaction = 0) -> list[str]:
        """The names of the children of ``path``."""
        tx_id = _tx_id(tx)
        try:
            return _strings(await self._request(Op.DIRECTORY, _arg(path), path, tx_id))
        except OSError as exc:
            if exc.errno != _errno.E2BIG:
                raise
        # Too many children for one reply: page through them, restarting
        # if the node changes under us (as libxenstore does).
        names = bytearray()
        gen0: list[str] = []
        while True:
            reply = await self._request(Op.DIRECTORY_PART,
                                        _arg(path) + _arg(str(len(names))), path, tx_id)
            if _page(names, reply, gen0):
                return _strings(bytes(names))

    async def get_perms(self, path: str, *, tx: int | Transaction = 0) -> list[Perm]:
        """The permission entries of ``path`` (owner first)."""
        reply = await self._request(Op.GET_PERMS, _arg(path), path, _tx_id(tx))
        try:
            return [Perm.from_wire(s) for s in _strings(reply)]
        except ValueError as exc:
            raise _protocol(str(exc)) from None

    async def set_perms(self, path: str, perms: Iterable[Perm | str], *,
                        tx: int | Transaction = 0) -> None:
        """Replace the permission entries of ``path``."""
        payload = _perms_payload(path, perms)
        _ok(Op.SET_PERMS, path, await self._request(Op.SET_PERMS, payload, path, _tx_id(tx)))

    async def get_domain_path(self, domid: int) -> str:
        """The home path of a domain, ``/local/domain/<domid>``."""
        reply = await self._request(Op.GET_DOMAIN_PATH, _arg(str(domid)), str(domid))
        return reply.rstrip(b"\0").decode("utf-8", "surrogateescape")

    async def watch(self, path: str, token: str | None = None) -> Watch:
        """Watch ``path`` and everything below it.

        The returned :class:`Watch` yields a :class:`WatchEvent` whenever
        something at or below ``path`` is created, changed or removed -- and
        once at once, as XenStore fires every new watch.
        """
        self._check_open()
        token = token if token is not None else f"vchan-{next(XenStore._tokens)}"
        w = Watch(self, path, token)
        group = self._watches.setdefault(token, [])
        group.append(w)     # before asking: the first event may beat the reply
        try:
            _ok(Op.WATCH, path, await self._request(Op.WATCH, _arg(path) + _arg(token), path))
        except BaseException:
            self._forget(w)
            raise
        return w

    def _forget(self, w: Watch) -> None:
        _forget_watch(self._watches, w)

    async def _unwatch(self, w: Watch) -> None:
        self._forget(w)
        if self.closed:
            return
        await self._request(Op.UNWATCH, _arg(w.path) + _arg(w.token), w.path)

    def transaction(self) -> Transaction:
        """A transaction: ``async with xs.transaction() as tx: await tx.write(...)``.

        It commits on a clean exit and aborts on an exception; a commit that
        lost a race raises :class:`TransactionConflict` (see :meth:`transact`).
        """
        return Transaction(self)

    async def transact(self, fn: Callable[[Transaction], Awaitable[T]], *,
                       retries: int = 16) -> T:
        """Run ``await fn(tx)`` in a transaction, rerunning it on a conflict.

        Returns what ``fn`` returned from the attempt that committed; raises
        :class:`TransactionConflict` after ``retries`` conflicting reruns.
        """
        for attempt in itertools.count():
            try:
                async with self.transaction() as tx:
                    result = await fn(tx)
                return result
            except TransactionConflict:
                if attempt >= retries:
                    raise
                await asyncio.sleep(0.001 * min(attempt, 10))
        raise AssertionError("unreachable")

    async def reset_watches(self) -> None:
        """Drop every watch and transaction of this connection at XenStore.

        Every :class:`Watch` of the connection ends.
        """
        _ok(Op.RESET_WATCHES, "", await self._request(Op.RESET_WATCHES, b"\0", ""))
        watches, self._watches = self._watches, {}
        for group in watches.values():
            for w in group:
                w._finish(None)


def _call_weak(ref: weakref.ref[XenStore], method: Callable[[XenStore], None]) -> None:
    xs = ref()
    if xs is not None:
        method(xs)


def _copy_error(err: ConnectionError) -> ConnectionError:
    # A fresh instance per raise: re-raising one object grows its traceback.
    return type(err)(err.errno, err.strerror)


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
                raise _copy_error(self._error)
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


class _TransactionState:
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


class Transaction(_TransactionState):
    """Operations bound to one XenStore transaction (see :meth:`XenStore.transaction`)."""

    def __init__(self, xs: XenStore) -> None:
        super().__init__()
        self._xs = xs

    async def start(self) -> Transaction:
        """Start the transaction (``async with`` does this)."""
        if self.id:
            raise ValueError("the transaction was started already")
        reply = await self._xs._request(Op.TRANSACTION_START, b"\0", "")
        try:
            self.id = int(reply.rstrip(b"\0"))
        except ValueError:
            raise _protocol(f"TRANSACTION_START answered {reply[:40]!r}") from None
        return self

    async def _end(self, commit: bool) -> None:
        tx_id = self._live()
        self._done = True
        arg = "T" if commit else "F"
        _ok(Op.TRANSACTION_END, arg,
            await self._xs._request(Op.TRANSACTION_END, _arg(arg), arg, tx_id))

    async def commit(self) -> None:
        """Commit; :class:`TransactionConflict` if another change got in the way."""
        await self._end(True)

    async def abort(self) -> None:
        """Throw the transaction's changes away."""
        await self._end(False)

    async def __aenter__(self) -> Transaction:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._done or not self.id:
            return
        if exc_type is None:
            await self.commit()
            return
        with contextlib.suppress(OSError, ValueError):
            await self.abort()          # the original exception matters more

    async def read(self, path: str) -> bytes:
        return await self._xs.read(path, tx=self._live())

    async def write(self, path: str, value: bytes | str) -> None:
        await self._xs.write(path, value, tx=self._live())

    async def mkdir(self, path: str) -> None:
        await self._xs.mkdir(path, tx=self._live())

    async def rm(self, path: str) -> None:
        await self._xs.rm(path, tx=self._live())

    async def directory(self, path: str) -> list[str]:
        return await self._xs.directory(path, tx=self._live())

    async def get_perms(self, path: str) -> list[Perm]:
        return await self._xs.get_perms(path, tx=self._live())

    async def set_perms(self, path: str, perms: Iterable[Perm | str]) -> None:
        await self._xs.set_perms(path, perms, tx=self._live())


# -- blocking --------------------------------------------------------------------


class XenStoreSync:
    """A blocking XenStore connection for scripts: one request at a time.

    ``with XenStoreSync() as xs: xs.write("data/x", "1")``.  Thread-safe (a
    lock serialises requests).  ``timeout`` bounds every wait for a reply
    (None: wait forever).
    """

    def __init__(self, path: str | None = None, *, timeout: float | None = 30.0) -> None:
        self._ep: _Endpoint | None = None
        endpoint = _Endpoint(path if path is not None else default_path(), blocking=True)
        endpoint.connect_blocking()
        self._ep = endpoint
        self.path = endpoint.path
        self.timeout = timeout
        self._daemon = _emulator_daemon(endpoint)
        self._framer = _Framer()
        self._events: dict[str, collections.deque[WatchEvent]] = {}
        self._watches: dict[str, list[SyncWatch]] = {}
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
            for group in self._watches.values():
                for w in group:
                    w._ended = True
            self._watches.clear()

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
            raise _copy_error(self._error)
        return self._ep.fd

    def _lost(self, why: str) -> ConnectionError:
        err = _emulator_failure(self._daemon) or ConnectionResetError(
            _errno.ECONNRESET, f"xenstore connection to {self.path} lost: {why}")
        self._error = err
        if self._ep is not None:
            self._ep.close()
        return err

    def _read_message(self, deadline: float | None) -> tuple[int, int, bytes] | None:
        """One message, or None when ``deadline`` passed first."""
        fd = self._fd()
        while True:
            if self._framer.has_message():
                mtype, req_id, _tx, payload = self._pop()
                return mtype, req_id, payload
            if deadline is not None or self._daemon is not None:
                # On the emulator, wait in slices and look at its daemon in
                # between: a stopped one would keep us here for ever.
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if self._daemon is not None:
                    left = _EMULATOR_SLICE if left is None else min(left, _EMULATOR_SLICE)
                assert left is not None
                poller = select.poll()  # not select(): descriptors may be >= 1024
                poller.register(fd, select.POLLIN)
                if not poller.poll(left * 1000):
                    failure = _emulator_failure(self._daemon)
                    if failure is not None:
                        self._error = failure
                        if self._ep is not None:
                            self._ep.close()
                        raise failure
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
            self._framer.buf += data

    def _pop(self) -> tuple[int, int, int, bytes]:
        buf = self._framer.buf
        mtype, req_id, tx_id, length = HEADER.unpack_from(buf)
        if length > PAYLOAD_MAX:
            raise self._lost(f"message of {length} bytes (more than {PAYLOAD_MAX})")
        payload = bytes(buf[HEADER.size:HEADER.size + length])
        del buf[:HEADER.size + length]
        return mtype, req_id, tx_id, payload

    def _queue_event(self, payload: bytes) -> None:
        parts = _strings(payload)
        if len(parts) < 2:
            return
        event = WatchEvent(parts[0], parts[1])
        group = self._watches.get(event.token)
        if not group:
            return
        matching = [w for w in group if _watch_matches(w.path, event.path)] or group
        for w in matching:
            w._events.append(event)

    def _request(self, op: Op, payload: bytes, what: str, tx: int = 0) -> bytes:
        _check_size(op, what, payload)
        with self._lock:
            fd = self._fd()
            req_id = next(self._req_ids) & 0xFFFFFFFF or 1
            message = HEADER.pack(op, req_id, tx, len(payload)) + payload
            try:
                view = memoryview(message)
                while view:             # one write per message (xenbus needs that)
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError as exc:
                raise self._lost(exc.strerror or str(exc)) from None
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while True:
                got = self._read_message(deadline)
                if got is None:
                    raise self._lost(f"no reply to {op.name} {what} within {self.timeout} s")
                mtype, rid, reply = got
                if mtype == Op.WATCH_EVENT:
                    self._queue_event(reply)
                    continue
                if rid != req_id:
                    raise self._lost(f"reply to unknown request {rid}")
                if mtype == Op.ERROR:
                    raise _xs_error(error_number(reply.rstrip(b"\0").decode("ascii", "replace")),
                                    op, what)
                if mtype != op:
                    raise self._lost(f"reply of type {mtype} to a {op.name} request")
                return reply

    # -- operations ------------------------------------------------------------

    def read(self, path: str, *, tx: int | SyncTransaction = 0) -> bytes:
        """The value of ``path``."""
        return self._request(Op.READ, _arg(path), path, _tx_id(tx))

    def write(self, path: str, value: bytes | str, *, tx: int | SyncTransaction = 0) -> None:
        """Set ``path`` to ``value`` (creating it and missing parents)."""
        _ok(Op.WRITE, path, self._request(Op.WRITE, _arg(path) + _value(value), path,
                                          _tx_id(tx)))

    def mkdir(self, path: str, *, tx: int | SyncTransaction = 0) -> None:
        """Make sure ``path`` exists."""
        _ok(Op.MKDIR, path, self._request(Op.MKDIR, _arg(path), path, _tx_id(tx)))

    def rm(self, path: str, *, tx: int | SyncTransaction = 0) -> None:
        """Remove ``path`` and everything below it."""
        _ok(Op.RM, path, self._request(Op.RM, _arg(path), path, _tx_id(tx)))

    def directory(self, path: str, *, tx: int | SyncTransaction = 0) -> list[str]:
        """The names of the children of ``path``."""
        tx_id = _tx_id(tx)
        try:
            return _strings(self._request(Op.DIRECTORY, _arg(path), path, tx_id))
        except OSError as exc:
            if exc.errno != _errno.E2BIG:
                raise
        names = bytearray()
        gen0: list[str] = []
        while True:
            reply = self._request(Op.DIRECTORY_PART,
                                  _arg(path) + _arg(str(len(names))), path, tx_id)
            if _page(names, reply, gen0):
                return _strings(bytes(names))

    def get_perms(self, path: str, *, tx: int | SyncTransaction = 0) -> list[Perm]:
        """The permission entries of ``path`` (owner first)."""
        reply = self._request(Op.GET_PERMS, _arg(path), path, _tx_id(tx))
        try:
            return [Perm.from_wire(s) for s in _strings(reply)]
        except ValueError as exc:
            raise _protocol(str(exc)) from None

    def set_perms(self, path: str, perms: Iterable[Perm | str], *,
                  tx: int | SyncTransaction = 0) -> None:
        """Replace the permission entries of ``path``."""
        _ok(Op.SET_PERMS, path, self._request(Op.SET_PERMS, _perms_payload(path, perms), path,
                                              _tx_id(tx)))

    def get_domain_path(self, domid: int) -> str:
        """The home path of a domain, ``/local/domain/<domid>``."""
        return self._request(Op.GET_DOMAIN_PATH, _arg(str(domid)), str(domid)) \
            .rstrip(b"\0").decode("utf-8", "surrogateescape")

    def watch(self, path: str, token: str | None = None, *,
              timeout: float | None = None) -> SyncWatch:
        """Watch ``path``; iterate the result for events (see :class:`SyncWatch`)."""
        token = token if token is not None else f"vchan-{next(XenStore._tokens)}"
        w = SyncWatch(self, path, token, timeout)
        with self._lock:
            self._watches.setdefault(token, []).append(w)
            try:
                _ok(Op.WATCH, path, self._request(Op.WATCH, _arg(path) + _arg(token), path))
            except BaseException:
                self._forget(w)
                raise
        return w

    def _forget(self, w: SyncWatch) -> None:
        _forget_watch(self._watches, w)

    def transaction(self) -> SyncTransaction:
        """A transaction as a context manager (commit on success, abort on error)."""
        return SyncTransaction(self)

    def transact(self, fn: Callable[[SyncTransaction], T], *, retries: int = 16) -> T:
        """Run ``fn(tx)`` in a transaction, rerunning it on a conflict."""
        for attempt in itertools.count():
            try:
                with self.transaction() as tx:
                    result = fn(tx)
                return result
            except TransactionConflict:
                if attempt >= retries:
                    raise
                time.sleep(0.001 * min(attempt, 10))
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
                got = xs._read_message(deadline)
                if got is None:
                    raise TimeoutError(f"no xenstore event on {self.path} within {timeout} s")
                mtype, rid, payload = got
                if mtype != Op.WATCH_EVENT:
                    raise xs._lost(f"unexpected reply {rid} of type {mtype}")
                xs._queue_event(payload)
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
            xs._forget(self)
            if not xs.closed:
                xs._request(Op.UNWATCH, _arg(self.path) + _arg(self.token), self.path)

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncTransaction(_TransactionState):
    """Operations bound to one transaction of :class:`XenStoreSync`."""

    def __init__(self, xs: XenStoreSync) -> None:
        super().__init__()
        self._xs = xs

    def start(self) -> SyncTransaction:
        if self.id:
            raise ValueError("the transaction was started already")
        reply = self._xs._request(Op.TRANSACTION_START, b"\0", "")
        try:
            self.id = int(reply.rstrip(b"\0"))
        except ValueError:
            raise _protocol(f"TRANSACTION_START answered {reply[:40]!r}") from None
        return self

    def _end(self, commit: bool) -> None:
        tx_id = self._live()
        self._done = True
        arg = "T" if commit else "F"
        _ok(Op.TRANSACTION_END, arg, self._xs._request(Op.TRANSACTION_END, _arg(arg), arg, tx_id))

    def commit(self) -> None:
        """Commit; :class:`TransactionConflict` if another change got in the way."""
        self._end(True)

    def abort(self) -> None:
        """Throw the transaction's changes away."""
        self._end(False)

    def __enter__(self) -> SyncTransaction:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._done or not self.id:
            return
        if exc_type is None:
            self.commit()
            return
        with contextlib.suppress(OSError, ValueError):
            self.abort()                # the original exception matters more

    def read(self, path: str) -> bytes:
        return self._xs.read(path, tx=self._live())

    def write(self, path: str, value: bytes | str) -> None:
        self._xs.write(path, value, tx=self._live())

    def mkdir(self, path: str) -> None:
        self._xs.mkdir(path, tx=self._live())

    def rm(self, path: str) -> None:
        self._xs.rm(path, tx=self._live())

    def directory(self, path: str) -> list[str]:
        return self._xs.directory(path, tx=self._live())

    def get_perms(self, path: str) -> list[Perm]:
        return self._xs.get_perms(path, tx=self._live())

    def set_perms(self, path: str, perms: Iterable[Perm | str]) -> None:
        self._xs.set_perms(path, perms, tx=self._live())
