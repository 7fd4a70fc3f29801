"""Real separate processes playing domains, for cross-process tests.

:class:`DomainProcess` is a local process: of an emulated domain, or of
dom0 on the Xen rig.  On the rig a process of a domU is a
``harness.RemoteDomainProcess`` (``tests/xen/harness.py``) with the same
interface, :class:`Domain`.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

AGENT = Path(__file__).with_name("agent.py")


class AgentError(Exception):
    """The code run in a domain process raised."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info["error"] + "\n" + info.get("traceback", ""))
        self.type = info.get("type")
        self.errno = info.get("errno")
        self.message = info["error"]


def agent_answer(line: str, domid: int, exit_status: Any) -> Any:
    """The value of one answer line of an agent (``tests/agent.py``); an empty
    line means the process is gone (``exit_status()`` says how)."""
    if not line:
        raise EOFError(f"domain {domid} process exited with {exit_status()}")
    answer = json.loads(line)
    if "error" in answer:
        raise AgentError(answer)
    return answer["value"]


class Domain(Protocol):
    """A process of domain ``domid`` that runs test code (local or in a domU)."""

    domid: int

    @property
    def pid(self) -> int: ...

    def __call__(self, code: str, timeout: float = 30.0) -> Any: ...

    def kill(self, sig: int = signal.SIGKILL) -> float: ...

    def wait(self, timeout: float = 10.0) -> int: ...

    def to_local_clock(self, t: float) -> float: ...

    def close(self) -> None: ...


class DomainProcess:
    """A local Python process in domain ``domid`` that runs test code (an
    emulated domain, or the rig's dom0 with ``VCHAN_BACKEND=xen``)."""

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
        return agent_answer(self._answers.readline(), self.domid, self.proc.wait)

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def to_local_clock(self, t: float) -> float:
        """A time the process took with ``time.monotonic()``, on ours (the same clock)."""
        return t

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


def rig_harness() -> Any:
    """``tests/xen/harness.py``, dom0's side of the Xen rig, where processes of
    domUs come from (the rig's own tests import it as ``harness`` too: one
    module)."""
    here = str(Path(__file__).resolve().parent / "xen")
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("harness")
