# examples/plain_tcp.py -- plain asyncio over TCP, not a line of vchan in it
import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()


async def main(role: str, port: int) -> None:
    if role == "serve":
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello\n")
    print((await reader.readline()).decode().strip(), "over",
          writer.get_extra_info("vchan_via", "tcp"))   # (only to show the path taken)
    writer.close()


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
