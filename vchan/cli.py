"""The ``vchan listen``, ``vchan connect`` and ``vchan proxy`` commands.

``listen`` / ``connect`` are ``nc`` over vchan: stdin goes to the peer, what
the peer sends goes to stdout.  ``proxy`` bridges vchan and TCP or Unix
sockets in either direction, many connections at once, and also accepts the
argument shape of Xen's ``vchan-socket-proxy``.

:func:`add_commands` adds the three subcommands to the ``vchan`` command's
parser; :func:`main` is a parser with only these (``python -m vchan.cli``).
User mistakes raise :class:`UsageError` (one line, exit status 2); runtime
failures (no such domain, timeout, connection refused, ...) are reported by
the commands themselves as one line with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import re
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

__all__ = ["UsageError", "add_commands"]

log = logging.getLogger("vchan.cli")

_CHUNK = 1 << 18


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit status 2."""


# ---------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------

def _domid(text: str, what: str = "domain id") -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"{what} must be a number, got {text!r}") from None
    if not 0 <= value < 0x7FF0:
        raise UsageError(f"{what} must be in 0..32751, got {value}")
    return value


def _vchan_port(text: str) -> int | str:
    from .listener import check_port

    port: int | str = int(text) if text.isdigit() else text
    try:
        check_port(port)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad vchan port {text!r}: {exc}") from None
    return port


def _peers(text: str) -> Any:
    if text == "any":
        return "any"
    parts = [p for p in text.split(",") if p]
    if not parts:
        raise UsageError("--peers: name domain ids (D or D1,D2,...) or 'any'")
    domids = [_domid(p, "--peers domain id") for p in parts]
    return domids[0] if len(domids) == 1 else domids


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--timeout must be a number of seconds or 'inf', got {text!r}") from None
    if value < 0 or math.isnan(value):
        raise UsageError(f"--timeout must be >= 0, got {text!r}")
    return None if math.isinf(value) else value


class SocketAddress:
    """``tcp:HOST:PORT`` or ``unix:PATH`` (a bare ``/path`` is a Unix socket)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.host: str | None = None
        self.port = 0
        self.path: str | None = None
        if text.startswith("unix:") or text.startswith("/"):
            path = text[5:] if text.startswith("unix:") else text
            if not path:
                raise UsageError(f"bad socket address {text!r}: unix:PATH needs a path")
            self.path = path
            return
        if not text.startswith("tcp:"):
            raise UsageError(f"bad socket address {text!r}: say tcp:HOST:PORT or unix:PATH")
        rest = text[4:]
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"bad socket address {text!r}: tcp:HOST:PORT needs a port "
                             f"in 0..65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self.host = host or "127.0.0.1"
        self.port = int(port)

    def __str__(self) -> str:
        return self.text

    async def open(self) -> socket.socket:
        """A connected non-blocking socket (TCP: every address of the host in turn)."""
        loop = asyncio.get_running_loop()
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert self.host is not None
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        errors: list[OSError] = []
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                errors.append(exc)
                continue
            except BaseException:
                sock.close()
                raise
            # Forwarded requests are often small: do not hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        if len(errors) == 1:
            raise errors[0]
        raise OSError(f"cannot connect to {self.text}: "
                      + "; ".join(_oserror_text(e) for e in errors))

    def bind(self) -> list[socket.socket]:
        """Bound listening sockets (TCP: one per address of the host)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.path).st_mode):
                    os.unlink(self.path)    # a stale socket of an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.path)
            except BaseException:
                sock.close()
                raise
            return [sock]
        assert self.host is not None
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(
                    self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind(address)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks


def _describe_sockets(sockets: list[socket.socket], address: SocketAddress) -> str:
    if address.path is not None:
        return f"unix:{address.path}"
    names = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}")
    return ", ".join(names)


# ---------------------------------------------------------------------------
# Running a command: the loop, logging, and errors as one line
# ---------------------------------------------------------------------------

def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vchan: %(message)s", stream=sys.stderr)
    logging.getLogger("vchan").setLevel(level)


def _run(args: argparse.Namespace, coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``coro_fn()`` on the chosen loop; runtime failures as one line, exit 1."""
    from .backend import BackendError, check_environment, get_backend
    from .errors import NoSuchDomainError, VchanError
    from .sim import SimError

    _setup_logging(args.verbose)
    try:
        check_environment()     # a bad VCHAN_* variable: one line before anything starts
        get_backend()           # and one that shows only in use, before we serve anyone
    except (BackendError, SimError) as exc:
        _error(str(exc))
        return 1
    runner: Callable[[Coroutine[Any, Any, int]], int]
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise UsageError("--loop uvloop: uvloop is not installed "
                             "(pip install 'vchan[uvloop]')") from None
        runner = uvloop.run
    elif args.loop == "asyncio":
        runner = asyncio.run
    else:
        raise UsageError(f"--loop must be asyncio or uvloop, got {args.loop!r}")
    try:
        return runner(coro_fn())
    except UsageError:
        raise
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (BackendError, SimError) as exc:
        _error(str(exc))
    except NoSuchDomainError as exc:
        _error(f"{exc}")
    except TimeoutError as exc:
        _error(f"timed out: {exc}" if str(exc) else "timed out")
    except ConnectionRefusedError as exc:
        _error(f"connection refused: {exc.strerror or exc}")
    except (OSError, VchanError, ValueError) as exc:
        if args.verbose >= 2:
            log.exception("failed")
        _error(_oserror_text(exc))
    return 1


def _error(text: str) -> None:
    print(f"vchan: {text}", file=sys.stderr, flush=True)


def _oserror_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------
# Progress (on stderr, for transfers longer than a couple of seconds)
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# stdin/stdout (or any fd pair) over one stream connection: nc
# ---------------------------------------------------------------------------

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


async def _stdio_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         args: argparse.Namespace, in_fd: int = 0, out_fd: int = 1) -> int:
    stdio = _Stdio(in_fd, out_fd)
    try:
        await stdio.open()
        await _cat(reader, writer, stdio, Progress(_progress_wanted(args)))
    finally:
        stdio.close()
    return 0


def _listen(args: argparse.Namespace) -> int:
    port = _vchan_port(args.port)
    peers = _peers(args.peers)
    if args.raw and not isinstance(peers, int):
        raise UsageError("--raw serves one libxenvchan client: --peers must be one domain id")

    async def run() -> int:
        import vchan

        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            loop.create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if accepted.done():
                writer.close()      # one connection, as nc -l
                return
            accepted.set_result((reader, writer))

        server = await vchan.start_server(connected, port, peers=peers, raw=args.raw)
        log.info("listening on vchan port %s of domain %s for %s", port, server.own,
                 "any domain" if peers == "any" else f"domain(s) {peers}")
        try:
            reader, writer = await accepted
        finally:
            server.close()
        log.info("connection from %s", writer.get_extra_info("peername"))
        try:
            return await _stdio_session(reader, writer, args)
        finally:
            await server.wait_closed()

    return _run(args, run)


def _connect(args: argparse.Namespace) -> int:
    domid = _domid(args.domid)
    port = _vchan_port(args.port)
    timeout = _timeout(args.timeout)

    async def run() -> int:
        import vchan

        reader, writer = await vchan.open_connection(domid, port, timeout=timeout)
        log.info("connected to domain %s port %s", domid, port)
        return await _stdio_session(reader, writer, args)

    return _run(args, run)


# ---------------------------------------------------------------------------
# The proxy: protocol-level forwarding with flow control
# ---------------------------------------------------------------------------

class _Bridge:
    """Forwarded connections (each a :class:`vchan.proxy.SocketSplice`), for the log."""

    def __init__(self, describe: str) -> None:
        self.describe = describe
        self.open = 0
        self.total = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def opened(self, splice: Any, origin: object) -> int:
        self.open += 1
        self.total += 1
        link = self.total
        log.info("link %d: connection from %s", link, origin)
        return link

    def bridged(self, link: int) -> None:
        log.info("link %d: bridged to %s", link, self.describe)

    def failed(self, link: int, exc: BaseException) -> None:
        log.warning("link %d: cannot reach %s: %s", link, self.describe, _oserror_text(exc))

    def follow(self, link: int, splice: Any) -> None:
        """Log the link's end once its splice closes."""
        async def watch() -> None:
            await splice.wait_closed()
            self.open -= 1
            if splice.error is not None:
                log.info("link %d closed: %s", link, _oserror_text(splice.error))
            else:
                log.info("link %d closed", link)
        self.spawn(watch())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


_VCHAN_PATH = re.compile(r"^/local/domain/(\d+)/data/vchan/(\d+)/([A-Za-z0-9_-]{1,64})$")


def _parse_nodepath(nodepath: str) -> tuple[int, int, int | str]:
    """(server domid, client domid, port) of a vchan-form XenStore path."""
    m = _VCHAN_PATH.match(nodepath)
    if m is None:
        raise UsageError(
            f"nodepath {nodepath!r} is not of vchan's form /local/domain/SERVER/data/vchan/"
            f"CLIENT/PORT (other paths are not supported)")
    port: int | str = int(m[3]) if m[3].isdigit() else m[3]
    return int(m[1]), int(m[2]), port


async def _serve_until_signal(servers: list[asyncio.AbstractServer]) -> int:
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[int] = []

    def stopping(sig: int) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopping, sig)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        for server in servers:
            server.close()
    if got[:1] == [signal.SIGINT]:
        _error("interrupted")       # Ctrl-C: as every command says it, and 128 + SIGINT
        return 130
    return 0                        # SIGTERM: a service asked to stop, which it did


@contextlib.asynccontextmanager
async def _state(path: str | None) -> AsyncIterator[None]:
    """Write "running" to XenStore ``path`` (vchan-socket-proxy's -s) while in use.

    The XenStore connection stays open until the end: on the emulator a
    domain with no process attached goes away, its nodes with it.
    """
    if path is None:
        yield
        return
    from .xenstore import XenStore

    xs = await XenStore.open()
    try:
        await xs.write(path, "running")
        yield
    finally:
        await xs.close()


def _proxy(args: argparse.Namespace) -> int:
    new_style = args.listen_vchan is not None or args.listen is not None
    if args.positional:
        if new_style or args.to or args.to_vchan:
            raise UsageError("proxy: give either DOMID NODEPATH SOCKET (vchan-socket-proxy "
                             "style) or --listen-vchan/--listen, not both")
        return _socket_proxy(args)
    if args.mode is not None:
        raise UsageError("proxy: --mode belongs to the DOMID NODEPATH SOCKET form")
    if args.listen_vchan is not None:
        if args.listen is not None or args.to_vchan:
            raise UsageError("proxy: --listen-vchan goes with --to, not --listen/--to-vchan")
        if not args.to:
            raise UsageError("proxy --listen-vchan PORT: say where to with --to "
                             "tcp:HOST:PORT or unix:PATH")
        port = _vchan_port(args.listen_vchan)
        peers = _peers(args.peers)
        if args.raw and not isinstance(peers, int):
            raise UsageError("--raw serves one libxenvchan client at a time: --peers must "
                             "be one domain id")
        target = SocketAddress(args.to)
        return _run(args, lambda: _vchan_to_socket(port, peers, args.raw, target,
                                                   args.state_path))
    if args.listen is not None:
        if not args.to_vchan:
            raise UsageError("proxy --listen ADDRESS: say where to with --to-vchan DOMID PORT")
        if args.to:
            raise UsageError("proxy: --listen goes with --to-vchan, not --to")
        listen = SocketAddress(args.listen)
        domid = _domid(args.to_vchan[0])
        port = _vchan_port(args.to_vchan[1])
        timeout = _timeout(args.timeout)
        return _run(args, lambda: _socket_to_vchan(listen, domid, port, timeout,
                                                   args.state_path))
    raise UsageError("proxy: say --listen-vchan PORT --to ADDRESS, --listen ADDRESS "
                     "--to-vchan DOMID PORT, or DOMID NODEPATH SOCKET (see vchan proxy --help)")


async def _vchan_to_socket(port: int | str, peers: Any, raw: bool, target: SocketAddress,
                           state_path: str | None) -> int:
    import vchan

    from .proxy import SocketSplice

    bridge = _Bridge(str(target))

    def factory() -> SocketSplice:
        async def connect() -> socket.socket:
            try:
                sock = await target.open()
            except Exception as exc:
                bridge.failed(link, exc)
                raise
            bridge.bridged(link)
            return sock
        splice = SocketSplice(connect=connect)
        link = bridge.opened(splice, "vchan")
        bridge.follow(link, splice)
        return splice

    # Splicing moves bytes between a socket and a whole ring: one ring each.
    server = await vchan.create_server(factory, port, peers=peers, raw=raw, sessions=False)
    log.info("listening on vchan port %s of domain %s, forwarding to %s", port, server.own,
             target)
    try:
        async with server, _state(state_path):
            return await _serve_until_signal([server])
    finally:
        await bridge.cancel()


async def _socket_to_vchan(listen: SocketAddress, domid: int, port: int | str,
                           timeout: float | None, state_path: str | None,
                           sock: socket.socket | None = None) -> int:
    import vchan

    from .proxy import SocketListener, SocketSplice

    bridge = _Bridge(f"vchan domain {domid} port {port}")

    async def link_out(conn: socket.socket, addr: Any) -> None:
        splice = SocketSplice(conn)
        link = bridge.opened(splice, addr or "a local socket")
        try:
            await vchan.create_connection(lambda: splice, domid, port, timeout=timeout,
                                          dedicated=True)
        except Exception as exc:    # refused, timed out, no such domain, ...
            bridge.failed(link, exc)
            bridge.open -= 1
            conn.close()
            return
        bridge.bridged(link)
        bridge.follow(link, splice)

    def accepted(conn: socket.socket, addr: Any) -> None:
        bridge.spawn(link_out(conn, addr))

    if sock is not None:
        listener = SocketListener([sock], accepted)
        where = f"fd {sock.fileno()}"
    else:
        listener = SocketListener(listen.bind(), accepted)
        where = _describe_sockets(listener.sockets, listen)
    log.info("listening on %s, forwarding to vchan domain %s port %s", where, domid, port)
    try:
        async with listener, _state(state_path):
            return await _serve_until_signal([listener])
    finally:
        await bridge.cancel()


def _socket_proxy(args: argparse.Namespace) -> int:
    """The vchan-socket-proxy form: [-m client|server] [-s PATH] DOMID NODEPATH SOCKET."""
    from .vchan import own_domid

    if len(args.positional) != 3:
        raise UsageError("proxy: the vchan-socket-proxy form takes DOMID NODEPATH "
                         "SOCKET-PATH|FD|-")
    domid = _domid(args.positional[0])
    server_domid, client_domid, port = _parse_nodepath(args.positional[1])
    target = args.positional[2]
    mode = args.mode or "client"
    if mode not in ("client", "server"):
        raise UsageError(f"--mode must be client or server, got {mode!r}")
    own = own_domid()
    if mode == "server" and (server_domid, client_domid) != (own, domid):
        raise UsageError(f"server mode: nodepath must be /local/domain/{own}/data/vchan/"
                         f"{domid}/PORT (this domain serving domain {domid})")
    if mode == "client" and (server_domid, client_domid) != (domid, own):
        raise UsageError(f"client mode: nodepath must be /local/domain/{domid}/data/vchan/"
                         f"{own}/PORT (domain {domid} serving this domain)")
    fd: int | None = None
    with contextlib.suppress(ValueError):
        fd = int(target, 0)
    if mode == "server":
        if target == "-" or fd is not None:
            return _run(args, lambda: _serve_one_fd(domid, port, fd, args))
        return _run(args, lambda: _vchan_to_socket(port, domid, True, SocketAddress(target),
                                                   args.state_path))
    timeout = _timeout(args.timeout)
    if target == "-":
        return _run(args, lambda: _connect_one_fd(domid, port, timeout, None, args))
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise UsageError(f"fd {fd} is not a listening socket: {exc.strerror}") from None
        return _run(args, lambda: _socket_to_vchan(SocketAddress(f"unix:fd{fd}"), domid, port,
                                                   timeout, args.state_path, sock=sock))
    return _run(args, lambda: _socket_to_vchan(SocketAddress(target), domid, port, timeout,
                                               args.state_path))


async def _serve_one_fd(domid: int, port: int | str, fd: int | None,
                        args: argparse.Namespace) -> int:
    """Server mode with - or an fd: one raw vchan connection to/from the fd."""
    import vchan

    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        loop.create_future()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if accepted.done():
            writer.close()
        else:
            accepted.set_result((reader, writer))

    server = await vchan.start_server(connected, port, peers=domid, raw=True)
    log.info("listening on vchan port %s of domain %s for domain %s", port, server.own, domid)
    async with _state(args.state_path):
        try:
            reader, writer = await accepted
        finally:
            server.close()
        try:
            if fd is None:
                return await _stdio_session(reader, writer, args)
            return await _stdio_session(reader, writer, args, fd, fd)
        finally:
            await server.wait_closed()


async def _connect_one_fd(domid: int, port: int | str, timeout: float | None, fd: int | None,
                          args: argparse.Namespace) -> int:
    import vchan

    async with _state(args.state_path):
        reader, writer = await vchan.open_connection(domid, port, timeout=timeout)
        if fd is None:
            return await _stdio_session(reader, writer, args)
        return await _stdio_session(reader, writer, args, fd, fd)


# ---------------------------------------------------------------------------
# The parsers
# ---------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop", default="asyncio", metavar="{asyncio,uvloop}",
                   help="event loop to run on (default asyncio)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="say what happens on stderr (-vv: more)")


def _progress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show bytes and rates on stderr (default: when stderr is a terminal; "
                        "after 2 s)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress")


def add_commands(subparsers: Any) -> None:
    """Add ``listen``, ``connect`` and ``proxy`` to the ``vchan`` command's subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    listen = subparsers.add_parser(
        "listen", help="serve a vchan port and connect it to stdin/stdout (nc -l)",
        formatter_class=raw,
        description="Wait for one vchan connection on PORT, then copy stdin to it and it to\n"
                    "stdout, like nc -l.  At the end of stdin the peer is told EOF (and its\n"
                    "data still comes); at the peer's EOF stdout is closed; the command ends\n"
                    "when both directions are done.",
        epilog="examples:\n"
               "  VCHAN_DOMID=1 vchan listen 5000 --peers 2 > received.bin\n"
               "  vchan listen backup --peers 2,3 < archive.tar\n"
               "  vchan listen 5000 --peers 7 --raw      # a libxenvchan (C) client")
    listen.add_argument("port", metavar="PORT", help="vchan port: a number or a short name")
    listen.add_argument("--peers", default="any", metavar="D[,D...]|any",
                        help="domains allowed to connect (default any: privileged domains "
                             "only)")
    listen.add_argument("--raw", action="store_true",
                        help="plain libxenvchan server on the path (for C clients)")
    _progress_options(listen)
    _common(listen)
    listen.set_defaults(func=_listen)

    connect = subparsers.add_parser(
        "connect", help="connect to a vchan port, with stdin/stdout (nc)",
        formatter_class=raw,
        description="Connect to vchan PORT of domain DOMID, copy stdin to it and it to stdout,\n"
                    "like nc.  At the end of stdin the peer is told EOF (its data still\n"
                    "comes); at the peer's EOF stdout is closed; the command ends when both\n"
                    "directions are done.",
        epilog="examples:\n"
               "  VCHAN_DOMID=2 vchan connect 1 5000 < file.bin\n"
               "  echo hello | vchan connect 1 echo\n"
               "  vchan connect 1 5000 --timeout inf --loop uvloop > out.bin")
    connect.add_argument("domid", metavar="DOMID", help="the server's domain")
    connect.add_argument("port", metavar="PORT", help="vchan port: a number or a short name")
    connect.add_argument("--timeout", default="30", metavar="SECONDS",
                         help="wait this long for the server to appear (default 30; inf)")
    _progress_options(connect)
    _common(connect)
    connect.set_defaults(func=_connect)

    proxy = subparsers.add_parser(
        "proxy", help="bridge vchan and TCP/Unix sockets (also vchan-socket-proxy's form)",
        formatter_class=raw,
        description="Bridge connections between vchan and TCP or Unix sockets, any number at\n"
                    "once, with flow control, half-close and close/reset carried across.\n\n"
                    "  --listen-vchan PORT --to ADDRESS    each vchan connection to PORT opens\n"
                    "                                      a socket connection to ADDRESS\n"
                    "  --listen ADDRESS --to-vchan D PORT  each socket connection accepted on\n"
                    "                                      ADDRESS opens a vchan connection\n\n"
                    "ADDRESS is tcp:HOST:PORT or unix:PATH.  It also takes the arguments of\n"
                    "Xen's vchan-socket-proxy, [-m client|server] [-s STATE-PATH] DOMID\n"
                    "NODEPATH SOCKET-PATH|FD|-, for NODEPATHs of vchan's form\n"
                    "/local/domain/SERVER/data/vchan/CLIENT/PORT (server mode serves a plain\n"
                    "libxenvchan ring there; client mode reaches libxenvchan and vchan\n"
                    "servers).  The proxy runs until SIGINT/SIGTERM.",
        epilog="examples:\n"
               "  # domain 1: offer the local web server to domain 2 on vchan port 80\n"
               "  vchan proxy --listen-vchan 80 --peers 2 --to tcp:127.0.0.1:8080\n"
               "  # domain 2: local programs reach it at 127.0.0.1:8000\n"
               "  vchan proxy --listen tcp:127.0.0.1:8000 --to-vchan 1 80\n"
               "  vchan proxy --listen unix:/run/db.sock --to-vchan 1 db --loop uvloop\n"
               "  # as vchan-socket-proxy (here in domain 1, serving domain 2)\n"
               "  vchan proxy -m server 2 /local/domain/1/data/vchan/2/qmp /run/qmp.sock\n"
               "  vchan proxy -m client -s /local/domain/2/data/proxy-state 1 \\\n"
               "      /local/domain/1/data/vchan/2/qmp /run/qmp-client.sock")
    proxy.add_argument("positional", nargs="*", metavar="DOMID NODEPATH SOCKET",
                       help="vchan-socket-proxy form (SOCKET: a Unix socket path, an fd "
                            "number or - for stdin/stdout)")
    proxy.add_argument("--listen-vchan", metavar="PORT", help="serve this vchan port")
    proxy.add_argument("--peers", default="any", metavar="D[,D...]|any",
                       help="with --listen-vchan: domains allowed to connect (default any)")
    proxy.add_argument("--raw", action="store_true",
                       help="with --listen-vchan: a plain libxenvchan server (one client at "
                            "a time, for C clients)")
    proxy.add_argument("--to", metavar="ADDRESS", help="with --listen-vchan: where to connect")
    proxy.add_argument("--listen", metavar="ADDRESS", help="accept socket connections here")
    proxy.add_argument("--to-vchan", nargs=2, metavar=("DOMID", "PORT"),
                       help="with --listen: the vchan server to connect to")
    proxy.add_argument("--timeout", default="inf", metavar="SECONDS",
                       help="how long a connection waits for the vchan server (default inf: "
                            "as long as its domain exists)")
    proxy.add_argument("-m", "--mode", metavar="client|server",
                       help="vchan-socket-proxy form: vchan client (default) or server")
    proxy.add_argument("-s", "--state-path", metavar="PATH",
                       help="write 'running' to this XenStore path once ready")
    proxy.set_defaults(progress=False)
    _common(proxy)
    proxy.set_defaults(func=_proxy)
