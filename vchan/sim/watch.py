"""Asking the emulator daemon whether it still answers, without blocking a loop.

A daemon that died or was stopped is seen without a request
(``vk_sim_check``: its connection at end of file, its process gone or
stopped).  One that runs but answers nothing -- stuck in a loop, deadlocked
-- is seen only by asking, and a device request would block the event loop
for up to :func:`vchan.sim.request_timeout` to find out.  So each event hub
on the emulator keeps a :class:`DaemonWatch`: a control connection of its own
(it makes no domain exist) on which it sends a cheap request every
``INTERVAL`` seconds, without blocking, and which fails the loop with
:class:`vchan.sim.EmulatorError` (``ETIMEDOUT``) when an answer is
``request_timeout()`` late -- or (``ECONNRESET``) at once when the
connection ends.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    EmulatorError,
    connect,
    daemon_state,
    emulator_error,
    peer_pid,
    request_timeout,
    socket_path,
)
from .protocol import HELLO, KIND_CONTROL, REQUEST, VS_CONTROL, VS_HELLO, VS_VERSION

__all__ = ["DaemonWatch"]

_PING_BODY = b'{"cmd": "domains"}'     # cheap for the daemon
_PING = REQUEST.pack(VS_CONTROL, len(_PING_BODY)) + _PING_BODY


class DaemonWatch:
    """Pings the daemon of ``directory`` from ``loop``; ``on_failure(exc)`` once."""

    INTERVAL = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop, directory: Path,
                 on_failure: Callable[[EmulatorError], None]) -> None:
        self.loop = loop
        self.dir = directory
        self._on_failure = on_failure
        self._sock: socket.socket | None = connect(socket_path(directory))
        self._sock.setblocking(False)
        self.pid = peer_pid(self._sock)
        self._due: float | None = None          # when the answer in flight was asked for
        self._timer: asyncio.TimerHandle | None = None
        self._send(REQUEST.pack(VS_HELLO, HELLO.size) +
                   HELLO.pack(VS_VERSION, 0, KIND_CONTROL, os.getpid()))
        loop.add_reader(self._sock.fileno(), self._readable)
        self._timer = loop.call_later(self.INTERVAL, self._tick)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "waiting" if self._due else "idle"
        return f"<DaemonWatch pid={self.pid} {self.dir} {state}>"

    def _send(self, message: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.send(message)
        except BlockingIOError:
            return                  # full: the answer is already late
        except OSError:
            self._fail(errno.ECONNRESET)
            return
        self._due = time.monotonic()

    def _readable(self) -> None:
        if self._sock is None:
            return
        try:
            data = self._sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fail(errno.ECONNRESET)
            return
        self._due = None

    def _tick(self) -> None:
        self._timer = None
        if self._sock is None:
            return
        if self._due is None:
            self._send(_PING)
        elif time.monotonic() - self._due > request_timeout():
            self._fail(daemon_state(self.pid) or errno.ETIMEDOUT)
            return
        if self._sock is not None:
            self._timer = self.loop.call_later(self.INTERVAL, self._tick)

    def _fail(self, err: int) -> None:
        if self._sock is None:
            return
        exc = emulator_error(err, self.pid, self.dir)
        self.close()
        self._on_failure(exc)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sock, self._sock = self._sock, None
        if sock is not None:
            if not self.loop.is_closed():
                self.loop.remove_reader(sock.fileno())
            sock.close()
