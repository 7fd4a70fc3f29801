"""Per-call cost of vchan.StreamReader against asyncio.StreamReader, and of
vchan.StreamWriter's write() + drain() against asyncio.StreamWriter's.

The same bytes are fed to both readers (no transport, no other process), then
read back the way two common users read: length-prefixed 64 B messages
(``readexactly(4)`` + ``readexactly(60)``) and ``read(4096)`` of 64 KiB pieces.
This is the receiver's Python cost per call that bounds the small-message
cells of ``vchan bench --cases matrix`` for every transport.  The writers
write 1 KiB and drain, in a loop, to a transport that keeps nothing: the
sender's Python cost per call outside the transport.

    python benchmarks/reader_calls.py [--messages 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import vchan


async def _framed(cls: type[asyncio.StreamReader], messages: int) -> float:
    reader = cls(limit=1 << 30)
    batch = ((60).to_bytes(4, "big") + b"x" * 60) * 1024
    for _ in range(messages // 1024):
        reader.feed_data(batch)
    reader.feed_eof()
    n = messages // 1024 * 1024
    t0 = time.perf_counter()
    for _ in range(n):
        head = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(head, "big"))
    return (time.perf_counter() - t0) / n


async def _read_4k(cls: type[asyncio.StreamReader], pieces: int) -> float:
    reader = cls(limit=1 << 30)
    for _ in range(pieces):
        reader.feed_data(b"y" * 65536)
    reader.feed_eof()
    calls = 0
    t0 = time.perf_counter()
    while await reader.read(4096):
        calls += 1
    return (time.perf_counter() - t0) / calls


class _Sink(asyncio.Transport):
    """A transport that takes every write and keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: object) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def _write_drain(cls: type[asyncio.StreamWriter], calls: int) -> float:
    loop = asyncio.get_running_loop()
    reader = vchan.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _Sink()
    protocol.connection_made(transport)
    writer = cls(transport, protocol, reader, loop)
    data = b"x" * 1024
    t0 = time.perf_counter()
    for _ in range(calls):
        writer.write(data)
        await writer.drain()
    seconds = time.perf_counter() - t0
    writer.close()
    return seconds / calls


async def main(messages: int, repeat: int) -> None:
    for name, cls in (("asyncio.StreamReader", asyncio.StreamReader),
                      ("vchan.StreamReader", vchan.StreamReader)):
        framed = statistics.median([await _framed(cls, messages) for _ in range(repeat)])
        small = statistics.median([await _read_4k(cls, 256) for _ in range(repeat)])
        print(f"{name:22} readexactly(4)+readexactly(60): {framed * 1e9:6.0f} ns a message; "
              f"read(4096): {small * 1e9:6.0f} ns a call")
    for name, wcls in (("asyncio.StreamWriter", asyncio.StreamWriter),
                       ("vchan.StreamWriter", vchan.StreamWriter)):
        wd = statistics.median([await _write_drain(wcls, messages) for _ in range(repeat)])
        print(f"{name:22} write(1 KiB) + drain(): {wd * 1e9:6.0f} ns a call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.repeat))
