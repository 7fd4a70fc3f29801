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

:func:`build` finds the libraries: a wheel carries them built (at wheel
build time, by ``setup.py``); otherwise they are compiled on first use from
the sources vchan carries (or from ``kernel/compat`` of a source checkout,
as ``make -C kernel/compat`` does) into a per-user cache.
:func:`run_environment` is the environment a program needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from ..addresses import DOMID_MAX, is_domid
from . import (
    SimError,
    _compat_build,
    _rpc,
    control,
    ensure_running,
    socket_path,
)
from .protocol import HELLO, KIND_EVTCHN, VS_HELLO, VS_VERSION

LIBRARIES = _compat_build.LIBRARIES

__all__ = [
    "LIBRARIES",
    "CompatError",
    "build",
    "build_dir",
    "hold_domain",
    "prebuilt_dir",
    "run_environment",
    "source_dir",
]


class CompatError(SimError):
    """The compat libraries cannot be built or used here."""


_PACKAGE = Path(__file__).resolve().parents[1]          # the installed vchan/
_CHECKOUT = _PACKAGE.parent / "kernel" / "compat"      # a source checkout's
_SHIPPED = _PACKAGE / "_kernel" / "compat"             # a wheel's (setup.py puts it there)


def source_dir() -> Path:
    """The libraries' sources: ``kernel/compat`` of the source checkout vchan
    runs from, else the copy an installed vchan carries (``vchan/_kernel``)."""
    for src in (_CHECKOUT, _SHIPPED):
        if (src / "gnttab.c").is_file():
            return src
    raise CompatError(f"the compat libraries' sources are missing from this vchan "
                      f"installation (looked in {_SHIPPED}): reinstall vchan")


def prebuilt_dir() -> Path | None:
    """The libraries a wheel was built with (``vchan/_kernel/compat/lib``), if any."""
    lib = _SHIPPED / "lib"
    return lib if all((lib / name).is_file() for name in LIBRARIES) else None


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vchan" / "compat"


def _digest(src: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(_inputs(src)):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """Where :func:`build` puts the libraries.

    In a source checkout, ``kernel/compat/build`` (as ``make`` does);
    otherwise, or when the tree is read-only, a per-user cache directory named
    after the sources' digest (``~/.cache/vchan/compat/DIGEST``), so an
    upgraded vchan never runs libraries of an older one.
    """
    src = source_dir()
    if src == _CHECKOUT:
        out = src / "build"
        with contextlib.suppress(OSError):
            out.mkdir(exist_ok=True)
        if os.access(out, os.W_OK):
            return out
    return _cache_root() / _digest(src)


def _inputs(src: Path) -> list[Path]:
    kernel = src.parent
    return [p for pattern in ("*.c", "*.h", "*.map") for p in src.glob(pattern)] + \
        [p for pattern in ("*.c", "*.h", "*.mk") for p in kernel.glob(pattern)]


def _fresh(out: Path, newest: float) -> bool:
    try:
        return min((out / name).stat().st_mtime for name in LIBRARIES) >= newest
    except FileNotFoundError:
        return False


def build(out: Path | None = None, *, force: bool = False) -> Path:
    """The directory of the compat libraries, built first if needed.

    A wheel carries them built (:func:`prebuilt_dir`): those are used as they
    are, unless ``out`` or ``force`` is given.  Otherwise they are compiled
    from :func:`source_dir` into ``out`` (default :func:`build_dir`) when
    missing or older than any source (the compat sources, the version
    scripts, the device layer in ``kernel/`` and its flags).  Concurrent callers wait
    for one another (a lock in the directory).
    """
    if out is None and not force:
        shipped = prebuilt_dir()
        if shipped is not None:
            return shipped
    src = source_dir()
    out = (out or build_dir()).resolve()
    newest = max(p.stat().st_mtime for p in _inputs(src))
    if not force and _fresh(out, newest):
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".build.lock", "w")  # noqa: SIM115 -- closed below
    except OSError as exc:
        raise CompatError(f"cannot build the compat libraries in {out}: "
                          f"{exc.strerror or exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _fresh(out, newest):
            return out
        try:
            _compat_build.compile_all(src, out)
        except _compat_build.BuildError as exc:
            raise CompatError(str(exc)) from None
    return out


def run_environment(domid: int, directory: Path | None = None,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that runs a libxenvchan program in emulated domain ``domid``.

    Starts the emulator (in ``directory``, default the usual state directory)
    and builds the libraries if needed.  Sets ``LD_LIBRARY_PATH`` (the compat
    libraries first), ``VCHAN_DOMID``, ``VCHAN_SIM_DIR``, ``VCHAN_BACKEND=sim``
    (so vchan's Python side agrees) and ``XENSTORED_PATH`` (the domain's
    XenStore socket, for libxenstore).
    """
    if not is_domid(domid):     # a ValueError for a non-int too, as it always was
        raise ValueError(f"domid must be a domain id in 0..{DOMID_MAX}, got {domid!r}")
    libs = build()             # before the emulator starts: a failure leaves nothing behind
    directory = ensure_running(directory)
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
        _rpc(sock, VS_HELLO, HELLO.pack(VS_VERSION, domid, KIND_EVTCHN, os.getpid()))
    except OSError as exc:
        sock.close()
        raise CompatError(f"cannot reach the emulator to hold domain {domid}: {exc}") from None
    return sock
