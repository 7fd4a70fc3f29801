# examples/echo_server.py -- an echo server in domain 1 (README, first example)
import asyncio
import sys

import vchan


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


async def main() -> None:
    server: asyncio.AbstractServer
    if sys.argv[1:2] == ["--unix"]:     # the same handler on a Unix socket
        server = await asyncio.start_unix_server(handle, sys.argv[2])
    else:                               # was: asyncio.start_server(handle, host, 8080)
        server = await vchan.start_server(handle, 8080, peers=2)
    async with server:
        await server.serve_forever()


asyncio.run(main())
