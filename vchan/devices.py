"""Grants, mappings and event channels: Python objects over ``kernel/``.

These are the three Xen devices vchan needs, on whichever backend
:mod:`vchan.backend` selected (the real ``/dev/xen`` devices or the
emulator):

* :class:`GrantSharer` (gntalloc) shares fresh pages of ours with one peer
  domain and returns :class:`Pages` with their grant references;
* :class:`GrantMapper` (gntdev) maps a peer's grants into our memory;
* :class:`EventChannel` (evtchn) binds, signals and waits for event
  channels through one pollable file descriptor.

Every object has ``close()``, works as a context manager and warns with
:class:`ResourceWarning` when garbage-collected while still open.  Failures
are :class:`OSError` subclasses (chosen by errno) whose message names the
operation, e.g. ``PermissionError: [Errno 1] map grant 8 of domain 1: ...``.

On the emulator, a handle whose daemon died, was stopped or stopped
answering raises :class:`vchan.sim.EmulatorError` from then on (its
``failed`` says so without a request); a new handle then reaches a new
daemon, started if the old one is gone.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Sequence
from typing import Any, Self

from ._native import ffi, lib
from .backend import Backend, get_backend

__all__ = ["EventChannel", "GrantMapper", "GrantSharer", "Pages"]

PAGE_SIZE: int = lib.VK_PAGE_SIZE
_KIND_NAMES = {lib.VK_GNTSHR: "gntalloc", lib.VK_GNTTAB: "gntdev", lib.VK_EVTCHN: "evtchn"}
# What kernel/sim.c reports when the emulator connection itself failed.
_EMULATOR_ERRNOS = frozenset((errno.ECONNRESET, errno.EHOSTDOWN, errno.ETIMEDOUT,
                              errno.EBADMSG))


def _error(err: int, what: str) -> OSError:
    """An OSError of the right subclass whose message names the operation."""
    return OSError(err, f"{what}: {os.strerror(err)}")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise _error(-rc, what)
    return rc


def _opt(value: int | None) -> int:
    return -1 if value is None else value


class _Handle:
    """An open device handle."""

    _kind: int = 0

    def __init__(self, backend: Backend | None = None) -> None:
        self._dev: Any = None
        self.backend = backend or get_backend()
        dev = ffi.new("struct vk_dev *")
        what = f"open {_KIND_NAMES[self._kind]} ({self.backend.name} backend)"
        rc = lib.vk_open(dev, self.backend.ops, self._kind, self.backend.domid or 0)
        if rc in (-errno.ECONNREFUSED, -errno.ENOENT) and self.backend.name == "sim":
            # The daemon is gone (its socket left behind, or removed): as on
            # first use, start one, and try once more.
            from . import sim

            sim.ensure_running(self.backend.sim_dir)
            rc = lib.vk_open(dev, self.backend.ops, self._kind, self.backend.domid or 0)
        if rc == -errno.EACCES and self.backend.name == "sim":
            raise PermissionError(errno.EACCES, f"{what}: {_sim_refusal(self.backend)}")
        if rc < 0 and -rc in _EMULATOR_ERRNOS and self.backend.name == "sim":
            raise self._emulator_error(-rc, dev, what)
        _check(rc, what)
        self._dev = dev

    @property
    def closed(self) -> bool:
        return self._dev is None or self._dev.fd < 0

    @property
    def failed(self) -> OSError | None:
        """The emulator's failure (its daemon died, was stopped, stopped
        answering), once a request or :meth:`check` met it; else None."""
        if self._dev is None or not self._dev.failed:
            return None
        return self._emulator_error(-self._dev.failed, self._dev)

    def check(self) -> OSError | None:
        """Look at the emulator's daemon now, without a request: its
        failure, which the handle keeps from then on, or None (always None
        on Xen)."""
        if self.closed or self.backend.name != "sim":
            return None
        rc = lib.vk_sim_check(self._dev)
        return self._emulator_error(-rc, self._dev) if rc < 0 else None

    def _emulator_error(self, err: int, dev: Any, what: str = "") -> OSError:
        from .sim import emulator_error

        exc = emulator_error(err, int(dev.server) or None, self.backend.sim_dir)
        if what:
            exc.strerror = f"{what}: {exc.strerror}"
            exc.args = (exc.errno, exc.strerror)
        return exc

    def _checked(self, rc: int, what: str) -> int:
        """``rc``, or the error it stands for (the emulator's failure as such)."""
        if rc < 0 and self._dev is not None and self._dev.failed == rc:
            raise self._emulator_error(-rc, self._dev, what)
        return _check(rc, what)

    def _live(self, what: str) -> Any:
        if self.closed:
            raise ValueError(f"{what}: the {_KIND_NAMES[self._kind]} handle is closed")
        return self._dev

    def close(self) -> None:
        """Close the handle (mappings made through it stay valid)."""
        if self._dev is not None and self._dev.fd >= 0:
            lib.vk_close(self._dev)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._dev is not None and self._dev.fd >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._dev.fd}"
        return f"<{type(self).__name__} {self.backend.name} {state}>"


class Pages:
    """Pages shared with a peer or mapped from one.

    ``refs`` are the grant references of shared pages (empty for mapped
    ones).  ``address`` is where they are mapped; :meth:`view` maps them
    once more.  :meth:`close` unmaps every view; the pages themselves go
    when their last user (in any process) does, which is when an unmap
    notification set up with them fires.
    """

    def __init__(self, handle: _Handle, m: Any, refs: Sequence[int], peer: int) -> None:
        self._handle = handle       # keeps the vk_dev structure alive
        self._m = m
        self.refs = tuple(refs)
        self.peer = peer
        self.count = int(m.count)
        self.size = self.count * PAGE_SIZE
        self.shared = bool(m.shared)
        # Our own shared pages are always writable by us; the flag given to
        # share() is what the peer may do.
        self.writable = self.shared or bool(m.writable)
        self.peer_writable = bool(m.writable)

    @property
    def closed(self) -> bool:
        return self._m is None or self._m.nviews == 0

    def _live(self, what: str) -> Any:
        if self.closed:
            raise ValueError(f"{what}: the pages are unmapped")
        return self._m

    @property
    def address(self) -> int:
        """Address of the first view."""
        return int(ffi.cast("uintptr_t", self._live("address").views[0]))

    @property
    def pointer(self) -> Any:
        """The first view as a ``uint8_t *`` (valid until close())."""
        return ffi.cast("uint8_t *", self._live("pointer").views[0])

    def buffer(self, view: int = 0) -> Any:
        """A buffer over one view.  Do not use it after close()."""
        m = self._live("buffer")
        if not 0 <= view < m.nviews:
            raise IndexError(f"no view {view} (there are {m.nviews})")
        return ffi.buffer(m.views[view], self.size)

    def read(self, offset: int, n: int, view: int = 0) -> bytes:
        """Copy ``n`` bytes at ``offset`` out of the pages."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset} outside {self.size} bytes")
        return bytes(self.buffer(view)[offset:offset + n])

    def write(self, offset: int, data: bytes, view: int = 0) -> None:
        """Copy ``data`` into the pages at ``offset``."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside {self.size} bytes")
        if not self.writable:
            raise PermissionError(errno.EACCES, "write: the pages are mapped read-only")
        self.buffer(view)[offset:offset + len(data)] = data

    def view(self) -> int:
        """Map the same pages once more; returns the new view's index."""
        m = self._live("view")
        addr = ffi.new("void **")
        _check(lib.vk_map_view(m, addr), "map another view")
        return int(m.nviews) - 1

    def close(self) -> None:
        """Unmap every view of the pages."""
        if self._m is not None and self._m.nviews:
            lib.vk_unmap(self._m)

    def __enter__(self) -> Pages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._m is not None and self._m.nviews:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        kind = "shared with" if self.shared else "mapped from"
        mode = "rw" if self.writable else "ro"
        state = "closed" if self.closed else f"{self._m.nviews} view(s)"
        return f"<Pages {self.count} {mode} {kind} domain {self.peer} {state}>"


class GrantSharer(_Handle):
    """The gntalloc device: share our pages with another domain."""

    _kind = lib.VK_GNTSHR

    def share(self, domid: int, count: int = 1, *, writable: bool = True,
              notify_offset: int | None = None, notify_port: int | None = None) -> Pages:
        """Share ``count`` fresh zeroed pages with domain ``domid``.

        ``notify_offset`` (a byte offset in the pages) is cleared and
        ``notify_port`` (a local event-channel port) signalled when the last
        user of the pages goes away -- crash included.
        """
        what = f"share {count} page(s) with domain {domid}"
        dev = self._live(what)
        _check_count(count, what)
        refs = ffi.new("uint32_t[]", count)
        m = ffi.new("struct vk_map *")
        rc = lib.vk_share(dev, domid, count, 1 if writable else 0, refs, _opt(notify_offset),
                          _opt(notify_port), m)
        if rc == -errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"{what}: the domain's grant limit is reached "
                          f"({_limit_hint(self.backend)})")
        self._checked(rc, what)
        return Pages(self, m, list(refs), domid)


class GrantMapper(_Handle):
    """The gntdev device: map grants of other domains."""

    _kind = lib.VK_GNTTAB

    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True,
            notify_offset: int | None = None, notify_port: int | None = None) -> Pages:
        """Map grants ``refs`` of domain ``domid`` as consecutive pages."""
        return self.map_grants([(domid, ref) for ref in refs], writable=writable,
                               notify_offset=notify_offset, notify_port=notify_port)

    def map_grants(self, grants: Sequence[tuple[int, int]], *, writable: bool = True,
                   notify_offset: int | None = None, notify_port: int | None = None) -> Pages:
        """Map ``(domid, ref)`` pairs as consecutive pages."""
        domids = {d for d, _ in grants}
        owner = domids.pop() if len(domids) == 1 else -1
        refs = ", ".join(str(r) for _, r in grants[:4]) + (", ..." if len(grants) > 4 else "")
        what = f"map grant(s) {refs} of domain {owner}" if owner >= 0 else "map grants"
        dev = self._live(what)
        _check_count(len(grants), what)
        m = ffi.new("struct vk_map *")
        rc = lib.vk_map(dev, len(grants), [d for d, _ in grants], [r for _, r in grants],
                        1 if writable else 0, _opt(notify_offset), _opt(notify_port), m)
        notify_ok = notify_offset is None or (writable and
                                              0 <= notify_offset < len(grants) * PAGE_SIZE)
        if rc == -errno.EINVAL and self.backend.name == "xen" and notify_ok:
            # Xen says the same of every grant it will not map.
            raise OSError(errno.EINVAL, f"{what}: refused by Xen (no such grant, or it "
                          "has ended, or it was not granted to this domain)")
        self._checked(rc, what)
        return Pages(self, m, (), owner)

    def set_max_grants(self, count: int) -> None:
        """libxengnttab's set_max_grants (a no-op on current kernels)."""
        _check(lib.vk_set_max_grants(self._live("set_max_grants"), count), "set_max_grants")


class EventChannel(_Handle):
    """The evtchn device: event channels behind one pollable descriptor.

    A port fires once, then stays quiet until :meth:`unmask`; events that
    arrive meanwhile coalesce into one delivered after the unmask.
    """

    _kind = lib.VK_EVTCHN

    def bind_unbound(self, remote_domid: int) -> int:
        """Allocate a port that domain ``remote_domid`` may bind to."""
        what = f"bind an unbound port for domain {remote_domid}"
        return self._checked(lib.vk_bind_unbound(self._live(what), remote_domid), what)

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect a new local port to ``remote_port`` of ``remote_domid``."""
        what = f"bind to port {remote_port} of domain {remote_domid}"
        return self._checked(lib.vk_bind_interdomain(self._live(what), remote_domid,
                                                     remote_port), what)

    def unbind(self, port: int) -> None:
        what = f"unbind port {port}"
        self._checked(lib.vk_unbind(self._live(what), port), what)

    def notify(self, port: int) -> None:
        """Signal the remote end of ``port``."""
        # (on every message: the error text is made only for an error)
        dev = self._dev
        if dev is None or dev.fd < 0:
            self._live(f"notify port {port}")      # raises
        rc = lib.vk_notify(dev, port)
        if rc < 0:
            _check(rc, f"notify port {port}")

    def pending(self) -> int | None:
        """A port that fired (now masked until unmask), or None."""
        rc = lib.vk_pending(self._live("pending"))
        if rc == -errno.EAGAIN:
            return None
        return _check(rc, "pending")

    def unmask(self, port: int) -> None:
        """Let ``port`` fire again."""
        what = f"unmask port {port}"
        _check(lib.vk_unmask(self._live(what), port), what)

    def take_events(self, ports: Any) -> int:
        """Fired ports into ``ports`` (a ``uint32_t[]``), unmasked again; the count."""
        return _check(lib.vk_take_events(self._live("take_events"), ports, len(ports)),
                      "take events")

    def fileno(self) -> int:
        """The descriptor to poll: readable while a port is pending."""
        return _check(lib.vk_fd(self._live("fileno")), "fileno")

    def port_fd(self, port: int) -> int | None:
        """A descriptor of the caller's own for ``port``, or None where the
        backend has none (Xen: every port is behind :meth:`fileno`).

        It is readable (level-triggered) while the port has fired;
        :func:`consume` takes the events, and what fires later makes it
        readable again.  The port leaves :meth:`fileno` (``pending`` and
        ``take_events`` no longer see it) until :meth:`port_unwatch`.  The
        caller closes the descriptor; it stays valid after ``unbind``.
        """
        what = f"watch port {port}"
        rc = lib.vk_port_fd(self._live(what), port)
        if rc == -errno.EOPNOTSUPP:
            return None
        return _check(rc, what)

    def port_unwatch(self, port: int) -> None:
        """Put ``port`` back behind :meth:`fileno` (after :meth:`port_fd`);
        an event that came meanwhile and was not consumed fires there."""
        what = f"unwatch port {port}"
        _check(lib.vk_port_unwatch(self._live(what), port), what)


def consume(fd: int) -> None:
    """Take the events that made a :meth:`EventChannel.port_fd` readable."""
    _check(lib.vk_fd_consume(fd), "consume events")


def _sim_refusal(backend: Backend) -> str:
    """Why the emulator will not let this process be its domain (its policy says)."""
    from . import sim

    domid = backend.domid or 0
    try:
        answer = sim.control({"cmd": "may-claim", "domid": domid}, backend.sim_dir)
    except (OSError, sim.SimError):
        answer = {}
    return str(answer.get("why") or f"the emulator refused this process domain {domid}")


def _check_count(count: int, what: str) -> None:
    if not isinstance(count, int) or count <= 0:
        raise ValueError(f"{what}: the page count must be a positive int, got {count!r}")


def _limit_hint(backend: Backend) -> str:
    if backend.name == "sim":
        return "raise it with `vchan sim set grant-limit N`"
    return "raise it by writing to /sys/module/xen_gntalloc/parameters/limit"
