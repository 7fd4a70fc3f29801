# examples/dropin_one_line.py -- the same program with the one line instead of `vchan run`
import asyncio
import sys

import vchan


async def main(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello\n")
    print((await reader.readline()).decode().strip(), "over",
          writer.get_extra_info("vchan_via", "tcp"))
    writer.close()


vchan.dropin_loop.run(main(int(sys.argv[1])))       # instead of asyncio.run(main(...))
