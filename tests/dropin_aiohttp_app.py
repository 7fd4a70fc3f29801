"""An aiohttp web server and client that know nothing of vchan.

    python dropin_aiohttp_app.py serve HOST PORT
    python dropin_aiohttp_app.py fetch URL

For ``vchan run`` (tests/test_dropin_run.py): run under it, they talk over
vchan between co-resident domains; run without it, over TCP.  ``serve``
prints aiohttp's "Running on" line when ready; ``fetch`` asks ``/via`` and
posts 1 MiB to ``/echo``, then prints one JSON line: which way each side
says the connection went (``str(get_extra_info("vchan_via"))``: "vchan",
"tcp" or "None" -- a transport that carries no such key) and whether the
echo came back intact.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import sys

from aiohttp import ClientSession, web


async def via(request: web.Request) -> web.Response:
    transport = request.transport
    said = transport.get_extra_info("vchan_via") if transport is not None else None
    return web.json_response({"via": str(said), "peer": request.remote})


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=8 << 20)
    app.router.add_get("/via", via)
    app.router.add_post("/echo", echo)
    web.run_app(app, host=host, port=port, print=functools.partial(print, flush=True))


async def fetch(url: str) -> None:
    body = random.Random(3).randbytes(1 << 20)
    async with ClientSession() as session:
        async with session.get(f"{url}/via") as resp:
            server = await resp.json()
        async with session.post(f"{url}/echo", data=body) as resp:
            # (The connection is the response's until its 1 MiB body is read.)
            assert resp.connection is not None and resp.connection.transport is not None
            client_via = str(resp.connection.transport.get_extra_info("vchan_via"))
            back = await resp.read()
    print(json.dumps({"client_via": client_via, "server_via": server["via"],
                      "server_saw": server["peer"],
                      "echo_intact": hashlib.sha256(back).digest() ==
                      hashlib.sha256(body).digest()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(fetch(sys.argv[2]))
