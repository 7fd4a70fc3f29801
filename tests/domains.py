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
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from procs import Proc

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
        # Answers come on a pipe of their own: the code run may print to stdout.
        r, w = os.pipe()
        try:
            self.proc = Proc([sys.executable, AGENT, str(w)], env={
                "VCHAN_DOMID": str(domid), **(env or {})}, stdout=None, events_fd=r,
                pass_fds=(w,), name=f"domain {domid} process", grace=10)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __call__(self, code: str, timeout: float = 30.0) -> Any:
        """Run ``code`` in the process; return its last expression's value (waiting
        as long as it takes: ``timeout`` is for the rig's remote processes)."""
        self.proc.send(json.dumps({"code": code}))
        return agent_answer(self.proc.readline(None) or "", self.domid, self.proc.proc.wait)

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.proc.wait(timeout)

    def to_local_clock(self, t: float) -> float:
        """A time the process took with ``time.monotonic()``, on ours (the same clock)."""
        return t

    def close(self) -> None:
        """Close its stdin (the agent ends), give it 10 s, then SIGKILL; reaped."""
        self.proc.close()

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
