"""Socket addresses of the ``vchan proxy`` command: ``tcp:HOST:PORT`` and ``unix:PATH``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

from .errors import UsageError, oserror_text

__all__ = ["SocketAddress", "describe_sockets"]


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
                      + "; ".join(oserror_text(e) for e in errors))

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


def describe_sockets(sockets: list[socket.socket], address: SocketAddress) -> str:
    """Where ``sockets`` (bound for ``address``) listen, for the log: the bound ports."""
    if address.path is not None:
        return f"unix:{address.path}"
    names = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}")
    return ", ".join(names)
