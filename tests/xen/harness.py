"""dom0's side of the rig: start PV domUs and run roles in them.

Used by the cross-domain tests and the benchmark, inside the rig's dom0
(``tests/xen/rig.py`` boots it).  A :class:`Domu` is a PV guest booted from
the rig's image (read-only) with a job disk made here with ``mkfs.ext4 -d``:
vchan installed for its Python, ``roles.py`` (with the ``peer_roles.py`` and
``peer_events.py`` it imports) and the command agent
(``guest/rig_agent.py``), which takes commands through XenStore.  Every wait has
a deadline; a domU that does not answer is destroyed.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TESTS = str(Path(__file__).resolve().parent.parent)     # for bench.py, run as a script
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from procs import Proc  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARE = Path(os.environ.get("RIG_SHARE", "/rig"))
OUT = Path(os.environ.get("RIG_OUT", "/rig/out"))
ROLES = HERE / "roles.py"
#: What ``roles.py`` imports: the peer roles it shares with the emulator tests
#: and their JSON-line reports (a domU's job disk holds them beside it).
SHARED_ROLES = (HERE.parent / "peer_roles.py", HERE.parent / "peer_events.py")
#: The test-code agent of ``tests/test_devices.py``'s domain processes.
AGENT = HERE.parent / "agent.py"

#: A domU's kernel and initrd: dom0's own (the image has one of each).
BOOT = Path("/boot")

BOOT_TIMEOUT = 240.0     # xl create to agent ready (about 25 s under TCG, alone)
COMMAND_TIMEOUT = 60.0   # one agent command to its answer


def in_rig() -> bool:
    """True in the rig's dom0: Xen's control domain with the rig's share."""
    try:
        caps = Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False
    return "control_d" in caps and (SHARE / "boot").is_dir()


def _xs_read(path: str) -> str | None:
    done = subprocess.run(["xenstore-read", path], capture_output=True, text=True, check=False,
                          timeout=30)
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def _xs_write(path: str, value: str) -> None:
    subprocess.run(["xenstore-write", path, value], check=True, timeout=30)


def _xl(*args: str, timeout: float = 120.0) -> str:
    done = subprocess.run(["xl", *args], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"xl {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done.stdout


def domain_exists(domid: int) -> bool:
    """Whether ``domid`` is a running domain (by ``xl list``)."""
    done = subprocess.run(["xl", "list", str(domid)], capture_output=True, check=False,
                          timeout=60)
    return done.returncode == 0


class DomuError(Exception):
    """A domU or its agent failed."""


@dataclass
class JobResult:
    """What a finished role printed: its status and its JSON lines."""

    rc: int
    out: str

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The output lines that are JSON objects (a role's reports)."""
        found = []
        for line in self.out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    @property
    def last(self) -> dict[str, Any]:
        """The last JSON report."""
        if not self.lines:
            raise DomuError(f"the role reported nothing (status {self.rc}):\n{self.out}")
        return self.lines[-1]


class Domu:
    """A running PV domU with the command agent."""

    _serial = itertools.count(1)

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.disk = workdir / "job.img"
        self.domid = -1
        self._n = 0
        self._jobs = itertools.count(1)
        self.gone = False

    def __repr__(self) -> str:
        return f"<Domu {self.name} domid={self.domid}{' gone' if self.gone else ''}>"

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, *, vif: bool = False, memory: int = 256,
               lifetime: float = 1800) -> Domu:
        """Build the job disk, ``xl create`` the domain (call :meth:`wait_ready` next)."""
        workdir = Path(tempfile.mkdtemp(prefix=f"domu-{name}-"))
        dom = cls(name, workdir)
        tree = workdir / "tree"
        tree.mkdir()
        shutil.copytree(SHARE / "site-vchan", tree / "site")
        shutil.copy(ROLES, tree / "roles.py")
        for shared in SHARED_ROLES:
            shutil.copy(shared, tree / shared.name)
        shutil.copy(AGENT, tree / "agent.py")
        shutil.copy(SHARE / "boot" / "rig_agent.py", tree / "rig_agent.py")
        shutil.copy(SHARE / "boot" / "domu.sh", tree / "domu.sh")
        (tree / "lifetime").write_text(f"{int(lifetime)}\n")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "job", "-d", str(tree), str(dom.disk),
                        "96M"], check=True, timeout=120)
        kernel = sorted(BOOT.glob("vmlinuz-*"))[-1]
        initrd = sorted(BOOT.glob("initrd.img-*"))[-1]
        config = [
            f'name = "{name}"', 'type = "pv"', f'kernel = "{kernel}"', f'ramdisk = "{initrd}"',
            'extra = "root=/dev/xvda ro console=hvc0 init=/sbin/rig-init"',
            f"memory = {memory}", "vcpus = 1",
            # The rig's image a second time (QEMU's read-only drive), and the job disk.
            "disk = [ 'format=raw,vdev=xvda,access=ro,target=/dev/vdb',"
            f" 'format=raw,vdev=xvdb,access=rw,target={dom.disk}' ]",
            'on_poweroff = "destroy"', 'on_reboot = "destroy"', 'on_crash = "destroy"',
        ]
        if vif:
            config.append("vif = [ 'bridge=xenbr0' ]")
        cfg = workdir / f"{name}.cfg"
        cfg.write_text("\n".join(config) + "\n")
        try:
            _xl("create", str(cfg))
        except RuntimeError:
            # Under load a hotplug script can outlast libxl's timeout ("killing
            # execution of /etc/xen/scripts/block add because of timeout"):
            # libxl then gives the domain up.  Once more, from scratch.
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _xl("destroy", name, timeout=60)
            time.sleep(2)
            _xl("create", str(cfg))
        dom.domid = int(_xl("domid", name).strip())
        return dom

    @property
    def home(self) -> str:
        """The agent's XenStore directory."""
        return f"/local/domain/{self.domid}/data/rig"

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the agent is up (the domain booted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _xs_read(f"{self.home}/ready") is not None:
                return
            if not domain_exists(self.domid):
                raise DomuError(f"{self} died while booting (see its console log)")
            time.sleep(0.5)
        self.destroy()
        raise DomuError(f"{self} not ready within {timeout:.0f} s (see its console log)")

    @classmethod
    def start(cls, name: str, **kw: Any) -> Domu:
        """Create a domU and wait for its agent."""
        dom = cls.create(name, **kw)
        dom.wait_ready()
        return dom

    def destroy(self) -> None:
        """``xl destroy``: the domain goes at once, without shutting down."""
        if not self.gone:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _xl("destroy", str(self.domid), timeout=60)
            self.gone = True

    def close(self) -> None:
        """Stop the agent (the domU powers off), keep its logs, free everything."""
        if not self.gone:
            with contextlib.suppress(DomuError, subprocess.TimeoutExpired):
                self.command({"op": "exit"}, timeout=20)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and domain_exists(self.domid):
                    time.sleep(0.5)
            self.destroy()
        self._save_logs()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _save_logs(self) -> None:
        dest = OUT / "domus" / f"{self.name}-{self.domid}"
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["debugfs", "-R", f"rdump /logs {dest}", str(self.disk)],
                       capture_output=True, check=False, timeout=60)

    # -- commands ---------------------------------------------------------------------------

    def command(self, cmd: dict[str, Any], timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Send one command to the agent and wait for its answer."""
        n = self._n
        self._n += 1
        # base64: xenstore-write expands backslash escapes, xenstore-read adds them.
        _xs_write(f"{self.home}/cmd/{n}", base64.b64encode(json.dumps(cmd).encode()).decode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = _xs_read(f"{self.home}/res/{n}")
            if raw is not None:
                answer: dict[str, Any] = json.loads(base64.b64decode(raw))
                if "error" in answer:
                    raise DomuError(f"{self}: {cmd['op']}: {answer['error']}")
                return answer
            time.sleep(0.1)
        raise DomuError(f"{self}: no answer to {cmd} within {timeout:.0f} s")

    def spawn_argv(self, argv: list[str | int]) -> RemoteJob:
        """Start a program in the domU."""
        job = f"j{next(self._jobs)}"
        self.command({"op": "spawn", "id": job, "argv": [str(a) for a in argv]})
        return RemoteJob(self, job)

    def spawn(self, *args: str | int) -> RemoteJob:
        """Start ``python3 roles.py ARGS`` in the domU."""
        return self.spawn_argv(["python3", "/job/roles.py", *args])

    def run(self, *args: str | int, timeout: float = 120.0) -> JobResult:
        """Run ``roles.py ARGS`` in the domU to its end."""
        return self.spawn(*args).wait(timeout)


class RemoteJob:
    """A role running in a domU."""

    def __init__(self, dom: Domu, job: str) -> None:
        self.dom = dom
        self.job = job

    def poll_output(self) -> str:
        """The output so far (its last lines)."""
        return str(self.dom.command({"op": "wait", "id": self.job, "timeout": 0})["out"])

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the role to report ``{"event": event, ...}``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.dom.command({"op": "wait", "id": self.job, "timeout": 0})
            for report in JobResult(answer.get("rc", 0), answer["out"]).lines:
                if report.get("event") == event:
                    return report
            if not answer.get("running"):
                raise DomuError(f"{self.dom} job {self.job} ended (status {answer['rc']}) "
                                f"before {event!r}:\n{answer['out']}")
            time.sleep(0.3)
        raise DomuError(f"{self.dom} job {self.job}: no {event!r} within {timeout:.0f} s")

    def wait(self, timeout: float = 120.0) -> JobResult:
        """Wait for the role to end (killing it at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            answer = self.dom.command({"op": "wait", "id": self.job,
                                       "timeout": max(0.0, min(5.0, left))},
                                      timeout=COMMAND_TIMEOUT + 5)
            if not answer.get("running"):
                return JobResult(int(answer["rc"]), str(answer["out"]))
            if left <= 0:
                self.kill()
                raise DomuError(f"{self.dom} job {self.job} still running after "
                                f"{timeout:.0f} s:\n{answer['out']}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the role."""
        self.dom.command({"op": "kill", "id": self.job, "signal": int(sig)})


class LocalJob(Proc):
    """A role running in dom0: a :class:`procs.Proc` (the suite's one process
    helper) with :class:`RemoteJob`'s interface, so a test drives a role the
    same way in either domain."""

    def __init__(self, *args: str | int, stdin: int | None = subprocess.DEVNULL) -> None:
        super().__init__([sys.executable, ROLES, *map(str, args)], stdin=stdin, grace=0,
                         name=f"dom0 role {' '.join(map(str, args))}")
        self._scanned = 0                           # lines looked at by wait_for
        self._events: dict[str, dict[str, Any]] = {}  # the first report of each event

    def _result(self) -> JobResult:
        with self._cond:
            stdout = "\n".join(self._lines)
        status = self.proc.returncode
        return JobResult(-1 if status is None else status, f"{stdout}\n{self.stderr}")

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the role to report ``{"event": event, ...}`` (the first such
        report, even if an earlier call went past it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Each line is parsed once: a role may say thousands.
                for line in self._lines[self._scanned:]:
                    for report in JobResult(0, line).lines:
                        self._events.setdefault(str(report.get("event")), report)
                self._scanned = len(self._lines)
                if event in self._events:
                    return self._events[event]
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self._cond.wait(left)
        if self.eof:
            self.proc.wait(30)
            raise DomuError(f"{self.name} ended ({self.proc.returncode}) before {event!r}:\n"
                            f"{self._result().out}")
        raise DomuError(f"{self.name}: no {event!r} within {timeout:.0f} s:\n"
                        f"{self._result().out}")

    def wait(self, timeout: float = 120.0) -> JobResult:   # type: ignore[override]
        """Wait for the role to end (killing it at the deadline)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise DomuError(f"{self.name} still running after {timeout:.0f} s:\n"
                            f"{self._result().out}") from None
        self.rest(30)               # every line read
        return self._result()


@contextlib.contextmanager
def local(*args: str | int) -> Iterator[LocalJob]:
    """A dom0 role for the duration of a ``with`` block."""
    job = LocalJob(*args)
    try:
        yield job
    finally:
        job.close()


# -- processes of a domU for the device tests ----------------------------------------------


#: The domain host's TCP port in every domU (over xenbr0).
DOMAIN_HOST_PORT = 7707


def domu_address(domid: int) -> str:
    """A domU's address on xenbr0 (``guest/domu.sh`` sets it from the domid)."""
    return f"10.99.0.{10 + domid}"


def offset_from(exchange: Callable[[], tuple[float, float, float]],
                samples: int = 7) -> float:
    """Another domain's monotonic clock minus ours, from the quickest of a few
    exchanges ``(our time sent, their time, our time back)``: off by at most
    half that round trip (a few ms under TCG), if the other side reads its
    clock as soon as it has the request (the host does; test code run by an
    agent is parsed and compiled first, which skewed it by up to 25 ms).
    Measured when needed, not once: a loaded rig makes some round trips
    slow, and a domU's clock need not keep the same offset for minutes."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        sent, theirs, back = exchange()
        if best is None or back - sent < best[0]:
            best = (back - sent, theirs - (sent + back) / 2)
    assert best is not None
    return best[1]


class DomainHost:
    """The ``domain-host`` role in one domain: it forks that domain's processes
    for ``tests/test_devices.py``, which talks to them over TCP (a domU's
    over xenbr0, so the domU needs a vif; dom0's over loopback).  Forking
    spares each process Python's start-up, seconds under TCG.

    Also tells how the domain's monotonic clock relates to dom0's, so that
    times taken there can be compared with times taken here.
    """

    def __init__(self, job: RemoteJob | LocalJob, domid: int, address: str) -> None:
        self.job = job
        self.domid = domid
        self.address = (address, DOMAIN_HOST_PORT)
        self.job.wait_for("listening", timeout=120)

    @classmethod
    def in_domu(cls, dom: Domu) -> DomainHost:
        """A host in ``dom`` (made with a vif)."""
        job = dom.spawn("--deadline", 3600, "domain-host", DOMAIN_HOST_PORT)
        return cls(job, dom.domid, domu_address(dom.domid))

    @classmethod
    def in_dom0(cls) -> DomainHost:
        """A host in dom0, where the tests run."""
        job = LocalJob("--deadline", 3600, "domain-host", DOMAIN_HOST_PORT)
        return cls(job, 0, "127.0.0.1")

    def __repr__(self) -> str:
        return f"<DomainHost of domain {self.domid} at {self.address[0]}>"

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A new connection to the host (retried while the vif comes up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection(self.address, timeout=10)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def request(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One request on a connection of its own."""
        with self.connect() as conn:
            conn.settimeout(timeout)
            conn.sendall(json.dumps(request).encode() + b"\n")
            line = conn.makefile("r", encoding="utf-8").readline()
        if not line:
            raise DomuError(f"{self}: no answer to {request}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise DomuError(f"{self}: {request}: {answer['error']}")
        return answer

    def clock_offset(self) -> float:
        """The domain's monotonic clock minus dom0's, now (0 in dom0: one clock)."""
        if self.domid == 0:
            return 0.0

        def exchange() -> tuple[float, float, float]:
            with self.connect() as conn:
                reader = conn.makefile("r", encoding="utf-8")
                sent = time.monotonic()
                conn.sendall(b'{"op": "clock"}\n')
                theirs = float(json.loads(reader.readline())["clock"])
                return sent, theirs, time.monotonic()

        return offset_from(exchange)

    def process(self) -> RemoteDomainProcess:
        """A new process of the domU."""
        return RemoteDomainProcess(self)

    def close(self) -> None:
        """Stop the host (its processes are killed)."""
        with contextlib.suppress(OSError, DomuError, ValueError):
            self.request({"op": "exit"}, timeout=10)
        with contextlib.suppress(DomuError):
            self.job.wait(30)
        if isinstance(self.job, LocalJob):
            self.job.close()


class RemoteDomainProcess:
    """A process in a domU that runs test code: ``domains.DomainProcess``'s
    interface, over a TCP connection to the domU's :class:`DomainHost`."""

    def __init__(self, host: DomainHost) -> None:
        self.host = host
        self.domid = host.domid
        self._conn = host.connect()
        self._conn.settimeout(60)
        self._conn.sendall(b'{"op": "spawn"}\n')
        self._reader = self._conn.makefile("r", encoding="utf-8")
        hello = self._reader.readline()
        if not hello:
            raise DomuError(f"{host}: the new process did not start")
        self.pid = int(json.loads(hello)["pid"])
        self._status: int | None = None

    def __repr__(self) -> str:
        return f"<RemoteDomainProcess {self.pid} in domain {self.domid}>"

    def to_local_clock(self, t: float) -> float:
        """A time taken by this process's ``time.monotonic()``, on dom0's clock
        (its host's clock, the same, compared with dom0's now)."""
        return t - self.host.clock_offset()

    def __call__(self, code: str, timeout: float = 30.0) -> Any:
        """Run ``code`` in the process; return its last expression's value."""
        from domains import agent_answer

        self._conn.settimeout(timeout)
        try:
            self._conn.sendall(json.dumps({"code": code}).encode() + b"\n")
            line = self._reader.readline()
        except (BrokenPipeError, ConnectionResetError):
            line = ""
        return agent_answer(line, self.domid, self.wait)

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns when it was sent, on dom0's monotonic clock."""
        sent = float(self.host.request({"op": "kill", "pid": self.pid, "signal": int(sig)})
                     ["sent"])
        return sent - self.host.clock_offset()

    def wait(self, timeout: float = 10.0) -> int:
        """The process's exit status (as ``subprocess`` gives it)."""
        if self._status is None:
            deadline = time.monotonic() + timeout
            while True:
                left = max(0.0, min(5.0, deadline - time.monotonic()))
                answer = self.host.request({"op": "wait", "pid": self.pid, "timeout": left},
                                           timeout=left + 30)
                if "status" in answer:
                    self._status = int(answer["status"])
                    break
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(f"domain {self.domid} process {self.pid}",
                                                    timeout)
        return self._status

    def close(self) -> None:
        """End the process (its input ends) and wait for it."""
        if self._conn.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_WR)
        try:
            self.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(DomuError):
                self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, DomuError):
                self.wait(10)
        except DomuError:
            pass
        self._reader.close()
        self._conn.close()


@contextlib.contextmanager
def domain_hosts(*doms: Domu) -> Iterator[list[DomainHost]]:
    """Domain hosts: dom0's, then one in each of ``doms`` (made with a vif)."""
    hosts: list[DomainHost] = []
    try:
        hosts.append(DomainHost.in_dom0())
        hosts.extend(DomainHost.in_domu(dom) for dom in doms)
        yield hosts
    finally:
        for host in hosts:
            host.close()
