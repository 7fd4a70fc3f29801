# examples/echo_client.py -- its client, in domain 2 (README, first example)
import asyncio
import sys

import vchan


async def main(domid: int, port: int | str) -> None:
    # was: asyncio.open_connection(host, 8080)
    reader, writer = await vchan.open_connection(domid, port)
    writer.write(b"hello over vchan")
    await writer.drain()
    print(await reader.read(100))
    writer.close()
    await writer.wait_closed()


domid, port = (int(sys.argv[1]), sys.argv[2]) if len(sys.argv) > 2 else (1, 8080)
asyncio.run(main(domid, port))
