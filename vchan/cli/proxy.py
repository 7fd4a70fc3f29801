"""``vchan proxy``: bridge vchan and TCP or Unix sockets, in either direction.

Many connections at once, each spliced in C (:class:`vchan.proxy.SocketSplice`)
with flow control, half-close and close/reset carried across.  It also takes
the argument shape of Xen's ``vchan-socket-proxy``
(``[-m client|server] [-s PATH] DOMID NODEPATH SOCKET``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from ..addresses import parse_vchan_path
from . import options
from .errors import EXIT_INTERRUPTED, UsageError, error, oserror_text
from .loop import run_coroutine
from .sockets import SocketAddress, describe_sockets
from .stdio import stdio_session

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


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
        log.warning("link %d: cannot reach %s: %s", link, self.describe, oserror_text(exc))

    def follow(self, link: int, splice: Any) -> None:
        """Log the link's end once its splice closes."""
        async def watch() -> None:
            await splice.wait_closed()
            self.open -= 1
            if splice.error is not None:
                log.info("link %d closed: %s", link, oserror_text(splice.error))
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
        error("interrupted")       # Ctrl-C: as every command says it, and 128 + SIGINT
        return EXIT_INTERRUPTED
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
    from ..xenstore import XenStore

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
        port = options.vchan_port(args.listen_vchan)
        peers = options.peers(args.peers)
        if args.raw and not isinstance(peers, int):
            raise UsageError("--raw serves one libxenvchan client at a time: --peers must "
                             "be one domain id")
        target = SocketAddress(args.to)
        return run_coroutine(args, lambda: _vchan_to_socket(port, peers, args.raw, target,
                                                            args.state_path))
    if args.listen is not None:
        if not args.to_vchan:
            raise UsageError("proxy --listen ADDRESS: say where to with --to-vchan DOMID PORT")
        if args.to:
            raise UsageError("proxy: --listen goes with --to-vchan, not --to")
        listen = SocketAddress(args.listen)
        domid = options.domid(args.to_vchan[0])
        port = options.vchan_port(args.to_vchan[1])
        timeout = options.timeout(args.timeout)
        return run_coroutine(args, lambda: _socket_to_vchan(listen, domid, port, timeout,
                                                            args.state_path))
    raise UsageError("proxy: say --listen-vchan PORT --to ADDRESS, --listen ADDRESS "
                     "--to-vchan DOMID PORT, or DOMID NODEPATH SOCKET (see vchan proxy --help)")


async def _vchan_to_socket(port: int | str, peers: Any, raw: bool, target: SocketAddress,
                           state_path: str | None) -> int:
    import vchan

    from ..proxy import SocketSplice

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

    from ..proxy import SocketListener, SocketSplice

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
        where = describe_sockets(listener.sockets, listen)
    log.info("listening on %s, forwarding to vchan domain %s port %s", where, domid, port)
    try:
        async with listener, _state(state_path):
            return await _serve_until_signal([listener])
    finally:
        await bridge.cancel()


def _socket_proxy(args: argparse.Namespace) -> int:
    """The vchan-socket-proxy form: [-m client|server] [-s PATH] DOMID NODEPATH SOCKET."""
    from .. import own_domid

    if len(args.positional) != 3:
        raise UsageError("proxy: the vchan-socket-proxy form takes DOMID NODEPATH "
                         "SOCKET-PATH|FD|-")
    domid = options.domid(args.positional[0])
    nodepath = args.positional[1]
    parsed = parse_vchan_path(nodepath)
    if parsed is None:
        raise UsageError(
            f"nodepath {nodepath!r} is not of vchan's form /local/domain/SERVER/data/vchan/"
            f"CLIENT/PORT (other paths are not supported)")
    server_domid, client_domid, port = parsed
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
            return run_coroutine(args, lambda: _serve_one_fd(domid, port, fd, args))
        return run_coroutine(args, lambda: _vchan_to_socket(
            port, domid, True, SocketAddress(target), args.state_path))
    timeout = options.timeout(args.timeout)
    if target == "-":
        return run_coroutine(args, lambda: _connect_one_fd(domid, port, timeout, None, args))
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise UsageError(f"fd {fd} is not a listening socket: {exc.strerror}") from None
        return run_coroutine(args, lambda: _socket_to_vchan(
            SocketAddress(f"unix:fd{fd}"), domid, port, timeout, args.state_path, sock=sock))
    return run_coroutine(args, lambda: _socket_to_vchan(SocketAddress(target), domid, port,
                                                        timeout, args.state_path))


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
                return await stdio_session(reader, writer, args)
            return await stdio_session(reader, writer, args, fd, fd)
        finally:
            await server.wait_closed()


async def _connect_one_fd(domid: int, port: int | str, timeout: float | None, fd: int | None,
                          args: argparse.Namespace) -> int:
    import vchan

    async with _state(args.state_path):
        reader, writer = await vchan.open_connection(domid, port, timeout=timeout)
        if fd is None:
            return await stdio_session(reader, writer, args)
        return await stdio_session(reader, writer, args, fd, fd)


def add_parser(subparsers: Any) -> None:
    """Add ``proxy`` to the ``vchan`` command's subparsers."""
    proxy = options.subcommand(
        subparsers, "proxy",
        help="bridge vchan and TCP/Unix sockets (also vchan-socket-proxy's form)",
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
    options.common(proxy)
    proxy.set_defaults(func=_proxy)
