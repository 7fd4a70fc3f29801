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
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_GRANT_LIMIT",
    "SimError",
    "control",
    "ensure_running",
    "is_running",
    "socket_path",
    "state_dir",
    "stop",
]

DEFAULT_GRANT_LIMIT = 1024      # gntalloc's module parameter default
VS_VERSION = 1
VS_HELLO = 1
VS_CONTROL = 9
_HDR = struct.Struct("<II")
_REPLY = struct.Struct("<iI")


class SimError(RuntimeError):
    """The emulator could not be started or reached."""


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


def _connect(directory: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(socket_path(directory)))
        _rpc(sock, VS_HELLO, struct.pack("<IIII", VS_VERSION, 0, 0, os.getpid()))
    except BaseException:
        sock.close()
        raise
    return sock


def _rpc(sock: socket.socket, op: int, payload: bytes) -> bytes:
    sock.sendall(_HDR.pack(op, len(payload)) + payload)
    reply = sock.recv(1 << 20)
    if len(reply) < _REPLY.size:
        raise SimError("the emulator closed the connection")
    status, length = _REPLY.unpack_from(reply)
    if status < 0:
        # Control commands say why they failed; other requests only how.
        why = reply[_REPLY.size:_REPLY.size + length].decode("utf-8", "replace")
        raise OSError(-status, f"emulator: {why or os.strerror(-status)}")
    return reply[_REPLY.size:_REPLY.size + length]


def is_running(directory: Path | None = None) -> bool:
    """Whether a daemon answers in this state directory."""
    try:
        _connect(directory or state_dir()).close()
    except OSError:
        return False
    return True


def control(command: dict[str, Any], directory: Path | None = None) -> dict[str, Any]:
    """Send one control command to the running daemon and return its answer."""
    directory = directory or state_dir()
    try:
        sock = _connect(directory)
    except OSError as exc:
        raise SimError(f"no emulator running in {directory} ({exc.strerror})") from None
    with sock:
        answer: dict[str, Any] = json.loads(_rpc(sock, VS_CONTROL, json.dumps(command).encode()))
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
    if is_running(directory):
        return directory
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_running(directory):
            return directory
        with open(directory / "hypervisor.log", "ab") as log:
            # --daemonize: the daemon forks away and this child exits at once,
            # so the daemon is nobody's child (no zombie, no ResourceWarning).
            status = subprocess.call(
                [sys.executable, "-m", "vchan.sim.hypervisor", "--dir", str(directory),
                 "--daemonize"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
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
