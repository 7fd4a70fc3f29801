"""The suite's processes: a server child, a client child, and the parent between them.

The command starts itself twice more with a hidden ``--role server`` /
``--role client``; the parent sends each one command per measurement as a
JSON line on its stdin and reads JSON lines back (the server answers
``ready`` before the client is told to connect, and each answers ``result``
or ``error``).  Each measurement runs on a fresh event loop in both
children.  The children die with the parent (``PR_SET_PDEATHSIG``) and are
killed on any error; :meth:`Runner.restart` gives fresh ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from . import bulk, concurrency, dropin, matrix, pingpong
from .common import BenchError, Json, run_on

#: What each child runs of a measurement, by case (a drop-in measurement
#: runs as its ``what``: setup or bulk).
SERVERS: dict[str, Callable[[Json, Callable[..., None]], Coroutine[Any, Any, Json]]] = {
    "bulk": bulk.serve, "pingpong": pingpong.serve, "connections": concurrency.serve_many,
    "setup": concurrency.serve_many, "matrix": matrix.serve_matrix}
CLIENTS: dict[str, Callable[[Json], Coroutine[Any, Any, Json]]] = {
    "bulk": bulk.client, "pingpong": pingpong.client,
    "connections": concurrency.client_connections, "setup": concurrency.client_setup,
    "matrix": matrix.client_matrix}


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)                                     # the parent is gone already


def child_main(role: str, parent: int) -> int:
    """A child's life (``--role``): run the parent's commands until ``quit``."""
    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent ends its children
    # (Runner.close), which must not print tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # 10,000 socket connections need 10,000 descriptors in each process.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    # The protocol owns the original stdout; anything else printed goes to stderr.
    out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(**kw: Any) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    emit(started=role, pid=os.getpid())
    for line in sys.stdin:
        cmd: Json = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd.get("case") == "dropin":     # a setup or bulk run on a drop-in path
            cmd = dropin.as_case(cmd)
        try:
            if role == "server":
                if cmd["transport"] == "vchan" and cmd.get("peer") is None:
                    import vchan

                    cmd["peer"] = vchan.own_domid()     # real Xen: serve this domain
                coro: Coroutine[Any, Any, Json] = SERVERS[cmd["case"]](cmd, emit)
            else:
                coro = CLIENTS[cmd["case"]](cmd)
            result = run_on(cmd["loop"], asyncio.wait_for(coro, cmd["timeout"]))
        except Exception as exc:
            # A limit hit or a peer gone is the measurement's result, said in
            # one line by the parent; anything else is a bug: its traceback.
            if not isinstance(exc, BenchError | OSError | EOFError | TimeoutError):
                traceback.print_exc(file=sys.stderr)
            emit(error=f"{role}: {type(exc).__name__}: {exc}")
            continue
        emit(result=result)
    return 0


class Child:
    """One child process and its JSON-lines channel."""

    def __init__(self, role: str, env: dict[str, str]) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vchan.bench", "--role", role,
             "--parent", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.pending = b""

    def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"the {self.role} process exited "
                             f"(status {self.proc.wait()})") from None

    def recv(self, timeout: float) -> Json:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise BenchError(f"no answer from the {self.role} process in {timeout:.0f} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise BenchError(f"the {self.role} process exited "
                                 f"(status {self.proc.wait()}); see its stderr above")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        msg: Json = json.loads(line)
        if "error" in msg:
            raise BenchError(msg["error"])
        return msg

    def quit(self) -> None:
        with contextlib.suppress(BenchError):
            self.send(cmd="quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


class Runner:
    """The two children, and one measurement at a time between them."""

    def __init__(self, server_env: dict[str, str], client_env: dict[str, str], tmp: Path,
                 vchan_peer: int | None, timeout: float, dedicated: bool = False) -> None:
        self.envs = {"server": server_env, "client": client_env}
        self.dedicated = dedicated
        self.tmp = tmp
        self.vchan_peer = vchan_peer
        self.timeout = timeout
        self.count = 0
        self.server, self.client = self._start()

    def _start(self) -> tuple[Child, Child]:
        server = Child("server", self.envs["server"])
        try:
            client = Child("client", self.envs["client"])
        except BaseException:
            server.kill()
            raise
        try:
            server.recv(60)     # "started": the interpreter and its imports are up
            client.recv(60)
        except BaseException:
            server.kill()
            client.kill()
            raise
        return server, client

    def restart(self) -> None:
        """Fresh children (after a measurement that left them in a bad state)."""
        self.close(kill=True)
        self.server, self.client = self._start()

    def close(self, kill: bool = False) -> None:
        for child in (self.client, self.server):
            if not kill:
                child.quit()
            child.kill()

    def measure(self, case: str, transport: str, loop: str, **params: Any) -> tuple[Json, Json]:
        """One measurement: (server result, client result)."""
        self.count += 1
        common = {"case": case, "transport": transport, "loop": loop,
                  "dedicated": self.dedicated,
                  "timeout": self.timeout, **params}
        listen = dict(common, port=f"bench-{os.getpid()}-{self.count}", peer=self.vchan_peer,
                      path=str(self.tmp / f"s{self.count}.sock"))
        self.server.send(cmd="serve", **listen)
        ready = self.server.recv(60)
        self.client.send(cmd="run", address=ready["address"], **common)
        client = self.client.recv(self.timeout + 30)["result"]
        server = self.server.recv(60)["result"]
        return server, client


# A measurement to make: what the children are told, and a guess of its length.
