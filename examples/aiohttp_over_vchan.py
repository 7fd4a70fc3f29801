"""An unmodified aiohttp web application served and fetched over vchan.

The application is an ordinary ``web.Application``.  Serving it over vchan is
giving its protocol factory (``AppRunner.server``) to ``vchan.create_server``
instead of ``loop.create_server``; fetching from another domain is an aiohttp
``ClientSession`` whose connector opens vchan connections instead of TCP ones.

    VCHAN_DOMID=1 python examples/aiohttp_over_vchan.py serve    # domain 1
    VCHAN_DOMID=2 python examples/aiohttp_over_vchan.py fetch    # domain 2

``serve`` prints ``serving on vchan port PORT`` when it is ready and runs until
SIGINT/SIGTERM; ``fetch`` makes a few requests, prints the responses and exits
(0 if all answered as expected).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import BaseConnector, ClientRequest, ClientSession, ClientTimeout, web
from aiohttp.client_proto import ResponseHandler
from aiohttp.tracing import Trace

import vchan

# -- the application: nothing vchan-specific here -----------------------------


async def hello(request: web.Request) -> web.Response:
    name = request.query.get("name", "world")
    return web.Response(text=f"Hello, {name}!")


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"length": len(body), "body": body.decode("utf-8", "replace")})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    return app


# -- serving it over vchan ------------------------------------------------------


async def serve(port: str, peers: int) -> None:
    runner = web.AppRunner(make_app())
    await runner.setup()
    factory = runner.server          # an asyncio protocol factory
    assert factory is not None
    server = await vchan.create_server(factory, port, peers=peers)
    print(f"serving on vchan port {port} for domain {peers}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()
    print("stopped", flush=True)


# -- fetching over vchan ----------------------------------------------------------


class VchanConnector(BaseConnector):
    """An aiohttp connector whose connections all go to one vchan server.

    The URL's host and port are not looked at: every request goes to vchan
    port ``port`` of domain ``domid`` (use e.g. ``http://vchan/path``).
    """

    def __init__(self, domid: int, port: int | str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.domid = domid
        self.port = port

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: ClientTimeout
    ) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout.sock_connect):
            _, proto = await vchan.create_connection(
                lambda: ResponseHandler(loop), self.domid, self.port)
        assert isinstance(proto, ResponseHandler)
        return proto


async def fetch(domid: int, port: str) -> int:
    ok = True
    timeout = ClientTimeout(total=30, sock_connect=20)
    async with ClientSession(connector=VchanConnector(domid, port), timeout=timeout) as session:
        async with session.get("http://vchan/hello") as resp:
            text = await resp.text()
            print(f"GET /hello -> {resp.status} {text}")
            ok &= resp.status == 200 and text == "Hello, world!"
        async with session.get("http://vchan/hello", params={"name": "domain 2"}) as resp:
            text = await resp.text()
            print(f"GET /hello?name=domain+2 -> {resp.status} {text}")
            ok &= resp.status == 200 and text == "Hello, domain 2!"
        payload = "x" * 100_000
        async with session.post("http://vchan/echo", data=payload) as resp:
            reply = await resp.json()
            print(f"POST /echo ({len(payload)} bytes) -> {resp.status} length={reply['length']}")
            ok &= resp.status == 200 and reply == {"length": len(payload), "body": payload}
        async with session.post("http://vchan/echo", data="ping") as resp:
            body = await resp.text()
            print(f"POST /echo -> {resp.status} {body}")
            ok &= resp.status == 200 and json.loads(body) == {"length": 4, "body": "ping"}
        async with session.get("http://vchan/missing") as resp:
            print(f"GET /missing -> {resp.status}")
            ok &= resp.status == 404
    print("all responses as expected" if ok else "UNEXPECTED RESPONSES", flush=True)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve", help="serve the application (run in domain 1)")
    s.add_argument("--port", default="aiohttp", help="vchan port (default: aiohttp)")
    s.add_argument("--peers", type=int, default=2, help="client domain (default: 2)")
    f = sub.add_parser("fetch", help="fetch from the application (run in domain 2)")
    f.add_argument("--port", default="aiohttp", help="vchan port (default: aiohttp)")
    f.add_argument("--domid", type=int, default=1, help="server's domain (default: 1)")
    args = p.parse_args()
    if args.role == "serve":
        asyncio.run(serve(args.port, args.peers))
        return 0
    return asyncio.run(fetch(args.domid, args.port))


if __name__ == "__main__":
    sys.exit(main())
