"""Emulated domains do not race their users.

On Xen both domains exist before their programs start.  On the emulator a
domain exists while a process of it runs, so:

* a vchan client started before (or right after) its server waits up to
  ``SIM_DOMAIN_GRACE`` seconds for the server's domain, then says what to do;
* a C libxenvchan server whose client's domain has no process yet works under
  ``vchan sim run --peer``, and without it fails with a line saying so.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import support

from vchan import listener

CLI = [sys.executable, "-m", "vchan"]
PROXY = Path("/usr/lib/xen-4.17/bin/vchan-socket-proxy")
CLIENT = """\
import asyncio, sys, time, vchan

async def main() -> None:
    t = time.monotonic()
    try:
        reader, writer = await vchan.open_connection(int(sys.argv[1]), 'race',
                                                     timeout=float(sys.argv[2]))
    except vchan.NoSuchDomainError as exc:
        print(f'NoSuchDomainError after {time.monotonic() - t:.1f} s: {exc}', flush=True)
        return
    writer.write(b'ping')
    print((await reader.readexactly(4)).decode(), flush=True)
    writer.close()

asyncio.run(main())
"""
SYNC_CLIENT = """\
import sys, vchan

with vchan.Vchan.client(int(sys.argv[1]), 'race', timeout=float(sys.argv[2])) as v:
    v.send(b'ping')
    print(v.recv_exactly(4).decode(), flush=True)
"""
SERVER = """\
import asyncio, vchan

async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(4))
    await writer.drain()
    writer.close()

async def main() -> None:
    server = await vchan.start_server(echo, 'race', peers=2)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def _env(sim_dir: Path, domid: int) -> dict[str, str]:
    return dict(os.environ, VCHAN_SIM_DIR=str(sim_dir), VCHAN_DOMID=str(domid))


def _read_within(fd: int, n: int, seconds: float) -> bytes:
    """Up to ``n`` bytes from ``fd``, whatever has come after ``seconds`` (a
    process that never writes fails the test instead of hanging it)."""
    deadline = time.monotonic() + seconds
    got = b""
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        piece = os.read(fd, n - len(got))
        if not piece:
            break
        got += piece
    return got


@pytest.mark.parametrize("kind", ["asyncio", "blocking Vchan"])
def test_a_client_started_before_its_server_waits_for_the_servers_domain(
        sim_dir: Path, tmp_path: Path, kind: str) -> None:
    (tmp_path / "client.py").write_text(CLIENT if kind == "asyncio" else SYNC_CLIENT)
    (tmp_path / "server.py").write_text(SERVER)
    client = subprocess.Popen([sys.executable, str(tmp_path / "client.py"), "1", "30"],
                              env=_env(sim_dir, 2), stdout=subprocess.PIPE, text=True)
    time.sleep(listener.SIM_DOMAIN_GRACE / 3)    # the server starts late (within the grace)
    server = subprocess.Popen([sys.executable, str(tmp_path / "server.py")],
                              env=_env(sim_dir, 1))
    try:
        out, _ = client.communicate(timeout=60)
        assert out.strip() == "ping"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("timeout, waits", [("30", listener.SIM_DOMAIN_GRACE), ("2", 1.0),
                                            ("0", 0.0)])
def test_a_server_domain_that_never_comes_is_an_error_saying_what_to_do(
        sim_dir: Path, tmp_path: Path, timeout: str, waits: float) -> None:
    (tmp_path / "client.py").write_text(CLIENT)
    done = subprocess.run([sys.executable, str(tmp_path / "client.py"), "1234", timeout],
                          env=_env(sim_dir, 2), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seconds = float(done.stdout.split()[2])
    assert waits <= seconds < waits + 1.5, done.stdout
    assert "vchan server domain 1234 does not exist" in done.stdout
    if waits:
        assert "start the server in domain 1234 first" in done.stdout


def test_a_c_server_needs_its_peer_domain_and_sim_run_peer_provides_it(
        sim_dir: Path, tmp_path: Path) -> None:
    support.need(PROXY.exists(), "Debian's vchan-socket-proxy (apt-get install xen-utils-4.17)")
    args = ["--mode=server", "2", "/local/domain/1/data/vchan/2/race", "-"]
    env = dict(os.environ, VCHAN_SIM_DIR=str(sim_dir))
    # No process of domain 2: libxenvchan fails, and the drop-in library says why.
    failed = subprocess.run([*CLI, "sim", "run", "--domid", "1", "--", str(PROXY), *args],
                            env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert failed.returncode != 0
    assert "vchan sim: emulated domain 2 does not exist" in failed.stderr
    assert "vchan sim run --peer 2" in failed.stderr
    # With --peer 2 it serves; a vchan client of domain 2 started right after it connects.
    (tmp_path / "client.py").write_text(CLIENT)
    proxy = subprocess.Popen([*CLI, "sim", "run", "--domid", "1", "--peer", "2", "--",
                              str(PROXY), *args], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = subprocess.Popen([sys.executable, str(tmp_path / "client.py"), "1", "30"],
                              env=_env(sim_dir, 2), stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdin is not None and proxy.stdout is not None
        # (the client's bytes, through libxenvchan; bounded: the client gives up after 30 s)
        got = _read_within(proxy.stdout.fileno(), 4, 60)
        if got != b"ping":
            client.kill()
            proxy.kill()
            pytest.fail(f"the C server got {got!r}, not b'ping'; client: "
                        f"{client.communicate()[0]!r}; proxy: {proxy.communicate()[1]!r}")
        proxy.stdin.write(b"ping")
        proxy.stdin.flush()
        out, _ = client.communicate(timeout=60)
        assert out.strip() == "ping"
    finally:
        for proc in (proxy, client):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()          # reaped, its pipes closed
