"""Drop-in for unmodified asyncio programs: event loops whose TCP goes through vchan.dropin.

A wrapped loop's ``create_connection(factory, host, port)`` and
``create_server(factory, host, port)`` are :func:`vchan.dropin.create_connection`
and :func:`vchan.dropin.create_server`, so everything built on them --
``asyncio.open_connection`` / ``start_server``, aiohttp, redis.asyncio --
reaches co-resident domains over vchan and everything else over TCP,
unchanged.  What is not a TCP address (Unix sockets, TLS, pipes, UDP) goes
to the loop as before.

One line at start-up, no event loop policy::

    vchan.dropin_loop.run(main())                                   # any Python
    asyncio.run(main(), loop_factory=vchan.dropin_loop.new_event_loop)   # 3.12+
    with asyncio.Runner(loop_factory=vchan.dropin_loop.new_event_loop) as runner:
        runner.run(main())

or none at all: ``vchan run -- python app.py`` runs the program with
:func:`install` done at interpreter start-up (``vchan/_site/sitecustomize.py``).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from . import dropin

__all__ = ["install", "installed", "new_event_loop", "run", "uninstall", "wrap_loop"]

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

_original_new_event_loop: LoopFactory = asyncio.events.new_event_loop
_installed: dict[str, Any] = {}


def _is_tcp_address(host: Any, port: Any) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and \
        (host is None or isinstance(host, str) or
         (isinstance(host, list | tuple) and all(isinstance(h, str) for h in host)))


def wrap_loop(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """Make ``loop``'s TCP ``create_connection`` / ``create_server`` drop-in
    (in place; the loop is returned).  Wrapping twice changes nothing."""
    if getattr(loop, "_vchan_tcp", None) is not None:
        return loop
    tcp_connect = loop.create_connection
    tcp_serve = loop.create_server

    async def create_connection(protocol_factory: Callable[[], asyncio.BaseProtocol],
                                host: Any = None, port: Any = None, **options: Any) -> Any:
        if not options.get("ssl"):
            sock = options.get("sock")
            if host is not None and sock is None and _is_tcp_address(host, port):
                return await dropin.create_connection(protocol_factory, host, port, **options)
            if sock is not None and host is None and port is None and \
                    sock.family in (socket.AF_INET, socket.AF_INET6) and \
                    sock.type == socket.SOCK_STREAM:
                rest = {k: v for k, v in options.items() if k != "sock"}
                return await dropin.create_connection_on(protocol_factory, sock, **rest)
        return await tcp_connect(protocol_factory, host, port, **options)

    async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol],
                            host: Any = None, port: Any = None, **options: Any) -> Any:
        if not options.get("ssl") and options.get("sock") is None and \
                _is_tcp_address(host, port):
            return await dropin.create_server(protocol_factory, host, port, **options)
        return await tcp_serve(protocol_factory, host, port, **options)

    create_connection.__doc__ = dropin.create_connection.__doc__
    create_server.__doc__ = dropin.create_server.__doc__
    loop._vchan_tcp = (tcp_connect, tcp_serve)  # type: ignore[attr-defined]
    loop.create_connection = create_connection  # type: ignore[method-assign]
    loop.create_server = create_server  # type: ignore[method-assign]
    return loop


def _base_factory(kind: str | None) -> LoopFactory:
    if kind in (None, "", "asyncio"):
        return _original_new_event_loop
    if kind == "uvloop":
        import uvloop

        return cast(LoopFactory, _installed.get("uvloop_new_event_loop",
                                                uvloop.new_event_loop))
    raise ValueError(f"unknown event loop {kind!r} (asyncio or uvloop)")


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop (``kind``: None for the usual one, ``"asyncio"`` or
    ``"uvloop"``) whose TCP connections and servers are drop-in: a loop
    factory for :class:`asyncio.Runner` and ``asyncio.run(loop_factory=)``."""
    if kind is None and _installed:
        kind = _installed.get("kind")
    return wrap_loop(_base_factory(kind)())


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None,
        loop: str | None = None) -> T:
    """``asyncio.run(main)`` on a drop-in event loop (``loop``: ``"asyncio"``,
    ``"uvloop"`` or None for the usual one)."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(main)


def install(kind: str | None = None) -> None:
    """Make every event loop this process creates from now on drop-in.

    Replaces ``asyncio.new_event_loop`` (which ``asyncio.run()`` and
    ``asyncio.Runner`` call when given no loop factory) and, if uvloop is
    there, ``uvloop.new_event_loop`` (``uvloop.run()``'s), by wrapping
    factories; no event loop policy is touched.  ``kind`` (``"asyncio"`` or
    ``"uvloop"``) also chooses the loop the plain ``asyncio`` calls get.  A
    loop made before, or by ``asyncio.get_event_loop()`` outside a running
    loop (a policy's), is not changed: use :func:`wrap_loop` for it.
    """
    _base_factory(kind)                 # (an unknown kind fails before anything changes)
    if _installed:
        _installed["kind"] = kind
        return
    _installed["kind"] = kind

    def patched_new_event_loop() -> asyncio.AbstractEventLoop:
        return new_event_loop()

    _installed["asyncio"] = asyncio.events.new_event_loop
    asyncio.events.new_event_loop = patched_new_event_loop
    asyncio.new_event_loop = patched_new_event_loop
    uv: Any = sys.modules.get("uvloop")
    if uv is None:
        try:
            import uvloop as uv
        except ImportError:
            uv = None
    if uv is not None:
        original = uv.new_event_loop
        _installed["uvloop_new_event_loop"] = original

        def patched_uvloop() -> asyncio.AbstractEventLoop:
            return wrap_loop(original())

        uv.new_event_loop = patched_uvloop


def installed() -> bool:
    """Whether :func:`install` is in force."""
    return bool(_installed)


def uninstall() -> None:
    """Undo :func:`install` (loops already made stay drop-in)."""
    if not _installed:
        return
    asyncio.events.new_event_loop = _installed["asyncio"]
    asyncio.new_event_loop = _installed["asyncio"]
    original = _installed.get("uvloop_new_event_loop")
    if original is not None:
        import uvloop

        uvloop.new_event_loop = original
    _installed.clear()
