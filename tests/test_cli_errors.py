"""Every ``vchan`` subcommand ends in one line on stderr, never a traceback:
for a bad environment variable (exit 1, before anything is started) and for
Ctrl-C (exit 130), as a user meets them, with real processes.

Ctrl-C is sent as a terminal sends it: SIGINT to the command's whole process
group, so the processes a command starts (the demo's, the benchmark's) get it
too and must stay quiet.  ``vchan connect`` and ``vchan listen`` end on the
first Ctrl-C even while their peer has stopped reading (nc does; a close
would wait for the peer to drain the ring).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from procs import Children, Proc

from vchan import sim

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "vchan"]
HAS_XEN = Path("/dev/xen/gntalloc").exists()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCHAN_")}
    env.update(extra)
    return env


def _one_line(stderr: str, *words: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("vchan: "), lines
    for word in words:
        assert word in lines[0], lines


# -- bad environment variables ----------------------------------------------------

# (variable, value, words of the message); {tmp} is a private directory.
BAD_ENV = [
    ("VCHAN_DOMID", "abc", ["VCHAN_DOMID", "'abc'"]),
    ("VCHAN_DOMID", "40000", ["VCHAN_DOMID", "0..32751"]),
    ("VCHAN_BACKEND", "kvm", ["VCHAN_BACKEND", "'kvm'"]),
    ("VCHAN_BACKEND", "xen", ["/dev/xen/gntalloc", "VCHAN_BACKEND=sim"]),
    ("VCHAN_SIM_DIR", "/proc/no/such", ["VCHAN_SIM_DIR=/proc/no/such"]),
    ("VCHAN_SIM_DIR", "{tmp}/a-file", ["VCHAN_SIM_DIR=", "not a directory"]),
    ("VCHAN_SIM_DIR", "{tmp}/" + "d" * 100, ["VCHAN_SIM_DIR=", "too long"]),
    ("VCHAN_SIM_TIMEOUT", "soon", ["VCHAN_SIM_TIMEOUT", "'soon'"]),
]

COMMANDS = {
    "connect": ["connect", "1", "80", "--timeout", "1"],
    "listen": ["listen", "80", "--peers", "2"],
    "proxy-listen": ["proxy", "--listen", "tcp:127.0.0.1:0", "--to-vchan", "1", "80"],
    "proxy-listen-vchan": ["proxy", "--listen-vchan", "80", "--peers", "2", "--to",
                           "tcp:127.0.0.1:9"],
    "demo": ["demo", "--mib", "1"],
    "sim-start": ["sim", "start"],
    "sim-status": ["sim", "status"],
    "sim-run": ["sim", "run", "--domid", "1", "--", "true"],
    "bench": ["bench", "--quick", "--no-report"],
}
# Which variables a command reads: the demo, bench and sim choose their
# domains themselves; the sim commands use the emulator whatever the backend.
_DOMID_IGNORED = {"demo", "sim-start", "sim-status", "sim-run", "bench"}
_BACKEND_IGNORED = {"sim-start", "sim-status", "sim-run"}


def _cases() -> list[tuple[str, str, str, list[str]]]:
    cases = []
    for command in COMMANDS:
        for var, value, words in BAD_ENV:
            if var == "VCHAN_DOMID" and command in _DOMID_IGNORED:
                continue
            if var == "VCHAN_BACKEND" and command in _BACKEND_IGNORED:
                continue
            if (command, value) == ("demo", "xen"):
                words = ["VCHAN_BACKEND=sim"]           # the demo needs the emulator
            if (command, value) == ("sim-status", "/proc/no/such"):
                words = ["no emulator running in /proc/no/such"]    # true, and all it is
            cases.append((command, var, value, words))
    return cases


@pytest.mark.parametrize("command, var, value, words", _cases())
def test_a_bad_environment_variable_is_one_line_and_starts_nothing(
        tmp_path: Path, command: str, var: str, value: str, words: list[str]) -> None:
    if value == "xen" and HAS_XEN:
        pytest.skip("this is a Xen domain: VCHAN_BACKEND=xen is right here")
    (tmp_path / "a-file").write_text("")
    private = tmp_path / "sim"
    env = _env(VCHAN_SIM_DIR=str(private))
    env[var] = value.format(tmp=tmp_path)
    done = subprocess.run([*CLI, *COMMANDS[command]], env=env, cwd=tmp_path, timeout=60,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    _one_line(done.stderr, *words)
    assert done.returncode == 1, done
    if var != "VCHAN_SIM_DIR":
        assert not sim.is_running(private), "the emulator was started before failing"


def test_sim_run_fails_before_it_starts_the_emulator(tmp_path: Path) -> None:
    private = tmp_path / "sim"
    done = subprocess.run([*CLI, "sim", "run", "--domid", "1", "--", "no-such-program-here"],
                          env=_env(VCHAN_SIM_DIR=str(private)), capture_output=True,
                          text=True, timeout=60)
    _one_line(done.stderr, "no program 'no-such-program-here'")
    assert done.returncode == 2
    assert not private.exists() or not sim.is_running(private)


def test_verbose_says_which_backend_was_chosen(tmp_path: Path) -> None:
    private = tmp_path / "sim"
    try:
        done = subprocess.run([*CLI, "connect", "1", "80", "--timeout", "0", "-v"],
                              env=_env(VCHAN_SIM_DIR=str(private), VCHAN_DOMID="2"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
    finally:
        sim.stop(private)
    first = done.stderr.splitlines()[0]
    assert first.startswith("vchan: backend: sim, the emulated hypervisor in "), done.stderr
    assert f"{private}" in first and "as domain 2" in first
    assert "/dev/xen/gntalloc is missing" in first or "VCHAN_BACKEND" in first


# -- Ctrl-C ---------------------------------------------------------------------------


def _command(children: Children, argv: list[str], env: dict[str, str], tmp: Path,
             stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL) -> Proc:
    """A command in its own process group (a terminal's foreground job), in ``tmp``,
    with exactly the environment ``env``."""
    return children.start(argv, base_env=env, cwd=tmp, stdin=stdin, stdout=stdout,
                          new_session=True, grace=0, name=" ".join(argv[2:4]))


@pytest.fixture
def running(children: Children, tmp_path: Path) -> Iterator[Children]:
    """The test's commands; their emulator is stopped after them."""
    yield children
    children.close()
    sim.stop(tmp_path / "sim")


def _interrupted(status: int, after: str) -> None:
    assert status == 130, f"exit status {status}; stderr after Ctrl-C:\n{after}"
    _one_line(after, "interrupted")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("sender", ["connect", "listen"])
def test_ctrl_c_ends_listen_and_connect_while_the_peer_does_not_read(
        tmp_path: Path, running: Children, sender: str, loop: str) -> None:
    """The sender's stdin is a 64 MiB file, the receiver's stdout a pipe nobody
    reads: the sender's ring and buffers fill and it waits; one Ctrl-C ends it."""
    env = _env(VCHAN_SIM_DIR=str(tmp_path / "sim"))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    stuck_out = os.pipe()           # never read
    try:
        with open(big, "rb") as data:
            listen_in = data.fileno() if sender == "listen" else subprocess.DEVNULL
            connect_in = data.fileno() if sender == "connect" else subprocess.DEVNULL
            listen = _command(running,
                              [*CLI, "listen", "7001", "--peers", "2", "-v", "--loop", loop],
                              dict(env, VCHAN_DOMID="1"), tmp_path, stdin=listen_in,
                              stdout=stuck_out[1] if sender == "connect" else
                              subprocess.DEVNULL)
            listen.wait_stderr("listening on vchan port")
            connect = _command(running, [*CLI, "connect", "1", "7001", "-v", "--loop", loop],
                               dict(env, VCHAN_DOMID="2"), tmp_path, stdin=connect_in,
                               stdout=stuck_out[1] if sender == "listen" else
                               subprocess.DEVNULL)
        connect.wait_stderr("connected to domain 1")
        time.sleep(1.5)             # the receiver stops reading; the sender fills up
        first = {"listen": listen, "connect": connect}[sender]
        assert first.proc.poll() is None, first.stderr
        _interrupted(*first.ctrl_c())
        other = connect if sender == "listen" else listen
        if other.proc.poll() is None:
            _interrupted(*other.ctrl_c())
    finally:
        os.close(stuck_out[0])
        os.close(stuck_out[1])


@pytest.mark.parametrize("command, ready", [
    (["proxy", "--listen", "tcp:127.0.0.1:0", "--to-vchan", "1", "80", "-v"], "listening on"),
    (["proxy", "--listen-vchan", "80", "--peers", "2", "--to", "tcp:127.0.0.1:9", "-v"],
     "listening on vchan port"),
    (["connect", "1", "80", "--timeout", "inf", "-v"], "backend: sim"),
    (["listen", "80", "--peers", "2", "-v"], "listening on vchan port"),
    (["demo", "--mib", "100000"], None),
    (["sim", "start", "--foreground"], None),
], ids=["proxy-listen", "proxy-listen-vchan", "connect-waiting", "listen-waiting", "demo",
        "sim-start-foreground"])
def test_ctrl_c_in_a_subcommand_is_one_line_and_130(
        tmp_path: Path, running: Children, command: list[str], ready: str | None) -> None:
    env = _env(VCHAN_SIM_DIR=str(tmp_path / "sim"), VCHAN_DOMID="1")
    if command[0] == "connect":
        # Domain 1 exists (a process of it waits), the server never comes.
        holder = _command(running, [*CLI, "sim", "run", "--domid", "1", "--", "sleep", "60"],
                          env, tmp_path)
        support.wait_for_domain(tmp_path / "sim", 1, lambda: holder.stderr)
        env["VCHAN_DOMID"] = "2"
    cmd = _command(running, [*CLI, *command], env, tmp_path)
    if ready is not None:
        cmd.wait_stderr(re.escape(ready))
    elif command[0] == "demo":
        time.sleep(2.0)             # its server and client are moving data by now
    else:
        deadline = time.monotonic() + 30
        while not sim.is_running(tmp_path / "sim"):
            assert time.monotonic() < deadline, cmd.stderr
            time.sleep(0.05)
    status, after = cmd.ctrl_c()
    if command[:2] == ["sim", "start"]:
        # The emulator in the foreground says it in its log's own format.
        assert status == 130, after
        assert len(after.splitlines()) == 1 and after.rstrip().endswith("stopped: interrupted")
        return
    _interrupted(status, after)


# Ctrl-C in the instant asyncio.Runner has installed its SIGINT handler but not
# yet zeroed its count of interrupts: here the handler's installation sends it.
_CTRL_C_AS_THE_LOOP_STARTS = """
import argparse, asyncio, os, signal, sys
import vchan.backend
from vchan.cli.loop import run_coroutine

vchan.backend.check_environment = lambda: None
vchan.backend.get_backend = lambda: None
install = signal.signal

def install_then_ctrl_c(signum, handler):
    old = install(signum, handler)
    if signum == signal.SIGINT and handler is not signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)     # the runner's handler runs now
    return old

def ctrl_c_then(init):
    def lazy_init(self):
        os.kill(os.getpid(), signal.SIGINT)     # Python's own handler: KeyboardInterrupt
        return init(self)
    return lazy_init

if sys.argv[2] == "handler":
    signal.signal = install_then_ctrl_c
else:                                           # before the runner has a loop
    asyncio.Runner._lazy_init = ctrl_c_then(asyncio.Runner._lazy_init)

async def command() -> int:
    print("the command ran", file=sys.stderr)
    return 0

sys.exit(run_coroutine(argparse.Namespace(verbose=0, loop=sys.argv[1]), command))
"""


@pytest.mark.parametrize("moment", ["handler", "loop-setup"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ctrl_c_as_the_event_loop_starts_is_one_line_and_130(loop: str, moment: str) -> None:
    """Ctrl-C as the runner installs its SIGINT handler (the main task is
    cancelled before its first step) or before it has made its loop (Python's
    own KeyboardInterrupt): one line and 130 either way, and no warning about
    the command's coroutine never awaited."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_AS_THE_LOOP_STARTS, loop, moment],
                          capture_output=True, text=True, timeout=60, env=_env())
    _interrupted(done.returncode, done.stderr)


@pytest.mark.skipif(not (support.IN_CI or os.environ.get("VCHAN_TEST_BENCH") == "1"),
                    reason="starts the benchmark suite (its processes, then Ctrl-C): CI or "
                           "VCHAN_TEST_BENCH=1 runs it, not a machine taking measurements")
def test_ctrl_c_in_vchan_bench_is_one_line_and_130(tmp_path: Path,
                                                   running: Children) -> None:
    """Its server and client processes are running when Ctrl-C comes: they get
    it too (the process group) and must stay quiet; the command stops them."""
    cmd = _command(running, [*CLI, "bench", "--quick", "--no-report"],
                   _env(VCHAN_SIM_DIR=str(tmp_path / "sim")), tmp_path)
    # The first measurement is done: its children run.
    cmd.wait_stderr(re.escape("[  1/"), timeout=120)
    status, after = cmd.ctrl_c(timeout=30)
    _interrupted(status, after)
    assert not sim.is_running(tmp_path / "sim")


def test_ending_asyncio_run_with_a_raw_server_open_logs_nothing(tmp_path: Path) -> None:
    """A raw server that served a client and is still open when asyncio.run()
    returns: the loop's end cancels its tasks and closes XenStore at once,
    and nothing of that may reach the log."""
    env = _env(VCHAN_SIM_DIR=str(tmp_path / "sim"))
    server = tmp_path / "server.py"
    server.write_text(
        "import asyncio, sys, vchan\n\n"
        "async def main() -> None:\n"
        "    await vchan.start_server(lambda r, w: None, 'raw', peers=2, raw=True)\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(float(sys.argv[1]))\n\n"
        "asyncio.run(main())\n")
    client = ("import asyncio, sys, vchan\n\nasync def main() -> None:\n"
              "    sys.stdin.readline()\n"
              "    r, w = await vchan.open_connection(1, 'raw', timeout=10)\n"
              "    w.close()\n\nasyncio.run(main())\n")
    try:
        for delay in ("0.2", "0.5", "1.0"):
            # The client's domain exists first (a raw ring is made for one domain).
            peer = subprocess.Popen([*CLI, "sim", "run", "--domid", "2", "--", sys.executable,
                                     "-c", client], env=env, stdin=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            srv = subprocess.Popen([*CLI, "sim", "run", "--domid", "1", "--", sys.executable,
                                    str(server), delay], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            assert srv.stdout is not None and peer.stdin is not None
            assert srv.stdout.readline() == "ready\n"
            peer.stdin.write("go\n")
            peer.stdin.flush()
            _, peer_err = peer.communicate(timeout=60)
            _, srv_err = srv.communicate(timeout=60)
            assert peer.returncode == 0, peer_err
            assert srv.returncode == 0, srv_err
            assert srv_err == "", srv_err
    finally:
        sim.stop(tmp_path / "sim")


@pytest.mark.parametrize("mode", ["raw", "listener"])
def test_ctrl_c_on_serve_forever_logs_nothing_of_vchan(tmp_path: Path, mode: str) -> None:
    """A user's script serving forever, ended by Ctrl-C: Python's own
    KeyboardInterrupt, and nothing from vchan's tasks.  (Issue 17 saw "vchan
    server task failed ... xenstore connection is closed" here now and then;
    this does not reproduce it without the fix -- the raw-server test above
    does -- it guards the path.)"""
    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio, sys, vchan\n\n"
        "async def main() -> None:\n"
        "    server = await vchan.start_server(lambda r, w: None, 'sf', peers=2,\n"
        "                                      raw=sys.argv[1] == 'raw')\n"
        "    print('ready', flush=True)\n"
        "    await server.serve_forever()\n\n"
        "asyncio.run(main())\n")
    env = _env(VCHAN_SIM_DIR=str(tmp_path / "sim"))
    try:
        for _ in range(3):
            proc = subprocess.Popen([*CLI, "sim", "run", "--domid", "1", "--peer", "2", "--",
                                     sys.executable, str(script), mode], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert err.rstrip().endswith("KeyboardInterrupt"), err
            assert "vchan server task failed" not in err and "xenstore" not in err, err
    finally:
        sim.stop(tmp_path / "sim")
