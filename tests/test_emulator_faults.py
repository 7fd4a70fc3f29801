"""The emulator's daemon killed (SIGKILL) or stopped (SIGSTOP) under real processes.

Every party is a separate process (``tests/emulator_peer.py``) in an emulated
domain of its own, on the loop kind of the test, over a private daemon that
the test kills or stops: a server and a client moving data, a client waiting
to connect, an idle server.  Each must fail within ``DETECT`` seconds with
:class:`vchan.sim.EmulatorError` naming the daemon (pid and state directory)
and what became of it -- not go on serving nobody, not wait for ever --
and exit when told to.  The established rings are shared memory and
eventfds, which would go on working without the daemon; but with it gone
nobody would learn that a peer crashed, so every party fails.  After a kill,
a server that starts anew (on a daemon started on first use) is reachable
again.  docs/faults.md lists these faults and their outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from domains import DomainProcess
from procs import Children, Proc

from vchan import sim
from vchan.sim import protocol

PEER = Path(__file__).with_name("emulator_peer.py")
DETECT = 1.0            # every party notices a dead or stopped daemon within this
EXIT = 10.0             # and, told to, exits within this

SIGNALS = [pytest.param(signal.SIGKILL, id="killed"), pytest.param(signal.SIGSTOP, id="stopped")]
WHAT: dict[int, tuple[int, str]] = {
    signal.SIGKILL: (errno.ECONNRESET, "is gone"),
    signal.SIGSTOP: (errno.EHOSTDOWN, "is stopped"),
}


def _loop_kind() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


@dataclass
class Daemon:
    dir: Path
    pid: int

    def signal(self, sig: int) -> float:
        """Send ``sig`` to the daemon; the monotonic time it was sent."""
        t = time.monotonic()
        os.kill(self.pid, sig)
        return t


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A private emulator daemon (a short directory: socket paths are bounded)."""
    directory = Path(tempfile.mkdtemp(prefix="vf-", dir="/tmp"))
    sim.ensure_running(directory)
    pids = {int(sim.control({"cmd": "status"}, directory)["pid"])}
    try:
        yield Daemon(directory, next(iter(pids)))
    finally:
        # The one we signalled, and any started after it.
        with contextlib.suppress(sim.SimError, OSError):
            if sim.is_running(directory):
                pids.add(int(sim.control({"cmd": "status"}, directory)["pid"]))
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        shutil.rmtree(directory, ignore_errors=True)


class Party(Proc):
    """An emulator_peer.py process in one emulated domain, on the test's loop kind."""

    def __init__(self, daemon: Daemon, domid: int, *args: str) -> None:
        super().__init__([sys.executable, PEER, *args], domid=domid, grace=1.0,
                         name=f"{args[0]} (domain {domid})",
                         env={"VCHAN_SIM_DIR": str(daemon.dir), "VCHAN_BACKEND": "sim",
                              "VCHAN_TEST_LOOP": _loop_kind()})

    def _one_event(self, timeout: float) -> dict[str, Any]:
        if self.quiet(timeout):
            return {"event": "nothing", "t": time.monotonic()}
        text = self.readline(0)
        if text is None:
            return {"event": "exited", "status": self.proc.wait(), "t": time.monotonic(),
                    "stderr": self.stderr}
        event: dict[str, Any] = json.loads(text)
        return event

    async def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next event the process reports (``nothing`` if none within
        ``timeout``, ``exited`` if its output ended)."""
        return await asyncio.to_thread(self._one_event, timeout)

    async def expect_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next event must be ``name``."""
        event = await self.next_event(timeout)
        assert event["event"] == name, f"{self.name}: expected {name!r}, got {event}"
        return event

    async def exits(self) -> None:
        """Told to (stdin closed), it exits at once -- nothing hangs."""
        self.close_stdin()
        t0 = time.monotonic()
        while True:
            event = await self.next_event(EXIT)
            if event["event"] in ("exit", "exited", "nothing"):
                break
        assert event["event"] != "nothing", f"{self.name} still running {EXIT} s after " \
                                             f"being told to exit:\n{self.stacks()}"
        status = await asyncio.to_thread(self.proc.wait, EXIT - (time.monotonic() - t0))
        assert status == 0, f"{self.name} exited with {status}"

    def stacks(self) -> str:
        """What the process is doing (it dumps its threads and tasks on SIGUSR1)."""
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        self.proc.kill()
        return self.stderr[-20000:]


def _spawn(children: Children, daemon: Daemon, domid: int, *args: str) -> Party:
    p = Party(daemon, domid, *args)
    children.adopt(p)
    return p


def _check_failure(event: dict[str, Any], where: str, daemon: Daemon, sig: int,
                   t0: float) -> float:
    """The event is the clear error, in time; returns how long it took."""
    err, what = WHAT[sig]
    assert event["event"] == "error" and event["where"] == where, event
    assert event["type"] == "EmulatorError" and event["errno"] == err, event
    assert f"emulator daemon (pid {daemon.pid}) in {daemon.dir} {what}" in event["message"], \
        event
    took = float(event["t"]) - t0
    assert took < DETECT, f"{where}: noticed after {took:.3f} s: {event}"
    return took


async def _errors(party: Party, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The error events of ``party``, one for each place in ``wanted``."""
    found: dict[str, dict[str, Any]] = {}
    while not wanted <= set(found):
        event = await party.next_event(DETECT + 5)
        if event["event"] == "nothing":
            raise AssertionError(f"{party.name}: nothing more (found so far: {found}):\n"
                                 f"{party.stacks()}")
        assert event["event"] == "error", f"{party.name}: {event} (found so far: {found})"
        found.setdefault(event["where"], event)
    return found


# -- transfers ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_transfer_fails_clearly_within_a_second(daemon: Daemon, children: Children,
                                                        sig: int) -> None:
    """Data flowing both ways when the daemon is killed or stopped: the server,
    its connection and the client each fail with EmulatorError within a second."""
    server = _spawn(children, daemon, 1, "serve", "flow", "--peers", "2")
    await server.expect_event("ready")
    client = _spawn(children, daemon, 2, "stream", "1", "flow")
    await client.expect_event("ready")
    await client.expect_event("flowing")
    t0 = daemon.signal(sig)
    got = await _errors(server, {"serve_forever", "connection"})
    took = [_check_failure(got[w], w, daemon, sig, t0) for w in ("serve_forever", "connection")]
    took.append(_check_failure(await client.next_event(DETECT + 5), "read", daemon, sig, t0))
    print(f"\n{signal.Signals(sig).name}: noticed after {', '.join(f'{t:.3f}' for t in took)} s "
          "(server, its connection, client)")
    await client.exits()
    await server.exits()


async def test_a_client_notices_its_server_crash_after_the_daemon_died(
        daemon: Daemon, children: Children) -> None:
    """Daemon killed, then the server process too: nothing is left to tell the
    client that its peer crashed -- it fails within a second all the same."""
    server = _spawn(children, daemon, 1, "serve", "crash", "--peers", "2")
    await server.expect_event("ready")
    client = _spawn(children, daemon, 2, "stream", "1", "crash")
    await client.expect_event("ready")
    await client.expect_event("flowing")
    t0 = daemon.signal(signal.SIGKILL)
    server.proc.kill()
    _check_failure(await client.next_event(DETECT + 5), "read", daemon, signal.SIGKILL, t0)
    await client.exits()


# -- connecting ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_connect_in_progress_fails_clearly_within_a_second(
        daemon: Daemon, children: Children, sig: int) -> None:
    """A client waiting (timeout=None) for a server of a domain that exists:
    killing or stopping the daemon ends the wait with EmulatorError within a
    second; the other domain's server stops serving as fast."""
    server = _spawn(children, daemon, 1, "serve", "elsewhere", "--peers", "2")
    await server.expect_event("ready")
    client = _spawn(children, daemon, 2, "connect", "1", "nobody-here")
    await client.expect_event("ready")
    await asyncio.sleep(0.5)            # it is waiting on XenStore now
    t0 = daemon.signal(sig)
    took = _check_failure(await client.next_event(DETECT + 5), "connect", daemon, sig, t0)
    took_server = _check_failure((await _errors(server, {"serve_forever"}))["serve_forever"],
                                 "serve_forever", daemon, sig, t0)
    print(f"\n{signal.Signals(sig).name}: noticed after {took:.3f} s (client), "
          f"{took_server:.3f} s (server)")
    await client.exits()
    await server.exits()


@pytest.mark.parametrize("sig", SIGNALS)
async def test_new_connections_fail_at_once_on_a_dead_or_stopped_daemon(
        daemon: Daemon, children: Children, sig: int) -> None:
    """After the daemon was killed there is nobody to connect to (its domains
    went with it); while it is stopped, a new connection fails with
    EmulatorError at once instead of blocking -- whatever its timeout."""
    server = _spawn(children, daemon, 1, "serve", "late", "--peers", "2")
    await server.expect_event("ready")
    t0 = daemon.signal(sig)
    await _errors(server, {"serve_forever"})
    client = _spawn(children, daemon, 2, "connect", "1", "late", "--timeout", "3")
    await client.expect_event("ready")
    t1 = time.monotonic()
    event = await client.next_event(DETECT + 5)
    assert event["event"] == "error" and event["where"] == "connect", event
    if sig == signal.SIGSTOP:
        _check_failure(event, "connect", daemon, sig, t0)
        assert float(event["t"]) - t1 < DETECT, event
    else:
        # A new daemon started on first use: it knows no domain 1 (its server
        # failed with the old one), so the answer is plain -- once the client
        # has given the domain the emulator's grace to appear (a server may
        # be starting: half the timeout here, vchan.listener.SIM_DOMAIN_GRACE).
        assert event["type"] == "NoSuchDomainError", event
        assert float(event["t"]) - t1 < DETECT + 3 / 2, event
    await client.exits()
    await server.exits()


# -- idle servers ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
async def test_an_idle_server_stops_serving_within_a_second(
        daemon: Daemon, children: Children, sig: int) -> None:
    """No connection, nothing waiting: serve_forever() raises EmulatorError
    within a second rather than serve, unreachable, for ever."""
    server = _spawn(children, daemon, 1, "serve", "idle", "--peers", "2")
    await server.expect_event("ready")
    await asyncio.sleep(0.3)
    t0 = daemon.signal(sig)
    took = _check_failure((await _errors(server, {"serve_forever"}))["serve_forever"],
                          "serve_forever", daemon, sig, t0)
    print(f"\n{signal.Signals(sig).name}: the idle server noticed after {took:.3f} s")
    await server.exits()


async def test_a_server_started_anew_is_reachable_on_a_restarted_daemon(
        daemon: Daemon, children: Children) -> None:
    """After a kill, the server process starts its server again: the first use
    starts a new daemon, the server publishes there, a client connects."""
    server = _spawn(children, daemon, 1, "serve", "again", "--peers", "2", "--again")
    await server.expect_event("ready")
    t0 = daemon.signal(signal.SIGKILL)
    _check_failure((await _errors(server, {"serve_forever"}))["serve_forever"],
                   "serve_forever", daemon, signal.SIGKILL, t0)
    await server.expect_event("serving again", 20)
    client = _spawn(children, daemon, 2, "connect", "1", "again", "--timeout", "10")
    await client.expect_event("ready")
    await client.expect_event("echoed", 20)
    new_pid = int(sim.control({"cmd": "status"}, daemon.dir)["pid"])
    assert new_pid != daemon.pid
    await client.exits()
    await server.exits()


# -- without asyncio -------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_blocking_read_fails_clearly_within_a_second(daemon: Daemon, sig: int) -> None:
    """vchan.Vchan: a client blocked in read() while the daemon is killed or
    stopped raises EmulatorError within a second (its peer could have died
    unseen)."""
    env = {"VCHAN_SIM_DIR": str(daemon.dir), "VCHAN_BACKEND": "sim"}
    with DomainProcess(1, env) as server, DomainProcess(2, env) as client:
        client("hold = EventChannel()")     # domain 2 exists from now on
        server("import vchan\nsrv = vchan.Vchan.server(2, 'blocking')")
        client("import vchan\nc = vchan.Vchan.client(1, 'blocking', timeout=10)")
        server("srv.wait_connected(10)")
        client("import threading, time\n"
               "result = {}\n"
               "def reader():\n"
               "    try:\n"
               "        c.read()\n"
               "        result['error'] = None\n"
               "    except Exception as exc:\n"
               "        result['error'] = (type(exc).__name__, exc.errno, str(exc))\n"
               "    result['t'] = time.monotonic()\n"
               "t = threading.Thread(target=reader)\n"
               "t.start()")
        time.sleep(0.3)
        t0 = daemon.signal(sig)
        client("t.join(10)")
        result = client("result")
        assert "error" in result, "the blocking read is still blocked"
        err, what = WHAT[sig]
        name, number, message = result["error"]
        assert name == "EmulatorError" and number == err, result
        assert f"emulator daemon (pid {daemon.pid}) in {daemon.dir} {what}" in message
        assert result["t"] - t0 < DETECT, result
        client("c.close()\nhold.close()")
        server("srv.close()")


# -- the daemon's own tools ------------------------------------------------------------------


def test_sim_status_says_the_daemon_is_stopped_at_once(daemon: Daemon) -> None:
    """``vchan sim status`` on a stopped daemon: exit 1 with why, at once
    (it used to block for ever)."""
    daemon.signal(signal.SIGSTOP)
    env = dict(os.environ, VCHAN_SIM_DIR=str(daemon.dir), VCHAN_BACKEND="sim")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vchan", "sim", "status"], env=env,
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc
    assert f"emulator daemon (pid {daemon.pid}) in {daemon.dir} is stopped" in proc.stderr
    assert took < 5, took       # a Python start-up plus at most one 20 ms look
    with pytest.raises(sim.EmulatorError, match="is stopped"):
        sim.ensure_running(daemon.dir)


# -- a daemon that runs but answers nothing ------------------------------------------------------


class _SilentDaemon:
    """Listens where a daemon would and answers HELLO, then nothing more (a
    daemon stuck in a loop: running, so /proc does not tell)."""

    def __init__(self, directory: Path, *, hang_up: bool = False) -> None:
        import threading

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(sim.socket_path(directory)))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.hang_up = hang_up
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            conn.recv(4096)                                 # HELLO
            conn.send(struct.pack("<iII", 0, 4, protocol.VS_VERSION))
            if self.hang_up:
                conn.recv(4096)                             # the first ping: hang up
                conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("hang_up", [False, True], ids=["silent", "hangs-up"])
async def test_a_daemon_that_answers_nothing_fails_the_loop_after_the_timeout(
        monkeypatch: pytest.MonkeyPatch, hang_up: bool) -> None:
    """Not dead, not stopped, just silent: each loop's watch asks the daemon
    something every second without blocking, and fails the loop when the
    answer is VCHAN_SIM_TIMEOUT late (ETIMEDOUT); a daemon that hangs up is
    ECONNRESET at once."""
    from vchan.sim.watch import DaemonWatch

    monkeypatch.setenv("VCHAN_SIM_TIMEOUT", "0.5")
    monkeypatch.setattr(DaemonWatch, "INTERVAL", 0.1)
    directory = Path(tempfile.mkdtemp(prefix="vf-", dir="/tmp"))
    fake = _SilentDaemon(directory, hang_up=hang_up)
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    try:
        t0 = time.monotonic()
        watch = DaemonWatch(asyncio.get_running_loop(), directory, failed.set_result)
        exc = await asyncio.wait_for(failed, 10)
        took = time.monotonic() - t0
        assert isinstance(exc, sim.EmulatorError)
        if hang_up:
            assert exc.errno == errno.ECONNRESET and "is gone" in str(exc)
            assert took < 1.0, took
        else:
            assert exc.errno == errno.ETIMEDOUT and "did not answer within 0.5 s" in str(exc)
            assert f"(pid {os.getpid()}) in {directory}" in str(exc)
            assert 0.5 < took < 2.0, took
        watch.close()
    finally:
        fake.close()
        shutil.rmtree(directory, ignore_errors=True)
