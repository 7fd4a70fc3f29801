"""``vchan listen`` / ``connect`` / ``proxy`` run as a user runs them: subprocesses.

Each command runs in its own emulated domain (VCHAN_DOMID).  Servers are
started first and waited for (their "listening" line with -v) before clients.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import pytest
from procs import Children, Proc
from support import grant_limit

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "vchan"]


def _env(domid: int) -> dict[str, str]:
    env = dict(os.environ, VCHAN_DOMID=str(domid))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _port() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def cmds(sim_dir: Path, children: Children) -> Children:
    """The test's ``vchan`` commands, killed and reaped at its end."""
    return children


def _start(cmds: Children, domid: int, *args: str, stdin: Any = subprocess.DEVNULL,
           stdout: Any = subprocess.PIPE) -> Proc:
    """A ``vchan`` command in emulated domain ``domid`` (stderr: ``.stderr``)."""
    return cmds.start([*CLI, *args], domid=domid, env=_env(domid), cwd=ROOT, stdin=stdin,
                      stdout=stdout, name=f"vchan {' '.join(args[:2])}", grace=0)


def _read_in_thread(f: IO[bytes]) -> Future[bytes]:
    future: Future[bytes] = Future()
    threading.Thread(target=lambda: future.set_result(f.read()), daemon=True).start()
    return future


def _one_line_error(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("vchan: "), stderr


LOOPS = ["asyncio", "uvloop"]


# -- listen / connect ----------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_listen_connect_both_ways(cmds: Children, tmp_path: Path, loop: str) -> None:
    rnd = random.Random(7)
    to_client, to_server = rnd.randbytes(3 << 20), rnd.randbytes(5 << 20)
    (tmp_path / "a").write_bytes(to_client)
    (tmp_path / "b").write_bytes(to_server)
    port = _port()
    with open(tmp_path / "a", "rb") as a, open(tmp_path / "b", "rb") as b:
        server = _start(cmds, 1, "listen", port, "--peers", "2", "-v",
                        "--loop", loop, stdin=a)
        server.wait_stderr("listening")
        client = _start(cmds, 2, "connect", "1", port, "--loop", loop, stdin=b)
        assert server.proc.stdout is not None and client.proc.stdout is not None
        reading = _read_in_thread(server.proc.stdout)
        got_client = client.proc.stdout.read()
        got_server = reading.result(60)
    assert client.proc.wait(30) == 0, client.stderr
    assert server.proc.wait(30) == 0, server.stderr
    assert got_client == to_client
    assert got_server == to_server
    assert client.stderr == ""


def test_dev_null_and_progress(cmds: Children, tmp_path: Path) -> None:
    """stdin /dev/null (not pollable) ends at once; --progress reports on stderr."""
    port = _port()
    server = _start(cmds, 1, "listen", port, "--peers", "2", "-v",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    server.wait_stderr("listening")
    client = _start(cmds, 2, "connect", "1", port, "--progress",
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert client.proc.stdin is not None
    client.proc.stdin.write(b"x" * 100_000)
    client.proc.stdin.flush()
    time.sleep(2.8)
    client.proc.stdin.close()
    assert client.proc.wait(30) == 0, client.stderr
    assert server.proc.wait(30) == 0, server.stderr
    assert "sent 97.7 KiB" in client.stderr
    assert "Traceback" not in client.stderr + server.stderr


def test_eof_is_a_half_close(cmds: Children, tmp_path: Path) -> None:
    """stdin EOF -> the peer sees EOF, and data still flows the other way."""
    port = _port()
    server = _start(cmds, 1, "listen", port, "--peers", "2", "-v",
                    stdin=subprocess.PIPE)
    server.wait_stderr("listening")
    client = _start(cmds, 2, "connect", "1", port, stdin=subprocess.PIPE)
    assert client.proc.stdin and server.proc.stdin and server.proc.stdout
    assert client.proc.stdout
    client.proc.stdin.write(b"hello")
    client.proc.stdin.close()                       # client: end of input
    assert server.proc.stdout.read() == b"hello"    # server's stdout sees EOF...
    assert server.proc.poll() is None               # ...but the server goes on
    assert client.proc.poll() is None
    server.proc.stdin.write(b"world")
    server.proc.stdin.flush()
    assert client.proc.stdout.read(5) == b"world"
    server.proc.stdin.close()
    assert client.proc.stdout.read() == b""
    assert server.proc.wait(30) == 0, server.stderr
    assert client.proc.wait(30) == 0, client.stderr
    assert "sent EOF" in server.stderr


@pytest.mark.parametrize("args", [
    ["connect", "x", "5000"],
    ["connect", "1", "bad port!"],
    ["connect", "1", "5000", "--timeout", "soon"],
    ["connect", "1", "5000", "--loop", "trio"],
    ["connect", "99999", "5000"],
    ["listen", "a/b"],
    ["listen", "5000", "--peers", "two"],
    ["listen", "5000", "--peers", "2,3", "--raw"],
    ["proxy"],
    ["proxy", "--listen-vchan", "80"],
    ["proxy", "--listen", "tcp:localhost", "--to-vchan", "1", "80"],
    ["proxy", "--listen", "udp:x:1", "--to-vchan", "1", "80"],
    ["proxy", "--listen-vchan", "80", "--to", "tcp:h:1", "--listen", "tcp::1"],
    ["proxy", "2", "/local/domain/0/device/foo", "/tmp/s"],
    ["proxy", "-m", "sideways", "2", "/local/domain/1/data/vchan/0/p", "/tmp/s"],
    ["proxy", "-m", "server", "2", "/local/domain/5/data/vchan/2/p", "/tmp/s"],
    ["proxy", "1", "2"],
])
def test_bad_arguments(sim_dir: Path, args: list[str]) -> None:
    r = subprocess.run([*CLI, *args], env=_env(0), cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    _one_line_error(r.stderr)


def test_missing_peer(sim_dir: Path) -> None:
    r = subprocess.run([*CLI, "connect", "77", "5000"], env=_env(2), cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    _one_line_error(r.stderr)
    assert "domain 77 does not exist" in r.stderr
    # Domain 0 exists, but nobody serves the port.
    t = time.monotonic()
    r = subprocess.run([*CLI, "connect", "0", _port(), "--timeout", "0.5"], env=_env(2),
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    _one_line_error(r.stderr)
    assert "timed out" in r.stderr
    assert time.monotonic() - t < 15


def test_proxy_unreachable_target(cmds: Children, tmp_path: Path) -> None:
    """A refused socket connection closes the vchan side; the proxy goes on."""
    port = _port()
    proxy = _start(cmds, 1, "proxy", "--listen-vchan", port, "--peers", "2",
                   "--to", f"unix:{tmp_path}/nobody.sock", "-v")
    proxy.wait_stderr("listening")
    r = subprocess.run([*CLI, "connect", "1", port], env=_env(2), cwd=ROOT, input=b"x",
                       capture_output=True, timeout=30)
    assert r.stdout == b""
    assert "Traceback" not in r.stderr.decode()
    proxy.wait_stderr("cannot reach")
    assert proxy.proc.poll() is None
    assert proxy.stop() == 0


# -- proxy -------------------------------------------------------------------


def _loop_kind() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _exchange(connect: Any, payload: bytes) -> bytes:
    reader, writer = await connect()

    async def send() -> None:
        for i in range(0, len(payload), 50_000):
            writer.write(payload[i:i + 50_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        got: bytes = await reader.read(-1)
        await sender
    finally:        # (a failed exchange leaves no task whose error nobody retrieves)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    await writer.wait_closed()
    return got


async def _wait_for(cmd: Proc, pattern: str) -> re.Match[str]:
    return await asyncio.get_running_loop().run_in_executor(None, cmd.wait_stderr, pattern)


@pytest.fixture
def many_grants(sim_dir: Path) -> Iterator[None]:
    """100 connections of 1 MiB rings need more than Xen's default 1,024 pages."""
    with grant_limit(sim_dir, 65536):
        yield


async def test_proxy_both_directions_100_connections(cmds: Children, tmp_path: Path,
                                                     many_grants: None) -> None:
    """TCP clients -> proxy (dom 2) -> vchan -> proxy (dom 1) -> TCP echo server."""
    loop = _loop_kind()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=512)
    echo_port = echo.sockets[0].getsockname()[1]
    port = _port()
    inner = _start(cmds, 1, "proxy", "--listen-vchan", port, "--peers", "2",
                   "--to", f"tcp:127.0.0.1:{echo_port}", "--loop", loop, "-v")
    await _wait_for(inner, "listening")
    outer = _start(cmds, 2, "proxy", "--listen", "tcp:127.0.0.1:0",
                   "--to-vchan", "1", port, "--loop", loop, "-v")
    m = await _wait_for(outer, r"listening on tcp:127\.0\.0\.1:(\d+)")
    front = int(m[1])
    rnd = random.Random(3)
    payloads = [rnd.randbytes(rnd.choice([1, 1000, 65536, 300_000])) for _ in range(100)]
    async with echo:
        results = await asyncio.wait_for(asyncio.gather(*(
            _exchange(lambda: asyncio.open_connection("127.0.0.1", front), p)
            for p in payloads)), 120)
    assert [len(r) for r in results] == [len(p) for p in payloads]
    assert results == payloads
    assert await asyncio.to_thread(outer.stop) == 0, outer.stderr
    assert await asyncio.to_thread(inner.stop) == 0, inner.stderr
    assert outer.stderr.count("bridged") == 100
    assert inner.stderr.count("bridged") == 100
    assert "Traceback" not in outer.stderr + inner.stderr


async def test_proxy_socket_proxy_form(cmds: Children, tmp_path: Path) -> None:
    """vchan-socket-proxy's arguments: -m server in dom 1, -m client in dom 2 (Unix)."""
    loop = _loop_kind()
    echo_path = str(tmp_path / "echo.sock")
    front = str(tmp_path / "front.sock")
    echo = await asyncio.start_unix_server(_echo, echo_path)
    name = _port()
    nodepath = f"/local/domain/1/data/vchan/2/{name}"
    server = _start(cmds, 1, "proxy", "-m", "server", "2", nodepath, echo_path,
                    "--loop", loop, "-v")
    await _wait_for(server, "listening")
    client = _start(cmds, 2, "proxy", "--mode=client", "-s",
                    "/local/domain/2/data/proxy-state", "1", nodepath, front, "-v",
                    "--loop", loop)
    await _wait_for(client, "listening")
    async with echo:
        for size in (10, 1 << 20):      # subsequent connections, as the C proxy serves
            payload = random.randbytes(size)
            try:
                got = await asyncio.wait_for(
                    _exchange(lambda: asyncio.open_unix_connection(front), payload), 60)
            except Exception as exc:
                raise AssertionError(f"{exc!r}; server: {server.stderr}; "
                                     f"client: {client.stderr}") from exc
            assert got == payload
    from vchan.xenstore import XenStore

    xs = await XenStore.open()
    try:
        assert await xs.read("/local/domain/2/data/proxy-state") == b"running"
    finally:
        await xs.close()
    assert await asyncio.to_thread(client.stop) == 0, client.stderr
    assert await asyncio.to_thread(server.stop) == 0, server.stderr


def test_proxy_socket_proxy_form_stdio(cmds: Children, tmp_path: Path) -> None:
    """``-`` : stdin/stdout in both modes, ending when the connection does."""
    name = _port()
    nodepath = f"/local/domain/1/data/vchan/2/{name}"
    server = _start(cmds, 1, "proxy", "-m", "server", "2", nodepath, "-", "-v",
                    stdin=subprocess.PIPE)
    server.wait_stderr("listening")
    client = _start(cmds, 2, "proxy", "1", nodepath, "-",
                    stdin=subprocess.PIPE)
    assert client.proc.stdin and client.proc.stdout and server.proc.stdin
    assert server.proc.stdout
    client.proc.stdin.write(b"ping")
    client.proc.stdin.close()
    assert server.proc.stdout.read() == b"ping"
    server.proc.stdin.write(b"pong")
    server.proc.stdin.close()
    assert client.proc.stdout.read() == b"pong"
    assert server.proc.wait(30) == 0, server.stderr
    assert client.proc.wait(30) == 0, client.stderr

