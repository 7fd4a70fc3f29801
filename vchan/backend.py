"""Choosing the device backend: real Xen or the emulated hypervisor.

The choice is made once per process, here and nowhere else:

* ``VCHAN_BACKEND=xen`` -- the Linux devices ``/dev/xen/{gntalloc,gntdev,evtchn}``;
* ``VCHAN_BACKEND=sim`` -- the emulator (:mod:`vchan.sim`), started on first use;
* unset -- ``xen`` when ``/dev/xen/gntalloc`` exists, else ``sim``.

Under ``sim`` the process's domain is ``VCHAN_DOMID`` (default 0).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._native import lib

__all__ = ["BACKENDS", "Backend", "BackendError", "get_backend", "select_backend"]

BACKENDS = ("xen", "sim")
XEN_DEVICE = "/dev/xen/gntalloc"


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
    raw = os.environ.get("VCHAN_DOMID", "0")
    try:
        domid = int(raw)
    except ValueError:
        raise BackendError(f"VCHAN_DOMID must be a domain number, got {raw!r}") from None
    if not 0 <= domid < 0x7FF0:
        raise BackendError(f"VCHAN_DOMID must be in 0..32751, got {domid}")
    return domid


def select_backend(name: str | None = None) -> Backend:
    """Make the named backend (or the default one) ready and return it."""
    name = name or default_backend_name()
    if name not in BACKENDS:
        raise BackendError(f"unknown vchan backend {name!r} (VCHAN_BACKEND must be one of "
                           f"{', '.join(BACKENDS)})")
    ops = lib.vk_backend(name.encode())
    if name == "xen":
        if not os.path.exists(XEN_DEVICE):
            raise BackendError(f"backend 'xen' needs {XEN_DEVICE}: this is not a Xen domain "
                               "with the gntalloc driver loaded (use VCHAN_BACKEND=sim for "
                               "the emulator)")
        return Backend("xen", ops, None)
    from . import sim

    domid = _sim_domid()
    try:
        directory = sim.ensure_running()
    except sim.EmulatorError:
        raise                   # one is there, dead or stopped: it says so itself
    except (OSError, sim.SimError) as exc:
        raise BackendError(f"backend 'sim': cannot start the emulator: {exc}") from exc
    path = str(sim.socket_path(directory)).encode()
    if lib.vk_sim_set_socket(path) < 0:
        raise BackendError(f"backend 'sim': socket path too long: {path!r}")
    return Backend("sim", ops, domid, directory)


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


