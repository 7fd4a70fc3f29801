"""Real separate processes playing emulated domains, for cross-process tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AGENT = Path(__file__).with_name("agent.py")


class AgentError(Exception):
    """The code run in a domain process raised."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info["error"] + "\n" + info.get("traceback", ""))
        self.type = info.get("type")
        self.errno = info.get("errno")
        self.message = info["error"]


class DomainProcess:
    """A Python process in emulated domain ``domid`` that runs test code."""

    def __init__(self, domid: int, env: dict[str, str] | None = None) -> None:
        self.domid = domid
        r, w = os.pipe()
        full_env = dict(os.environ, VCHAN_DOMID=str(domid), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), str(w)], stdin=subprocess.PIPE, pass_fds=(w,),
            env=full_env, text=True,
        )
        os.close(w)
        self._answers = os.fdopen(r, "r")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __call__(self, code: str, timeout: float = 30.0) -> Any:
        """Run ``code`` in the process; return its last expression's value."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()
        line = self._answers.readline()
        if not line:
            raise EOFError(f"domain {self.domid} process exited with {self.proc.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise AgentError(answer)
        return answer["value"]

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._answers.close()

    def __enter__(self) -> DomainProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
