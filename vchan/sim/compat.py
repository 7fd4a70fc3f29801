"""Unmodified libxenvchan programs on the emulated hypervisor.

``kernel/compat/`` holds drop-in builds of Xen's ``libxengnttab.so.1`` and
``libxenevtchn.so.1`` (with the symbol versions of Debian's) and a minimal
``libxenctrl.so.4.17``, all over the emulator.  A C program linked with
Debian's ``libxenvchan`` runs on them unchanged when they come first on
``LD_LIBRARY_PATH``; its XenStore is the emulated xenstored, which Debian's
``libxenstore`` reaches through ``XENSTORED_PATH``.  ``vchan sim run`` sets
all of that up::

    vchan sim run --domid 1 -- /usr/lib/xen-4.17/bin/vchan-socket-proxy \\
        --mode=server 2 /local/domain/1/data/vchan/2/echo /run/echo.sock

:func:`build` compiles the libraries when they are missing or older than
their sources (``make -C kernel/compat`` does the same with the same
flags); :func:`run_environment` is the environment a program needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path

from . import VS_HELLO, VS_VERSION, SimError, _rpc, control, ensure_running, socket_path

__all__ = [
    "LIBRARIES",
    "CompatError",
    "build",
    "build_dir",
    "hold_domain",
    "run_environment",
    "source_dir",
]

# soname -> (its main source, its version script)
LIBRARIES = {
    "libxengnttab.so.1": ("gnttab.c", "libxengnttab.map"),
    "libxenevtchn.so.1": ("evtchn.c", "libxenevtchn.map"),
    "libxenctrl.so.4.17": ("ctrl.c", "libxenctrl.map"),
}
# Linked into every library: the device layer and the shared helpers.
_COMMON = ("../common.c", "../sim.c", "../xen.c", "compat.c")
# Keep in step with kernel/compat/Makefile.
_CFLAGS = ["-O2", "-g", "-std=gnu11", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_LDFLAGS = ["-shared", "-Wl,--no-undefined", "-Wl,-z,defs"]
_KIND_EVTCHN = 3


class CompatError(SimError):
    """The compat libraries cannot be built or used here."""


def source_dir() -> Path:
    """``kernel/compat`` of the vchan source tree this package runs from."""
    src = Path(__file__).resolve().parents[2] / "kernel" / "compat"
    if not (src / "gnttab.c").is_file():
        raise CompatError(f"the compat libraries' sources are not in {src}: they are built "
                          "from a vchan source checkout (pip install -e)")
    return src


def build_dir() -> Path:
    """Where :func:`build` puts the libraries: ``kernel/compat/build``, or a
    per-user cache directory when the source tree is read-only."""
    src = source_dir()
    out = src / "build"
    with contextlib.suppress(OSError):
        out.mkdir(exist_ok=True)
    if os.access(out, os.W_OK):
        return out
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vchan" / "compat"


def _inputs(src: Path) -> list[Path]:
    kernel = src.parent
    return [p for pattern in ("*.c", "*.h", "*.map") for p in src.glob(pattern)] + \
        [p for pattern in ("*.c", "*.h") for p in kernel.glob(pattern)]


def _fresh(out: Path, newest: float) -> bool:
    try:
        return min((out / name).stat().st_mtime for name in LIBRARIES) >= newest
    except FileNotFoundError:
        return False


def _compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise CompatError("building the compat libraries needs a C compiler "
                      "(Debian: apt-get install gcc)")


def build(out: Path | None = None, *, force: bool = False) -> Path:
    """Build the compat libraries if needed; returns their directory.

    Up to date means every library is newer than every source (the compat
    sources, the version scripts and the device layer in ``kernel/``).
    Concurrent callers wait for one another (a lock in the directory).
    """
    src = source_dir()
    out = (out or build_dir()).resolve()
    newest = max(p.stat().st_mtime for p in _inputs(src))
    if not force and _fresh(out, newest):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _fresh(out, newest):
            return out
        cc = _compiler()
        for name, (main, version_script) in LIBRARIES.items():
            tmp = out / f".{name}.{os.getpid()}.tmp"
            cmd = [cc, *_CFLAGS, "-I..", *_LDFLAGS, f"-Wl,-soname,{name}",
                   f"-Wl,--version-script={version_script}", "-o", str(tmp), main, *_COMMON]
            done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CompatError(_explain(name, cc, done.returncode, done.stderr))
            tmp.replace(out / name)
    return out


def _explain(name: str, cc: str, status: int, stderr: str) -> str:
    if any(f"{h}: No such file" in stderr for h in ("xengnttab.h", "xenevtchn.h", "xenctrl.h")):
        return f"building {name} needs Xen's headers (Debian: apt-get install libxen-dev)"
    lines = [line for line in stderr.splitlines() if line.strip()]
    why = " | ".join(lines[-3:]) if lines else f"{cc} exited with status {status}"
    return f"building {name} failed: {why}"


def run_environment(domid: int, directory: Path | None = None,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that runs a libxenvchan program in emulated domain ``domid``.

    Starts the emulator (in ``directory``, default the usual state directory)
    and builds the libraries if needed.  Sets ``LD_LIBRARY_PATH`` (the compat
    libraries first), ``VCHAN_DOMID``, ``VCHAN_SIM_DIR``, ``VCHAN_BACKEND=sim``
    (so vchan's Python side agrees) and ``XENSTORED_PATH`` (the domain's
    XenStore socket, for libxenstore).
    """
    if not isinstance(domid, int) or isinstance(domid, bool) or not 0 <= domid < 0x7FF0:
        raise ValueError(f"domid must be a domain id in 0..32751, got {domid!r}")
    directory = ensure_running(directory)
    libs = build()
    xenstore = control({"cmd": "xenstore-socket", "domid": domid}, directory)["path"]
    env = dict(os.environ if base is None else base)
    search = env.get("LD_LIBRARY_PATH")
    env.update({
        "LD_LIBRARY_PATH": f"{libs}:{search}" if search else str(libs),
        "VCHAN_BACKEND": "sim",
        "VCHAN_DOMID": str(domid),
        "VCHAN_SIM_DIR": str(directory),
        "XENSTORED_PATH": str(xenstore),
    })
    return env


def hold_domain(domid: int, directory: Path | None = None) -> socket.socket:
    """A hypervisor connection that makes domain ``domid`` exist while it is open.

    An emulated domain exists while a process of it is connected, but a C
    program connects only now and then (libxenvchan opens XenStore and the
    devices when it sets up a ring, and a client retrying that makes its
    domain come and go).  ``vchan sim run`` opens this connection and lets
    the program inherit it, so that the domain exists from the program's
    start to its end -- as a Xen domain would.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(socket_path(directory)))
        # An event-channel handle without ports: it only counts as a user.
        _rpc(sock, VS_HELLO, struct.pack("<IIII", VS_VERSION, domid, _KIND_EVTCHN, os.getpid()))
    except OSError as exc:
        sock.close()
        raise CompatError(f"cannot reach the emulator to hold domain {domid}: {exc}") from None
    return sock
