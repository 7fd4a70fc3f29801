"""The command agent of a rig domU: runs what dom0's tests ask, over XenStore.

Control goes through Debian's ``xenstore-*`` tools (not vchan's own client,
which is under test).  Under the domain's home ``/local/domain/<id>``:

* the agent writes ``data/rig/ready`` when it starts;
* dom0 writes command ``n`` (0, 1, 2, ...) as JSON to ``data/rig/cmd/<n>``;
* the agent answers in ``data/rig/res/<n>``.

Both are base64 of the JSON text: ``xenstore-write`` expands backslash
escapes and ``xenstore-read`` adds them.

Commands (``op``): ``spawn`` (start ``argv`` in the background as job
``id``), ``wait`` (job ``id`` for up to ``timeout`` s), ``kill`` (send
``signal`` to job ``id``), ``exit``.  A job's output goes to
``/job/logs/<id>.log`` and its last lines come back with ``wait``; the
domU's console (kept by xenconsoled in dom0) shows every command.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOGS = Path("/job/logs")
TAIL = 900           # bytes of output returned (a domU's XenStore values stay < 2 KiB)


def xs_read(path: str) -> str | None:
    done = subprocess.run(["xenstore-read", path], capture_output=True, text=True, check=False)
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def xs_write(path: str, value: str) -> None:
    subprocess.run(["xenstore-write", path, value], check=True)


def encode(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def decode(text: str) -> Any:
    return json.loads(base64.b64decode(text))


def say(message: str) -> None:
    print(f"rig-agent: {message}", flush=True)


class Agent:
    """The jobs of this domU, by id."""

    def __init__(self) -> None:
        self.jobs: dict[str, subprocess.Popen[bytes]] = {}

    def tail(self, job: str) -> str:
        path = LOGS / f"{job}.log"
        try:
            data = path.read_bytes()
        except OSError:
            return ""
        return data[-TAIL:].decode(errors="replace")

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "spawn":
            job = str(cmd["id"])
            out = open(LOGS / f"{job}.log", "wb")   # noqa: SIM115 -- the child keeps it
            env = dict(os.environ, **cmd.get("env", {}))
            self.jobs[job] = subprocess.Popen(cmd["argv"], stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd="/job", env=env,
                                              start_new_session=True)
            out.close()
            return {"pid": self.jobs[job].pid}
        if op == "wait":
            job = str(cmd["id"])
            proc = self.jobs[job]
            try:
                rc = proc.wait(float(cmd.get("timeout", 0)))
            except subprocess.TimeoutExpired:
                return {"running": True, "out": self.tail(job)}
            say(f"job {job} ended with {rc}:\n{self.tail(job)}")
            return {"rc": rc, "out": self.tail(job)}
        if op == "kill":
            proc = self.jobs[str(cmd["id"])]
            if proc.poll() is None:
                os.killpg(proc.pid, int(cmd.get("signal", signal.SIGKILL)))
            return {"killed": True}
        if op == "exit":
            return {"bye": True}
        return {"error": f"unknown op {op!r}"}


def main() -> int:
    LOGS.mkdir(exist_ok=True)
    domid = xs_read("domid")
    home = f"/local/domain/{domid}/data/rig"
    agent = Agent()
    # One persistent watch wakes us when dom0 writes a command; a 1 s poll
    # is the fallback.
    watcher = subprocess.Popen(["xenstore-watch", f"{home}/cmd"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    assert watcher.stdout is not None
    xs_write(f"{home}/ready", str(time.monotonic()))
    say(f"ready in domain {domid}")
    n = 0
    try:
        while True:
            raw = xs_read(f"{home}/cmd/{n}")
            if raw is None:
                readable, _, _ = select.select([watcher.stdout], [], [], 1.0)
                if readable:
                    os.read(watcher.stdout.fileno(), 4096)
                continue
            cmd = decode(raw)
            say(f"command {n}: {json.dumps(cmd)}")
            try:
                answer = agent.handle(cmd)
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            xs_write(f"{home}/res/{n}", encode(answer))
            n += 1
            if cmd.get("op") == "exit":
                return 0
    finally:
        watcher.kill()
        for proc in agent.jobs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
