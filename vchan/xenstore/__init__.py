"""A XenStore client: the wire protocol over a socket, ``/dev/xen/xenbus`` or the emulator.

The package in four parts: :mod:`~vchan.xenstore.wire` (the messages, both
directions, no I/O; the emulated xenstored uses it too),
:mod:`~vchan.xenstore.operations` (each operation once, as a generator of
requests), :mod:`~vchan.xenstore.aio` and :mod:`~vchan.xenstore.blocking`
(the two drivers: asyncio and blocking).

THEORY OF OPERATION
===================

The messages and their rules are those of ``xen/io/xs_wire.h``, described
in :mod:`vchan.xenstore.wire`: requests paired with replies by ``req_id``,
errors sent as errno names, watch events sent unasked.

* :class:`XenStore` (asyncio) keeps any number of requests in flight on one
  connection and pairs replies by ``req_id``; watch events go to the
  :class:`Watch` registered under their token (an async iterator of
  :class:`WatchEvent`).  If the connection dies, every pending request and
  every watch fails with :class:`ConnectionResetError` naming xenstore.
* :class:`XenStoreSync` is the blocking driver of the same operations, for
  scripts: one request at a time on a plain blocking descriptor, watch
  events queued while it waits.
* On the emulated hypervisor (a socket ``<dir>/xenstore/<domid>.sock``) the
  daemon behind the socket is a process that can die or be stopped: a
  connection lost because it died, and a blocking wait on a stopped one,
  fail with :class:`vchan.sim.EmulatorError` naming it.
  :meth:`XenStore.abort` fails a connection with an error of the caller's.
* Errors are :class:`OSError` with the errno XenStore named, so Python picks
  the subclass (``FileNotFoundError``, ``PermissionError``, ...), and the
  message ``"xenstore READ /path: ENOENT"``.  A transaction that loses a
  race raises :class:`TransactionConflict` at commit; :meth:`XenStore.transact`
  reruns the whole transaction then (:class:`TransactionRetry` says when).

Where the daemon is (``path=None``) is decided with the backend, by
:func:`vchan.backend.xenstore_path`: ``$XENSTORED_PATH``; else, under the
emulated hypervisor, the emulator's socket for this process's domain
``$VCHAN_DOMID``; else ``/var/run/xenstored/socket`` when it exists (dom0);
else ``/dev/xen/xenbus`` (a guest).  A path that is a socket is connected to;
anything else is opened as the xenbus character device, on which every
``write()`` must carry exactly one message (the kernel drops the rest).
"""

from __future__ import annotations

from .aio import Transaction, Watch, XenStore
from .blocking import SyncTransaction, SyncWatch, XenStoreSync
from .endpoint import default_path
from .operations import TransactionRetry
from .wire import (
    ABS_PATH_MAX,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    Op,
    Perm,
    TransactionConflict,
    WatchEvent,
    error_name,
    error_number,
)

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
    "TransactionRetry",
    "Watch",
    "WatchEvent",
    "XenStore",
    "XenStoreSync",
    "default_path",
    "error_name",
    "error_number",
]
