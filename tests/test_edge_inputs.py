"""Small faults of issue 14 (point 7), one test each: ``timeout=0``, a raw
server for a missing domain, unbounded ports, bad emulator settings, and
``vchan demo`` leaving its emulator behind.

Servers run in real separate processes (``domains.DomainProcess``); this
test process is domain 0.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from domains import DomainProcess

import vchan
from vchan import sim
from vchan.addresses import PORT_MAX, check_port

_domids = itertools.count(330)


def _vchan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vchan", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture
def server(sim_dir: Path) -> Iterator[DomainProcess]:
    """A process of its own domain, with vchan imported."""
    with DomainProcess(next(_domids)) as proc:
        proc("import vchan, asyncio, threading")
        yield proc


# -- timeout=0 ---------------------------------------------------------------------------


def test_timeout_zero_connects_at_once_to_a_raw_server_that_is_there(
        server: DomainProcess) -> None:
    server("srv = vchan.Vchan.server(0, 'zero-sync')")
    with vchan.Vchan.client(server.domid, "zero-sync", timeout=0) as c:
        c.send(b"now")
        assert server("srv.wait_connected(5); srv.recv_exactly(3)") == "now"
    server("srv.close()")


@pytest.mark.asyncio
@pytest.mark.parametrize("dedicated", [False, True])
async def test_timeout_zero_async_connects_at_once_to_a_raw_server_that_is_there(
        server: DomainProcess, dedicated: bool) -> None:
    port = f"zero-async-{int(dedicated)}"
    server(f"srv = vchan.Vchan.server(0, {port!r})")
    _reader, writer = await vchan.open_connection(server.domid, port, timeout=0,
                                                  dedicated=dedicated)
    writer.write(b"now")
    await writer.drain()
    assert server("srv.wait_connected(5); srv.recv_exactly(3)") == "now"
    writer.close()
    await writer.wait_closed()
    server("srv.close()")


@pytest.mark.asyncio
async def test_timeout_zero_says_why_it_does_not_wait_for_a_listener(
        server: DomainProcess) -> None:
    """A listener server answers a request: that is a round trip, which
    ``timeout=0`` does not wait for.  It says so, instead of "no vchan server"."""
    server("loop = asyncio.new_event_loop()\n"
           "threading.Thread(target=loop.run_forever, daemon=True).start()\n"
           "async def echo(r, w):\n"
           "    w.write(await r.read(100)); await w.drain(); w.close()\n"
           "srv = asyncio.run_coroutine_threadsafe(vchan.start_server(echo, 'zero-listen', "
           "peers=0), loop).result()")
    with pytest.raises(TimeoutError) as async_err:
        await vchan.open_connection(server.domid, "zero-listen", timeout=0)
    with pytest.raises(TimeoutError) as sync_err:
        await asyncio.to_thread(vchan.Vchan.client, server.domid, "zero-listen", timeout=0)
    for err in (async_err, sync_err):
        message = str(err.value)
        assert "without waiting" in message and "timeout=0" in message, message
        assert "give a timeout > 0" in message and "no vchan server at" not in message
    # With a timeout it connects; then this loop holds a session with the
    # port, and timeout=0 needs no waiting any more.
    reader, writer = await vchan.open_connection(server.domid, "zero-listen", timeout=10)
    writer.close()
    await writer.wait_closed()
    reader, writer = await vchan.open_connection(server.domid, "zero-listen", timeout=0)
    writer.write(b"again")
    assert await asyncio.wait_for(reader.read(100), 10) == b"again"
    writer.close()
    await writer.wait_closed()
    server("asyncio.run_coroutine_threadsafe(srv.__aexit__(None, None, None), loop).result()")


# -- a raw server for a domain that does not exist ---------------------------------------


def test_a_raw_server_for_a_missing_domain_is_no_such_domain(sim_dir: Path) -> None:
    with pytest.raises(vchan.NoSuchDomainError, match="client domain 4321 does not exist"):
        vchan.Vchan.server(4321, "nobody-there")


# -- ports -------------------------------------------------------------------------------


def test_ports_are_bounded_everywhere_with_one_clear_error(sim_dir: Path) -> None:
    assert PORT_MAX == (1 << 31) - 1        # libvchan (Qubes) ports are C ints
    assert check_port(0) == "0" and check_port(PORT_MAX) == str(PORT_MAX)
    for bad in (PORT_MAX + 1, 10**70, 10**3000):
        with pytest.raises(ValueError) as err:
            check_port(bad)
        message = str(err.value)
        assert message.endswith(f"is out of range 0..{PORT_MAX}") and len(message) < 100, message
    with pytest.raises(ValueError, match=r"^port \(a number of 71 digits\) is out"):
        check_port(10**70)
    with pytest.raises(ValueError, match=r"^port \(a number of about 900\d digits\) is out"):
        check_port(10**9000)
    with pytest.raises(ValueError, match=r"port -1 is out of range 0\.\.2147483647"):
        check_port(-1)

    async def each_async_entry_point() -> list[str]:
        errors = []
        for call in (lambda: vchan.open_connection(0, 10**70, timeout=1),
                     lambda: vchan.create_connection(asyncio.Protocol, 0, 10**70, timeout=1,
                                                     dedicated=True),
                     lambda: vchan.start_server(lambda r, w: None, 10**3000, peers=0),
                     lambda: vchan.create_server(asyncio.Protocol, 10**70, peers=0)):
            with pytest.raises(ValueError) as err:
                await call()
            errors.append(str(err.value))
        return errors

    errors = asyncio.run(each_async_entry_point())
    with pytest.raises(ValueError) as err:
        vchan.Vchan.server(0, 10**70)
    errors.append(str(err.value))
    with pytest.raises(ValueError) as err:
        vchan.Vchan.client(0, 10**3000)
    errors.append(str(err.value))
    assert all("out of range" in e and f"0..{PORT_MAX}" in e for e in errors), errors
    for argv in (["connect", "0", str(10**70)], ["listen", str(10**3000)]):
        done = _vchan(*argv)
        assert done.returncode == 2 and "out of range" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# -- emulator settings -------------------------------------------------------------------


def test_bad_grant_limits_and_quotas_are_refused_clearly(sim_dir: Path) -> None:
    before = sim.control({"cmd": "status"}, sim_dir)
    for value in ("-1", "99999999999999999999999", str(1 << 31)):
        done = _vchan("sim", "set", "grant-limit", value)
        assert done.returncode == 2, done
        assert done.stderr.strip() == f"vchan: grant-limit must be in 0..2147483647 pages, " \
                                      f"got {value}"
    big = _vchan("sim", "set", "xenstore-quota-nodes", str(1 << 32))
    assert big.returncode == 2 and "0..4294967295" in big.stderr
    # The daemon checks too, and says why.
    for bad in (-1, 1 << 31, 10**22, True, "12"):
        with pytest.raises(OSError) as err:
            sim.control({"cmd": "set", "key": "grant-limit", "value": bad}, sim_dir)
        assert err.value.errno == errno.EINVAL
        assert "grant-limit must be a number of pages in 0..2147483647" in str(err.value)
    with pytest.raises(OSError, match=r"must be in 0\.\.4294967295"):
        sim.control({"cmd": "set", "key": "xenstore-quota-watches", "value": 1 << 32}, sim_dir)
    after = sim.control({"cmd": "status"}, sim_dir)
    assert after["grant_limit"] == before["grant_limit"]
    assert after["xenstore"]["quotas"] == before["xenstore"]["quotas"]


# -- vchan demo --------------------------------------------------------------------------


def test_demo_stops_the_emulator_it_started(tmp_path: Path) -> None:
    directory = tmp_path / "sim"
    env = dict(os.environ, VCHAN_SIM_DIR=str(directory), VCHAN_BACKEND="sim")
    env.pop("VCHAN_DOMID", None)
    done = _vchan("demo", "--mib", "1", "--no-compare", env=env)
    assert done.returncode == 0, done.stderr
    assert f"stopped the emulator the demo started in {directory}" in done.stdout
    assert not sim.is_running(directory)
    # One it found running, it leaves alone (and says nothing about it).
    sim.ensure_running(directory)
    try:
        done = _vchan("demo", "--mib", "1", "--no-compare", env=env)
        assert done.returncode == 0 and "emulator" not in done.stdout.split("sha256")[-1]
        assert sim.is_running(directory)
    finally:
        sim.stop(directory)


@pytest.mark.parametrize("transport", ["vchan", "unix"])
def test_the_demo_server_is_quiet_when_its_client_is_killed(sim_dir: Path, tmp_path: Path,
                                                            transport: str) -> None:
    """Ctrl-C on ``vchan demo`` kills its client before its server: the
    server, in the moment between, sees its peer domain die and must end
    that connection quietly (the demo reports its client's failures itself),
    not print an 'Unhandled exception in client_connected_cb' traceback."""
    env = dict(os.environ, VCHAN_SIM_DIR=str(sim_dir), VCHAN_BACKEND="sim")
    role = [sys.executable, "-m", "vchan.demo"]
    sock = str(tmp_path / "demo.sock")
    server = subprocess.Popen([*role, "server", transport, "0",
                               "2" if transport == "vchan" else sock],
                              env=dict(env, VCHAN_DOMID="1"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline()                     # ready
        client = subprocess.Popen([*role, "client", transport, str(1 << 40),
                                   "1" if transport == "vchan" else sock],
                                  env=dict(env, VCHAN_DOMID="2"), stdout=subprocess.DEVNULL)
        try:
            if transport == "vchan":
                support.wait_for_domain(sim_dir, 2)
            time.sleep(1.0)                                  # it moves data by now
        finally:
            client.kill()
            client.wait()
        time.sleep(2.0)             # the server learns within 1 s that domain 2 is gone
        _, err = server.communicate(input="", timeout=30)     # (EOF on stdin: it ends)
        assert (server.returncode, err) == (0, "")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
