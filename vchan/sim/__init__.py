"""The emulated hypervisor: processes play Xen domains.

The emulator is one daemon per user (per state directory) that keeps what a
hypervisor keeps -- grant tables and event channels of every emulated domain
-- while the data path stays between the processes themselves (shared
memfd pages and eventfds; see ``kernel/sim.c``).

* ``VCHAN_DOMID`` names the domain of a process (default 0).
* ``VCHAN_SIM_DIR`` names the state directory (default
  ``$XDG_RUNTIME_DIR/vchan-sim``, else ``/tmp/vchan-sim-<uid>``); it holds
  the daemon's socket, lock, log and parameters.
* The daemon starts on first use (:func:`ensure_running`) or with
  ``vchan sim start``; a lock makes sure two never run.
* The daemon is a process that can die or be stopped.  Nothing waits for
  it without bound: a request whose daemon is gone, stopped (SIGSTOP, a
  debugger) or silent for ``VCHAN_SIM_TIMEOUT`` seconds (default 5) fails
  with :class:`EmulatorError`, which names the daemon, its directory and
  what became of it (kernel/sim.c applies the same rules to device
  requests; the event hub of each loop looks at the daemon a few times a
  second and fails every connection and server of the loop with it).  A
  later first use starts a new daemon if the old one is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import VchanError
from .protocol import HELLO, KIND_CONTROL, REPLY, REQUEST, VS_CONTROL, VS_HELLO, VS_VERSION

__all__ = [
    "DEFAULT_GRANT_LIMIT",
    "EmulatorError",
    "SimError",
    "control",
    "daemon_state",
    "ensure_running",
    "is_running",
    "request_timeout",
    "socket_path",
    "state_dir",
    "stop",
]

DEFAULT_GRANT_LIMIT = 1024      # gntalloc's module parameter default


class SimError(RuntimeError):
    """The emulator could not be started or reached."""


class EmulatorError(ConnectionError, VchanError, SimError):
    """The emulator's daemon died, is stopped or stopped answering.

    A :class:`ConnectionError` (connections over the emulator end with it)
    and a :class:`SimError`.  ``errno`` says what happened: ``ECONNRESET``
    the daemon is gone (killed, crashed or stopped by ``vchan sim stop``),
    ``EHOSTDOWN`` its process is stopped, ``ETIMEDOUT`` it did not answer
    within :func:`request_timeout`, ``EBADMSG`` it answered garbage.
    ``pid`` and ``directory`` name the daemon when they are known.
    """

    def __init__(self, err: int, message: str, pid: int | None = None,
                 directory: str | Path | None = None) -> None:
        super().__init__(err, message)
        self.pid = pid
        self.directory = None if directory is None else Path(directory)

    def __reduce__(self) -> Any:
        return (type(self), (self.errno, self.strerror, self.pid, self.directory))


_WHAT = {
    errno.ECONNRESET: "is gone (killed, crashed or stopped)",
    errno.EHOSTDOWN: "is stopped (SIGSTOP or a debugger): it answers nothing",
    errno.EBADMSG: "answered with a malformed message",
}


def emulator_error(err: int, pid: int | None, directory: Path | str | None) -> EmulatorError:
    """The :class:`EmulatorError` for ``err`` (one of its errnos), naming the daemon."""
    what = _WHAT.get(err) or f"did not answer within {request_timeout():g} s"
    who = "the vchan emulator daemon" + (f" (pid {pid})" if pid else "")
    where = f" in {directory}" if directory is not None else ""
    return EmulatorError(err, f"{who}{where} {what}", pid, directory)


def request_timeout() -> float:
    """How long a running daemon may take to answer (``VCHAN_SIM_TIMEOUT``, seconds)."""
    try:
        value = float(os.environ.get("VCHAN_SIM_TIMEOUT", "5"))
    except ValueError:
        return 5.0
    return value if 0 < value < 86400 else 5.0


#: While an answer is due, the daemon's process is looked at this often.
WAIT_SLICE = 0.02
_PF_EXITING = 0x4           # include/linux/sched.h: set as soon as a process starts to exit


def daemon_state(pid: int | None) -> int:
    """What became of the daemon's process: 0 running (or not known),
    ``EHOSTDOWN`` stopped, ``ECONNRESET`` gone -- as kernel/sim.c tells."""
    if not pid or pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except FileNotFoundError:
        return errno.ECONNRESET
    except ProcessLookupError:
        return errno.ECONNRESET
    except OSError:
        return 0
    # "pid (comm) S ppid pgrp session tty tpgid flags ...": after the last ')'.
    fields = stat_line[stat_line.rfind(b")") + 2:].split()
    if not fields:
        return 0
    if fields[0] in (b"Z", b"X", b"x") or \
            (len(fields) > 6 and fields[6].isdigit() and int(fields[6]) & _PF_EXITING):
        return errno.ECONNRESET         # dead, or dying (its descriptors already closed)
    if fields[0] in (b"T", b"t"):
        return errno.EHOSTDOWN
    return 0


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that listens at the other end of a Unix socket (0 unknown)."""
    try:
        pid, _uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return 0
    return int(pid)


def wait_for(sock: socket.socket, pid: int, directory: Path | str | None,
             timeout: float | None = None, *, write: bool = False) -> None:
    """Wait until ``sock`` is readable (writable), looking at the daemon
    ``pid`` meanwhile; :class:`EmulatorError` if it is gone, stopped or
    silent for ``timeout`` (default :func:`request_timeout`) seconds."""
    deadline = time.monotonic() + (request_timeout() if timeout is None else timeout)
    poller = select.poll()      # not select(): descriptors may be >= 1024
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    while True:
        if poller.poll(WAIT_SLICE * 1000):
            return
        state = daemon_state(pid)
        if state:
            raise emulator_error(state, pid, directory)
        if time.monotonic() >= deadline:
            raise emulator_error(errno.ETIMEDOUT, pid, directory)


def state_dir() -> Path:
    """The emulator's state directory (``VCHAN_SIM_DIR`` or a per-user default)."""
    env = os.environ.get("VCHAN_SIM_DIR")
    if env:
        return Path(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return Path(run) / "vchan-sim"
    return Path(f"/tmp/vchan-sim-{os.getuid()}")


def socket_path(directory: Path | None = None) -> Path:
    """The hypervisor socket in a state directory."""
    return (directory or state_dir()) / "hypervisor.sock"


def connect(path: Path | str, kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
    """A connected (blocking) Unix socket to the daemon at ``path``.

    Connecting never blocks on the daemon: a stopped daemon's full backlog
    is retried until :func:`request_timeout`, then :class:`EmulatorError`.
    """
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        deadline = time.monotonic() + request_timeout()
        while True:
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:
                # The backlog is full (AF_UNIX says EAGAIN): try again.
                if time.monotonic() >= deadline:
                    raise emulator_error(errno.ETIMEDOUT, None, Path(path).parent) from None
                time.sleep(WAIT_SLICE)
            except InterruptedError:
                continue
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(directory: Path) -> socket.socket:
    sock = connect(socket_path(directory))
    try:
        _rpc(sock, VS_HELLO, HELLO.pack(VS_VERSION, 0, KIND_CONTROL, os.getpid()),
             directory=directory)
    except BaseException:
        sock.close()
        raise
    return sock


def _rpc(sock: socket.socket, op: int, payload: bytes, *,
         directory: Path | None = None) -> bytes:
    """One request, one reply; the wait for it is bounded (:func:`wait_for`)."""
    pid = peer_pid(sock)
    try:
        sock.sendall(REQUEST.pack(op, len(payload)) + payload)
    except (BrokenPipeError, ConnectionResetError):
        raise emulator_error(errno.ECONNRESET, pid, directory) from None
    wait_for(sock, pid, directory)
    try:
        reply = sock.recv(1 << 20)
    except ConnectionResetError:
        reply = b""
    if not reply:               # it never hangs up on a request it can read
        raise emulator_error(errno.ECONNRESET, pid, directory)
    if len(reply) < REPLY.size:
        raise emulator_error(errno.EBADMSG, pid, directory)
    status, length = REPLY.unpack_from(reply)
    if status < 0:
        # Control commands say why they failed; other requests only how.
        why = reply[REPLY.size:REPLY.size + length].decode("utf-8", "replace")
        raise OSError(-status, f"emulator: {why or os.strerror(-status)}")
    return reply[REPLY.size:REPLY.size + length]


def is_running(directory: Path | None = None) -> bool:
    """Whether a daemon answers in this state directory."""
    try:
        _connect(directory or state_dir()).close()
    except OSError:
        return False
    return True


def _probe(directory: Path) -> bool:
    """True if a daemon answers, False if none listens; :class:`EmulatorError`
    if one listens but is stopped or does not answer (a new one could not
    take its place: it holds the directory's lock)."""
    try:
        _connect(directory).close()
    except EmulatorError as exc:
        if exc.errno == errno.ECONNRESET:
            return False        # it died while we asked
        raise
    except OSError:
        return False
    return True


def control(command: dict[str, Any], directory: Path | None = None) -> dict[str, Any]:
    """Send one control command to the running daemon and return its answer."""
    directory = directory or state_dir()
    try:
        sock = _connect(directory)
    except EmulatorError:
        raise
    except OSError as exc:
        raise SimError(f"no emulator running in {directory} ({exc.strerror})") from None
    with sock:
        answer: dict[str, Any] = json.loads(_rpc(sock, VS_CONTROL, json.dumps(command).encode(),
                                                 directory=directory))
    return answer


def _check_default_dir(directory: Path) -> None:
    """The default state directory must be ours: under /tmp another user could
    make it first and serve a daemon of theirs there, which would then see every
    page this user's processes share."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return
    uid = os.getuid()
    if st.st_uid != uid or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        raise SimError(f"the emulator's default state directory {directory} is not a directory "
                       f"of yours (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): "
                       "refusing to use it, as another user could be serving there; remove "
                       "it or set VCHAN_SIM_DIR")


def ensure_running(directory: Path | None = None, timeout: float = 10.0) -> Path:
    """Start the daemon for ``directory`` unless one already runs there.

    Safe to call from many processes at once: a lock file serialises the
    start, and the daemon itself holds a lock for its lifetime.
    """
    default = directory is None and not os.environ.get("VCHAN_SIM_DIR")
    directory = directory or state_dir()
    if default:
        _check_default_dir(directory)
    if _probe(directory):
        return directory
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(directory / "start.lock", "w")  # noqa: SIM115 -- closed by with below
    except OSError as exc:
        named = "VCHAN_SIM_DIR=" if os.environ.get("VCHAN_SIM_DIR") else "state directory "
        raise SimError(f"the emulator cannot use its {named}{directory}: "
                       f"{exc.strerror or exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _probe(directory):
            return directory
        with open(directory / "hypervisor.log", "ab") as log:
            # --daemonize: the daemon forks away and this child exits at once,
            # so the daemon is nobody's child (no zombie, no ResourceWarning).
            status = subprocess.call(
                [sys.executable, "-m", "vchan.sim.hypervisor", "--dir", str(directory),
                 "--daemonize"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                # Not the caller's directory: python -m looks there first, and a
                # vchan source tree there (an unpacked sdist) would shadow ours.
                cwd=directory,
            )
        if status != 0:
            raise SimError(f"the emulator failed to start (status {status}); "
                           f"see {directory / 'hypervisor.log'}")
        deadline = time.monotonic() + timeout
        while not is_running(directory):
            if time.monotonic() > deadline:
                raise SimError(f"the emulator did not start within {timeout} s; "
                               f"see {directory / 'hypervisor.log'}")
            time.sleep(0.01)
    return directory


def stop(directory: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the daemon and wait until it is gone; False if none was running."""
    directory = directory or state_dir()
    try:
        control({"cmd": "stop"}, directory)
    except EmulatorError as exc:
        if exc.errno != errno.ECONNRESET:
            raise               # there, but stopped or silent: it cannot stop itself
        return False
    except SimError:
        return False
    # The daemon holds daemon.lock for its whole life: once we can take it,
    # the daemon has exited (its pid may linger as a zombie; the lock won't).
    deadline = time.monotonic() + timeout
    with open(directory / "daemon.lock", "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SimError(f"the emulator in {directory} did not stop") from None
                time.sleep(0.005)


# -- the emulated xenstored's sockets: <dir>/xenstore/<domid>.sock beside hypervisor.sock --


def xenstore_socket(domid: int, directory: Path | None = None) -> str:
    """The XenStore socket of emulated domain ``domid``; starts the emulator if needed.

    The daemon makes the socket when asked (``xenstore-socket``), so a
    domain can connect before any of its processes opened the hypervisor.
    """
    directory = ensure_running(directory)
    answer = control({"cmd": "xenstore-socket", "domid": domid}, directory)
    return str(answer["path"])


def xenstore_daemon(sock: socket.socket, path: str) -> tuple[int, str] | None:
    """(pid, state directory) of the emulator's daemon when ``sock``, connected
    to ``path``, is one of its XenStore sockets; else None (real Xen)."""
    where = os.path.dirname(os.path.abspath(path))
    if os.path.basename(where) != "xenstore":
        return None
    directory = os.path.dirname(where)
    if not os.path.exists(os.path.join(directory, "hypervisor.sock")):
        return None
    return peer_pid(sock), directory
