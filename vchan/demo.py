"""The quick-start demonstration: vchan streams between two domains.

A server process in emulated domain 1 and a client process in emulated
domain 2 (on real Xen: this domain and the one given) talk through
``vchan.start_server`` / ``vchan.open_connection``: the client streams data
with SHA-256 checked at both ends, then measures request/response round
trips.  The same runs over a Unix socket for comparison.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["DemoResult", "run_demo"]

PORT = "vchan-demo"
BLOCK = 64 * 1024


@dataclass
class DemoResult:
    """One transport's numbers."""

    transport: str
    nbytes: int
    seconds: float
    sha256_sent: str
    sha256_received: str
    rtt_p50_us: float

    @property
    def ok(self) -> bool:
        return self.sha256_sent == self.sha256_received

    @property
    def rate(self) -> float:
        return self.nbytes / self.seconds if self.seconds else 0.0


# -- the two roles, run in child processes ------------------------------------------


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sink the bulk stream and answer its SHA-256, then echo until EOF.

    A client that goes away (killed with the demo on Ctrl-C, which kills the
    client first; or failed, which the demo reports from the client's side)
    ends its connection quietly here: reset (vchan) or closed early (a Unix
    socket's EOF)."""
    try:
        await _sink_then_echo(reader, writer)
    except (ConnectionError, EOFError):
        writer.transport.abort()


async def _sink_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    header = await reader.readexactly(8)
    nbytes = int.from_bytes(header, "big")
    digest = hashlib.sha256()
    left = nbytes
    while left:
        data = await reader.read(min(left, 1 << 20))
        if not data:
            raise EOFError("stream ended early")
        digest.update(data)
        left -= len(data)
    writer.write(digest.hexdigest().encode())
    await writer.drain()
    while data := await reader.read(64):
        writer.write(data)
    writer.close()
    await writer.wait_closed()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  nbytes: int) -> dict[str, Any]:
    block = os.urandom(BLOCK)
    digest = hashlib.sha256()
    writer.write(nbytes.to_bytes(8, "big"))
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        piece = block[: min(BLOCK, nbytes - sent)]
        writer.write(piece)
        digest.update(piece)
        sent += len(piece)
        await writer.drain()
    answer = (await reader.readexactly(64)).decode()
    seconds = time.perf_counter() - t0
    rtts = []
    for _ in range(2000):
        t = time.perf_counter()
        writer.write(b"x" * 64)
        await reader.readexactly(64)
        rtts.append(time.perf_counter() - t)
    writer.close()
    await writer.wait_closed()
    rtts.sort()
    return {"nbytes": nbytes, "seconds": seconds, "sent": digest.hexdigest(),
            "received": answer, "rtt_p50_us": rtts[len(rtts) // 2] * 1e6}


async def _role(role: str, transport: str, nbytes: int, address: str) -> None:
    import vchan

    if role == "server":
        server: asyncio.AbstractServer
        if transport == "vchan":
            server = await vchan.start_server(_serve, PORT, peers=int(address))
        else:
            server = await asyncio.start_unix_server(_serve, address)
        print(json.dumps({"ready": True}), flush=True)
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        return
    if transport == "vchan":
        reader, writer = await vchan.open_connection(int(address), PORT, timeout=30)
    else:
        reader, writer = await asyncio.open_unix_connection(address)
    print(json.dumps(await _client(reader, writer, nbytes)), flush=True)


def _child(role: str, transport: str, nbytes: int, address: str,
           env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vchan.demo", role, transport, str(nbytes), address],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _run_pair(transport: str, nbytes: int, server_domid: int, client_domid: int,
              tmp: str) -> DemoResult:
    env = dict(os.environ)
    if transport == "vchan":
        s_env = dict(env, VCHAN_DOMID=str(server_domid))
        c_env = dict(env, VCHAN_DOMID=str(client_domid))
        s_addr, c_addr = str(client_domid), str(server_domid)
    else:
        s_env = c_env = env
        s_addr = c_addr = os.path.join(tmp, "demo.sock")
    server = _child("server", transport, nbytes, s_addr, s_env)
    try:
        assert server.stdout is not None and server.stdin is not None
        if not server.stdout.readline():
            raise RuntimeError(f"the {transport} demo server failed to start")
        client = _child("client", transport, nbytes, c_addr, c_env)
        try:
            out, _ = client.communicate(timeout=600)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        if client.returncode:
            raise RuntimeError(f"the {transport} demo client failed ({client.returncode})")
        r = json.loads(out)
        server.stdin.close()
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return DemoResult(transport, r["nbytes"], r["seconds"], r["sent"], r["received"],
                      r["rtt_p50_us"])


def run_demo(nbytes: int = 512 << 20, *, compare: bool = True) -> list[DemoResult]:
    """Run the demonstration; one result per transport."""
    from .backend import default_backend_name

    if default_backend_name() != "sim":
        raise RuntimeError("the demo plays two domains on the emulator: run it with "
                           "VCHAN_BACKEND=sim (on real Xen, run a server and a client in "
                           "two real domains)")
    with tempfile.TemporaryDirectory(prefix="vchan-demo-") as tmp:
        results = [_run_pair("vchan", nbytes, 1, 2, tmp)]
        if compare and hasattr(socket, "AF_UNIX"):
            results.append(_run_pair("unix", nbytes, 1, 2, tmp))
    return results


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the demo command ends (and
    # kills) its processes itself, which must not print tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_role(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
