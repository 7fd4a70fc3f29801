"""The descriptor both XenStore clients talk through, and the daemon behind it.

A path that is a socket is connected to; anything else is opened as the
xenbus character device, on which every ``write()`` must carry exactly one
message (the kernel drops the rest).  Where the path comes from is
:func:`vchan.backend.xenstore_path`'s business, not the clients'.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import socket
import stat

from .. import sim

#: A blocking wait looks at the emulator's daemon this often.
EMULATOR_SLICE = 0.05


def default_path() -> str:
    """Where XenStore is for this process (:func:`vchan.backend.xenstore_path`).

    Under the emulator this may start the emulator and asks it for the
    socket of this process's domain; it blocks meanwhile.
    """
    # Not at import: vchan.backend loads the native module.
    from ..backend import xenstore_path

    return xenstore_path()


class Endpoint:
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

    def __repr__(self) -> str:
        kind = "socket" if self.is_socket else "device"
        return f"<Endpoint {kind} {self.path} fd={self.fd}>"

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

    def emulator_daemon(self) -> tuple[int, str] | None:
        """(pid, state directory) of the emulator's daemon when that serves this
        socket; else None."""
        if self._sock is None:
            return None
        return sim.xenstore_daemon(self._sock, self.path)

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


def emulator_failure(daemon: tuple[int, str] | None) -> ConnectionError | None:
    """The emulator's failure, if its daemon (see above) is gone or stopped."""
    if daemon is None:
        return None
    state = sim.daemon_state(daemon[0])
    return sim.emulator_error(state, daemon[0], daemon[1]) if state else None


def lost_error(daemon: tuple[int, str] | None, path: str, why: str) -> ConnectionError:
    """Why a connection ended: the emulator's failure, else the reason given."""
    return emulator_failure(daemon) or ConnectionResetError(
        _errno.ECONNRESET, f"xenstore connection to {path} lost: {why}")


def copy_error(err: ConnectionError) -> ConnectionError:
    # A fresh instance per raise: re-raising one object grows its traceback.
    return type(err)(err.errno, err.strerror)
