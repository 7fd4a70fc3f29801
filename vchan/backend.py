"""Choosing the device backend: real Xen or the emulated hypervisor.

The choice is made once per process, here and nowhere else:

* ``VCHAN_BACKEND=xen`` -- the Linux devices ``/dev/xen/{gntalloc,gntdev,evtchn}``;
* ``VCHAN_BACKEND=sim`` -- the emulator (:mod:`vchan.sim`), started on first use;
* unset -- ``xen`` when ``/dev/xen/gntalloc`` exists, else ``sim``.

Under ``sim`` the process's domain is ``VCHAN_DOMID`` (default 0).  Where
XenStore is follows from the same choice (:func:`xenstore_path`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._native import lib
from .addresses import DOMID_MAX, parse_domid

__all__ = ["BACKENDS", "Backend", "BackendError", "check_environment", "get_backend",
           "select_backend", "xenstore_path"]

BACKENDS = ("xen", "sim")
XEN_DEVICE = "/dev/xen/gntalloc"
XENSTORED_SOCKET = "/var/run/xenstored/socket"     # dom0's xenstored
XENBUS_DEVICE = "/dev/xen/xenbus"                  # a guest's way to it
# sockaddr_un.sun_path holds 108 bytes with the NUL; the longest socket name
# the emulator makes in its directory is that of the last domain's XenStore.
_SUN_PATH = 107
_LONGEST_SOCKET = f"xenstored-{DOMID_MAX}.sock"

log = logging.getLogger("vchan.backend")


class BackendError(RuntimeError):
    """The requested backend cannot be used here."""


@dataclass(frozen=True)
class Backend:
    """A selected, ready-to-use backend."""

    name: str
    ops: Any                    # const struct vk_ops *
    domid: int | None           # our domain under sim; None on Xen (ask XenStore)
    sim_dir: Path | None = None

    def __repr__(self) -> str:
        where = f" domid={self.domid} dir={self.sim_dir}" if self.name == "sim" else ""
        return f"<Backend {self.name}{where}>"


def default_backend_name() -> str:
    """The backend the environment asks for, or the autodetected one."""
    name = os.environ.get("VCHAN_BACKEND", "").strip().lower()
    if name:
        return name
    return "xen" if os.path.exists(XEN_DEVICE) else "sim"


def _sim_domid() -> int:
    try:
        return parse_domid(os.environ.get("VCHAN_DOMID", "0"), "VCHAN_DOMID")
    except ValueError as exc:
        raise BackendError(str(exc)) from None


def _check_sim_dir() -> None:
    """``VCHAN_SIM_DIR`` (when set) names a directory the emulator can use."""
    raw = os.environ.get("VCHAN_SIM_DIR")
    if not raw:
        return
    path = Path(raw)
    longest = len(os.fsencode(path / _LONGEST_SOCKET))
    if longest > _SUN_PATH:
        raise BackendError(f"VCHAN_SIM_DIR={raw} is too long: the emulator's sockets there "
                           f"would need {longest} bytes, and a Unix socket path holds "
                           f"{_SUN_PATH} (use a shorter directory)")
    if path.exists():
        if not path.is_dir():
            raise BackendError(f"VCHAN_SIM_DIR={raw} is not a directory")
        if not os.access(path, os.X_OK):
            raise BackendError(f"VCHAN_SIM_DIR={raw}: no permission to use this directory")
        # Another user's emulator (a bound-domains policy, `vchan sim start
        # --bind-domains`) is used through its sockets: only starting one
        # needs to write here.
        if not os.access(path, os.W_OK) and not (path / "hypervisor.sock").exists():
            raise BackendError(f"VCHAN_SIM_DIR={raw}: no emulator runs there, and this user "
                               f"may not start one (the directory is not writable)")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BackendError(f"VCHAN_SIM_DIR={raw} does not exist and cannot be made "
                           f"({parent} is not a directory this user may write)")


def _check_sim_timeout() -> None:
    raw = os.environ.get("VCHAN_SIM_TIMEOUT")
    if raw is None:
        return
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise BackendError(f"VCHAN_SIM_TIMEOUT must be a number of seconds in (0, 86400), "
                           f"got {raw!r}")


def check_environment(name: str | None = None, *, domid: bool = True) -> str:
    """Check the ``VCHAN_*`` variables, starting nothing; the backend they choose.

    Raises :class:`BackendError`, naming the variable, for an unknown
    ``VCHAN_BACKEND``, ``xen`` without ``/dev/xen/gntalloc``, and under
    ``sim`` a ``VCHAN_DOMID`` that is not a domain id (unless ``domid`` is
    false: the caller sets the domain itself), a ``VCHAN_SIM_DIR`` that
    cannot be used, or a ``VCHAN_SIM_TIMEOUT`` that is not a duration.
    ``name`` checks for that backend instead of the chosen one.
    """
    name = name or default_backend_name()
    if name not in BACKENDS:
        raise BackendError(f"unknown vchan backend {name!r} (VCHAN_BACKEND must be one of "
                           f"{', '.join(BACKENDS)})")
    if name == "xen":
        if not os.path.exists(XEN_DEVICE):
            raise BackendError(f"backend 'xen' needs {XEN_DEVICE}: this is not a Xen domain "
                               "with the gntalloc driver loaded (use VCHAN_BACKEND=sim for "
                               "the emulator)")
        return name
    if domid:
        _sim_domid()
    _check_sim_dir()
    _check_sim_timeout()
    return name


def _why(name: str) -> str:
    if os.environ.get("VCHAN_BACKEND", "").strip():
        return f"VCHAN_BACKEND={name}"
    return f"{XEN_DEVICE} {'exists' if name == 'xen' else 'is missing'}"


def select_backend(name: str | None = None) -> Backend:
    """Make the named backend (or the default one) ready and return it."""
    if name is None or name == default_backend_name():
        name = check_environment()
    elif name not in BACKENDS:
        raise BackendError(f"unknown vchan backend {name!r} (one of {', '.join(BACKENDS)})")
    ops = lib.vk_backend(name.encode())
    if name == "xen":
        if not os.path.exists(XEN_DEVICE):
            raise BackendError(f"backend 'xen' needs {XEN_DEVICE}: this is not a Xen domain "
                               "with the gntalloc driver loaded (use VCHAN_BACKEND=sim for "
                               "the emulator)")
        log.info("backend: xen, the devices of this Xen domain (%s)", _why(name))
        return Backend("xen", ops, None)
    from . import sim

    domid = _sim_domid()
    try:
        directory = sim.ensure_running()
    except sim.EmulatorError:
        raise                   # one is there, dead or stopped: it says so itself
    except sim.SimError as exc:
        raise BackendError(f"backend 'sim': {exc}") from exc
    except OSError as exc:
        raise BackendError(f"backend 'sim': cannot start the emulator: {exc}") from exc
    path = str(sim.socket_path(directory)).encode()
    if lib.vk_sim_set_socket(path) < 0:
        raise BackendError(f"backend 'sim': socket path too long: {path!r}")
    log.info("backend: sim, the emulated hypervisor in %s, as domain %d (%s)", directory,
             domid, _why(name))
    return Backend("sim", ops, domid, directory)


def xenstore_path() -> str:
    """Where XenStore is for this process.

    ``$XENSTORED_PATH`` (as libxenstore); else, under the emulator, the
    socket of this process's domain ``$VCHAN_DOMID`` (the emulator is
    started if needed: this blocks); else ``/var/run/xenstored/socket``
    when it exists (dom0); else ``/dev/xen/xenbus`` (a guest).
    """
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    if default_backend_name() == "sim":
        from . import sim

        try:
            return sim.xenstore_socket(_sim_domid())
        except sim.EmulatorError:
            raise                   # there but stopped or silent: it says so itself
        except (BackendError, sim.SimError) as exc:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"xenstore: the emulator cannot be reached: {exc}") from exc
    if os.path.exists(XENSTORED_SOCKET):
        return XENSTORED_SOCKET
    return XENBUS_DEVICE


_lock = threading.Lock()
_current: Backend | None = None


def get_backend() -> Backend:
    """The process's backend, selected on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = select_backend()
        return _current


def _reset_for_tests() -> None:
    global _current
    with _lock:
        _current = None


