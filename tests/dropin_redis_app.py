"""Two asyncio programs that know nothing of vchan, around a Redis server.

    python dropin_redis_app.py front HOST PORT UNIX_PATH LOG_PATH
    python dropin_redis_app.py client HOST PORT

``front`` is a small asyncio TCP server that forwards each connection to a
redis-server's Unix socket (as a sidecar would): it prints ``ready`` and,
for each connection that ends, appends ``via <vchan_via>`` to LOG_PATH (what
the transport says: "vchan", "tcp" or "None" for a transport without the
key).  ``client`` is
redis-py's asyncio client: SET/GET, a pipeline and INCR from several
concurrent tasks, then one JSON line of what came back.  Under ``vchan run``
(tests/test_dropin_run.py) they talk over vchan between emulated domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


async def front(host: str, port: int, path: str, log: str) -> None:
    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        via = writer.get_extra_info("vchan_via")
        up_reader, up_writer = await asyncio.open_unix_connection(path)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        up_writer.close()
        writer.close()
        with open(log, "a") as f:
            f.write(f"via {via}\n")

    server = await asyncio.start_server(forward, host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def client(host: str, port: int) -> None:
    import redis.asyncio as redis

    r = redis.Redis(host=host, port=port)
    try:
        async def worker(n: int) -> int:
            ok = 0
            for i in range(100):
                key = f"k{n}:{i}"
                await r.set(key, f"v{n}:{i}" * 10)
                ok += await r.get(key) == f"v{n}:{i}".encode() * 10
            return ok

        counts = await asyncio.gather(*(worker(n) for n in range(8)))
        async with r.pipeline(transaction=True) as pipe:
            for _ in range(50):
                pipe.incr("counter")
            incrs = await pipe.execute()
        big = b"x" * (1 << 20)
        await r.set("big", big)
        print(json.dumps({"get_ok": sum(counts), "last_incr": incrs[-1],
                          "big_ok": await r.get("big") == big}), flush=True)
    finally:
        await r.aclose()


if __name__ == "__main__":
    if sys.argv[1] == "front":
        asyncio.run(front(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))
