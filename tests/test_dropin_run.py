"""Unmodified asyncio programs made drop-in: ``vchan run`` and vchan.dropin_loop.

The aiohttp programs (``tests/dropin_aiohttp_app.py``) import nothing of
vchan; they run in emulated domains 1 and 2, under ``vchan run`` or not, on
the test's loop kind (``vchan run --loop``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from test_streams import _loop_kind

import vchan
from vchan import dropin, dropin_loop

APP = Path(__file__).with_name("dropin_aiohttp_app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(under_vchan_run: bool, loop: str, *args: str) -> list[str]:
    program = [sys.executable, str(APP), *args]
    if not under_vchan_run:
        return program
    return [sys.executable, "-m", "vchan", "run", "--loop", loop, "--", *program]


@pytest.fixture
def processes(sim_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


async def _readline(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout)
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"process exited ({proc.wait()}): {err}")
    return line


async def _aiohttp_pair(processes: list[subprocess.Popen[str]], *, server_dropin: bool,
                        client_dropin: bool) -> dict[str, Any]:
    loop = _loop_kind()
    port = _free_port()
    server = subprocess.Popen(_command(server_dropin, loop, "serve", "127.0.0.1", str(port)),
                              env=dict(os.environ, VCHAN_DOMID="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    processes.append(server)
    assert "Running on http://127.0.0.1:" in await _readline(server)
    client = subprocess.Popen(_command(client_dropin, loop, "fetch",
                                       f"http://127.0.0.1:{port}"),
                              env=dict(os.environ, VCHAN_DOMID="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    processes.append(client)
    result: dict[str, Any] = json.loads(await _readline(client))
    return result


async def test_an_unmodified_aiohttp_server_and_client_under_vchan_run_talk_over_vchan(
        processes: list[subprocess.Popen[str]]) -> None:
    got = await _aiohttp_pair(processes, server_dropin=True, client_dropin=True)
    assert got == {"client_via": "vchan", "server_via": "vchan", "server_saw": "127.0.0.1",
                   "echo_intact": True}


async def test_a_server_not_under_vchan_run_is_reached_over_tcp(
        processes: list[subprocess.Popen[str]]) -> None:
    got = await _aiohttp_pair(processes, server_dropin=False, client_dropin=True)
    # (uvloop's TCP transports carry no vchan_via key: "None" is TCP there.)
    assert got["client_via"] in ("tcp", "None")
    assert got["server_via"] == "None"          # a plain aiohttp server's own transport
    assert got["echo_intact"]


async def test_a_client_not_under_vchan_run_reaches_a_drop_in_server_over_tcp(
        processes: list[subprocess.Popen[str]]) -> None:
    got = await _aiohttp_pair(processes, server_dropin=True, client_dropin=False)
    assert got["client_via"] == "None"
    assert got["server_via"] == ("tcp" if _loop_kind() == "asyncio" else "None")
    assert got["echo_intact"]


@pytest.fixture
def redis_socket(tmp_path: Path) -> Iterator[Path]:
    """A redis-server of our own on a Unix socket (no TCP port)."""
    import shutil
    import time

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("redis")
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(path), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
            time.sleep(0.02)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("front_dropin", [True, False], ids=["front-under-vchan-run",
                                                             "plain-front"])
async def test_redis_asyncio_client_under_vchan_run_reaches_redis_over_vchan(
        processes: list[subprocess.Popen[str]], redis_socket: Path, front_dropin: bool) -> None:
    """redis-py's asyncio client (domain 2) and an asyncio sidecar in front of
    redis-server (domain 1), neither changed: over vchan under vchan run,
    over TCP when the sidecar is not under it."""
    loop = _loop_kind()
    app = str(Path(__file__).with_name("dropin_redis_app.py"))
    port = _free_port()
    log = redis_socket.with_name("front.log")
    front = [sys.executable, app, "front", "127.0.0.1", str(port), str(redis_socket), str(log)]
    if front_dropin:
        front = [sys.executable, "-m", "vchan", "run", "--loop", loop, "--", *front]
    server = subprocess.Popen(front, env=dict(os.environ, VCHAN_DOMID="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(server)
    assert await _readline(server) == "ready\n"
    client = subprocess.Popen(
        [sys.executable, "-m", "vchan", "run", "--loop", loop, "--", sys.executable, app,
         "client", "127.0.0.1", str(port)],
        env=dict(os.environ, VCHAN_DOMID="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    processes.append(client)
    got = json.loads(await _readline(client))
    assert got == {"get_ok": 800, "last_incr": 50, "big_ok": True}
    assert client.wait(30) == 0
    # The client closed its connections: the sidecar says which way each went
    # (as each ends; wait until that stops changing).
    seen, still = "", 0
    for _ in range(200):
        await asyncio.sleep(0.05)
        now = log.read_text() if log.exists() else ""
        still = still + 1 if now == seen and now else 0
        seen = now
        if still >= 10:
            break
    vias = [line.split()[1] for line in seen.splitlines()]
    # (A sidecar not under vchan run has asyncio's own transports: no key.)
    assert vias and set(vias) == {"vchan" if front_dropin else "None"}, vias


# -- in one process: run(), install(), wrap_loop() ------------------------------------------


async def _streams_round_trip() -> tuple[str, str]:
    """Unmodified asyncio streams code: which way each side went."""
    sides: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sides.append(dropin.via(writer))
        writer.write(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                       server.sockets[0].getsockname()[1])
        writer.write(b"ping")
        writer.write_eof()
        assert await reader.read() == b"ping"
        writer.close()
        await writer.wait_closed()
    return dropin.via(writer), sides[0]


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_run_makes_unmodified_streams_code_drop_in(sim_dir: Path, kind: str) -> None:
    dropin.forget_hints()
    # (Loopback is this domain's own: the connection upgrades.)
    assert dropin_loop.run(_streams_round_trip(), loop=kind) == ("vchan", "vchan")
    # The same code on a plain loop: TCP.
    dropin.forget_hints()
    assert asyncio.run(_streams_round_trip()) == ("tcp", "tcp")


def test_install_wraps_the_loops_asyncio_run_makes_until_uninstall(sim_dir: Path) -> None:
    dropin.forget_hints()
    dropin_loop.install()
    try:
        assert dropin_loop.installed()
        assert asyncio.run(_streams_round_trip()) == ("vchan", "vchan")
        loop = asyncio.new_event_loop()
        try:
            assert getattr(loop, "_vchan_tcp", None) is not None
        finally:
            loop.close()
    finally:
        dropin_loop.uninstall()
    assert not dropin_loop.installed()
    loop = asyncio.new_event_loop()
    try:
        assert getattr(loop, "_vchan_tcp", None) is None
    finally:
        loop.close()
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        dropin_loop.install("trio")
    assert not dropin_loop.installed()


async def test_a_wrapped_loop_leaves_what_is_not_a_tcp_address_alone(
        sim_dir: Path, tmp_path: Path) -> None:
    loop = dropin_loop.wrap_loop(asyncio.get_running_loop())
    assert dropin_loop.wrap_loop(loop) is loop
    try:
        # A socket given to create_server: the loop's own server, not a drop-in one.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(asyncio.Protocol, sock=sock)
        assert not isinstance(server, dropin.DropinServer)
        server.close()
        await server.wait_closed()
        # A port given as a str is the loop's business too.
        server = await cast(Any, loop).create_server(asyncio.Protocol, "127.0.0.1", "0")
        assert not isinstance(server, dropin.DropinServer)
        server.close()
        await server.wait_closed()
        # Unix sockets are untouched.
        path = str(tmp_path / "s")
        served = asyncio.Event()

        async def serve(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()
            await w.wait_closed()
            served.set()

        unix = await asyncio.start_unix_server(serve, path)
        async with unix:
            reader, writer = await asyncio.open_unix_connection(path)
            assert await reader.read() == b""       # the server's side was a Unix socket
            await asyncio.wait_for(served.wait(), 10)
            writer.close()
            await writer.wait_closed()
        # A TCP address is drop-in.
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        assert isinstance(server, dropin.DropinServer)
        server.close()
        await server.wait_closed()
    finally:
        tcp = loop._vchan_tcp  # type: ignore[attr-defined]
        del loop.create_connection, loop.create_server, loop._vchan_tcp  # type: ignore[attr-defined]
        assert loop.create_connection == tcp[0]


# -- the command ------------------------------------------------------------------------------


def _vchan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vchan", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_vchan_run_installs_and_keeps_the_programs_own_sitecustomize(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = '1'\n")
    code = textwrap.dedent("""
        import asyncio, os
        from vchan import dropin_loop
        loop = asyncio.new_event_loop()
        print(dropin_loop.installed(), getattr(loop, "_vchan_tcp", None) is not None,
              type(loop).__module__.split(".")[0], os.environ.get("THEIRS_RAN"))
        loop.close()
    """)
    env = dict(os.environ, PYTHONPATH=str(theirs))
    out = _vchan("run", "--loop", "uvloop", "--", sys.executable, "-c", code, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "uvloop", "1"]
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=60)
    assert plain.stdout.split() == ["False", "False", "asyncio", "1"]


@pytest.mark.parametrize(("args", "message"), [
    ((), "name the program"),
    (("--",), "name the program"),
    (("--", "no-such-program-here"), "no program 'no-such-program-here'"),
])
def test_vchan_run_mistakes_are_one_line(args: tuple[str, ...], message: str) -> None:
    out = _vchan("run", *args)
    assert out.returncode == 2
    assert out.stderr.startswith("vchan: run: ") and message in out.stderr
    assert "Traceback" not in out.stderr


def test_the_streams_forms_are_still_vchans_with_a_domid(sim_dir: Path) -> None:
    async def main() -> Any:
        server = await vchan.start_server(lambda r, w: w.close(), "by-domid",
                                          peers=vchan.own_domid())
        server.close()
        await server.wait_closed()
        return server

    assert isinstance(dropin_loop.run(main()), vchan.Server)


def test_the_readme_one_line_works_after_import_vchan(sim_dir: Path) -> None:
    code = textwrap.dedent("""
        import asyncio, vchan

        async def main():
            loop = asyncio.get_running_loop()
            return getattr(loop, "_vchan_tcp", None) is not None

        print(vchan.dropin_loop.run(main()), vchan.dropin.via)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True <function via")
