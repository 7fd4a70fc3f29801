"""stdin and stdout (or any pair of fds) as one side of a stream: ``nc``'s engine.

:func:`stdio_session` copies the input to the peer and the peer to the
output until both directions are done, with a :class:`Progress` line on
stderr for long transfers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import sys
import time

from .errors import UsageError

__all__ = ["Progress", "stdio_session"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 18


class Progress:
    """Byte counters, and a status line on stderr while ``enabled``."""

    DELAY = 2.0
    INTERVAL = 0.5

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.sent = 0
        self.received = 0
        self._start = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._shown = False

    def start(self) -> None:
        self._start = time.monotonic()
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._show())

    async def _show(self) -> None:
        await asyncio.sleep(self.DELAY)
        while True:
            self._line()
            await asyncio.sleep(self.INTERVAL)

    def _line(self, end: str = "") -> None:
        dt = max(time.monotonic() - self._start, 1e-9)
        sys.stderr.write(f"\r\x1b[Ksent {_size(self.sent)} ({_size(self.sent / dt)}/s), "
                         f"received {_size(self.received)} ({_size(self.received / dt)}/s), "
                         f"{dt:.0f} s{end}")
        sys.stderr.flush()
        self._shown = True

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._shown:
            self._line("\n")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class _Stdio:
    """Non-blocking access to an input and an output fd, restored on close."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._flags = {fd: _get_flags(fd) for fd in {in_fd, out_fd}}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._in_file = False
        self._out_file = False
        self._out_done = False
        self._transports: list[asyncio.BaseTransport] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if _is_stream(self.in_fd):
            self.reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
            proto = asyncio.StreamReaderProtocol(self.reader, loop=loop)
            t, _ = await loop.connect_read_pipe(lambda: proto,
                                                os.fdopen(os.dup(self.in_fd), "rb", 0))
            self._transports.append(t)
        else:
            self._in_file = True
        if _is_stream(self.out_fd):
            t2, p2 = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, os.fdopen(os.dup(self.out_fd), "wb", 0))
            t2.set_write_buffer_limits(0)   # drain() returns once all is written
            self.writer = asyncio.StreamWriter(t2, p2, None, loop)
            self._transports.append(t2)
        else:
            self._out_file = True

    async def read(self) -> bytes:
        if self.reader is not None:
            return await self.reader.read(_CHUNK)
        return await asyncio.to_thread(os.read, self.in_fd, _CHUNK)

    async def write(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)
            await self.writer.drain()
            return
        view = memoryview(data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def close_output(self) -> None:
        """Let whoever reads our output see its end (all our copies of it go)."""
        if self._out_done:
            return
        self._out_done = True
        if self.writer is not None:
            self.writer.close()     # the buffer is empty: drain() waits for that
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(self.out_fd).st_mode):
                with socket.socket(fileno=os.dup(self.out_fd)) as sock:
                    sock.shutdown(socket.SHUT_WR)
            elif self.out_fd != self.in_fd:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.out_fd)
                os.close(devnull)

    def close(self) -> None:
        for t in self._transports:
            t.close()
        for fd, flags in self._flags.items():
            if flags is not None:
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, not flags & os.O_NONBLOCK)


def _get_flags(fd: int) -> int | None:
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return None


def _is_stream(fd: int) -> bool:
    """Whether asyncio's pipe transports can serve ``fd`` (a pipe, socket or tty)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise UsageError(f"file descriptor {fd}: {exc.strerror}") from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return False
    import select

    # Some character devices (/dev/null) cannot be polled: read those in a thread.
    with select.epoll() as ep:
        try:
            ep.register(fd, select.EPOLLIN)
        except OSError:
            return False
    return True


async def _cat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stdio: _Stdio,
               progress: Progress) -> None:
    """Copy stdin to the peer and the peer to stdout until both are done.

    stdin EOF: write_eof() to the peer, keep reading it.  Peer EOF: close
    stdout.  A peer that closes the connection (not just its sending half)
    ends the command even if stdin has more.
    """
    transport = writer.transport

    async def upstream() -> None:
        while data := await stdio.read():
            if transport.is_closing():
                return
            writer.write(data)
            progress.sent += len(data)
            await writer.drain()
        if transport.is_closing():
            return
        if writer.can_write_eof():
            writer.write_eof()
            log.info("end of input: sent EOF to the peer")
        else:
            log.info("end of input (the peer is a plain libxenvchan endpoint, which cannot "
                     "be told: waiting for it to close)")

    async def downstream() -> None:
        try:
            while data := await reader.read(_CHUNK):
                progress.received += len(data)
                await stdio.write(data)
        except BrokenPipeError:
            log.info("stdout was closed")
        except ConnectionResetError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"connection reset: {exc}") from None
        finally:
            stdio.close_output()
        log.info("the peer finished sending")

    up = asyncio.ensure_future(upstream())
    down = asyncio.ensure_future(downstream())
    progress.start()
    try:
        await down
        if transport.is_closing() and not up.done():
            up.cancel()     # the peer closed the connection: nothing more can go
        try:
            await up
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise               # we are cancelled (Ctrl-C), not just up by us
    except asyncio.CancelledError:
        # Ctrl-C: end now, as nc does.  A close would wait for the peer to
        # read what is still buffered, which a peer that stopped reading never
        # does; what it has not read is dropped.
        transport.abort()
        raise
    finally:
        progress.stop()
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()


def _progress_wanted(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


async def stdio_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        args: argparse.Namespace, in_fd: int = 0, out_fd: int = 1) -> int:
    """Copy ``in_fd`` to the peer and the peer to ``out_fd`` until both are done (0).

    Progress is shown as ``args.progress`` says (default: when stderr is a
    terminal).
    """
    stdio = _Stdio(in_fd, out_fd)
    try:
        await stdio.open()
        await _cat(reader, writer, stdio, Progress(_progress_wanted(args)))
    finally:
        stdio.close()
    return 0
