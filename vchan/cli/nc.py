"""``vchan listen`` and ``vchan connect``: nc over vchan.

stdin goes to the peer, what the peer sends goes to stdout
(:mod:`vchan.cli.stdio`); one connection, as ``nc -l`` / ``nc``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from . import options
from .errors import UsageError
from .loop import run_coroutine
from .stdio import stdio_session

__all__ = ["add_parsers"]

log = logging.getLogger(__name__)


def _listen(args: argparse.Namespace) -> int:
    port = options.vchan_port(args.port)
    peers = options.peers(args.peers)
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
            return await stdio_session(reader, writer, args)
        finally:
            await server.wait_closed()

    return run_coroutine(args, run)


def _connect(args: argparse.Namespace) -> int:
    domid = options.domid(args.domid)
    port = options.vchan_port(args.port)
    timeout = options.timeout(args.timeout)

    async def run() -> int:
        import vchan

        reader, writer = await vchan.open_connection(domid, port, timeout=timeout)
        log.info("connected to domain %s port %s", domid, port)
        return await stdio_session(reader, writer, args)

    return run_coroutine(args, run)


def add_parsers(subparsers: Any) -> None:
    """Add ``listen`` and ``connect`` to the ``vchan`` command's subparsers."""
    listen = options.subcommand(
        subparsers, "listen", help="serve a vchan port and connect it to stdin/stdout (nc -l)",
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
    options.progress_options(listen)
    options.common(listen)
    listen.set_defaults(func=_listen)

    connect = options.subcommand(
        subparsers, "connect", help="connect to a vchan port, with stdin/stdout (nc)",
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
    options.progress_options(connect)
    options.common(connect)
    connect.set_defaults(func=_connect)
