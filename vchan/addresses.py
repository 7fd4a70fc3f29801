"""Addresses: domain ids, ports, ring sizes and the XenStore paths they make.

A vchan address is ``(domid, port)``: the server's domain and a port that is
an int or a short name.  Every API, command and emulator part that takes one
checks it here, so that a bound is written once and a bad value gets the
same message wherever it is given.

* Domain ids are ``0..DOMID_MAX``: Xen reserves ``DOMID_FIRST_RESERVED``
  (0x7FF0, which is also ``DOMID_SELF``) and above.  The number comes from
  ``kernel/kernel.h`` through the cffi build, so C and Python agree.
* Ports are ints in ``0..PORT_MAX`` or names of 1-64 characters
  ``A-Z a-z 0-9 _ -``: either way a XenStore path component.
* Ring sizes are bytes in ``0..MAX_RING_SIZE`` (``vchan/ring.h``).
* A server in domain S meets clients of domain C at
  ``/local/domain/S/data/vchan/C/P`` (:func:`vchan_path`; Qubes and
  ocaml-vchan use the same); listener-mode requests go to
  ``/local/domain/C/data/vchan-req/S/P`` (:func:`request_dir`).
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from ._native import lib

__all__ = [
    "DOMID_FIRST_RESERVED",
    "DOMID_MAX",
    "MAX_RING_SIZE",
    "PORT_MAX",
    "Port",
    "check_domid",
    "check_port",
    "check_ring_size",
    "is_domid",
    "parse_domid",
    "parse_port",
    "parse_vchan_path",
    "request_dir",
    "vchan_path",
]

Port = int | str

#: Xen's DOMID_FIRST_RESERVED: the first id that names no domain.
DOMID_FIRST_RESERVED: int = lib.VK_DOMID_FIRST_RESERVED
#: The largest domain id (32751).
DOMID_MAX = DOMID_FIRST_RESERVED - 1

#: The largest integer port: libvchan's (Qubes) ports are C ints, and a
#: port is a XenStore path component, which must stay short.
PORT_MAX = (1 << 31) - 1
_PORT_NAME = "[A-Za-z0-9_-]{1,64}"
_PORT_NAME_RE = re.compile(rf"^{_PORT_NAME}$")

#: The largest ring a libxenvchan connection can have, each way (1 MiB).
MAX_RING_SIZE: int = lib.VCHAN_MAX_RING_SIZE


# -- domain ids ---------------------------------------------------------------------------


def is_domid(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an int that names a domain (not a bool, not reserved)."""
    return isinstance(value, int) and not isinstance(value, bool) and \
        0 <= value <= DOMID_MAX


def check_domid(domid: Any, what: str = "domid") -> int:
    """Validate a domain id; ``what`` names it in the error."""
    if not isinstance(domid, int) or isinstance(domid, bool):
        raise TypeError(f"{what} must be an int, not {type(domid).__name__}")
    if not is_domid(domid):
        raise ValueError(f"{what} must be a domain id in 0..{DOMID_MAX}, got {domid}")
    return domid


def parse_domid(text: str, what: str = "domid") -> int:
    """A domain id written in decimal (a command's argument, an environment variable).

    Raises :class:`ValueError` naming ``what``.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    return check_domid(value, what)


# -- ports --------------------------------------------------------------------------------


def _show_int(n: int) -> str:
    """``n``, or for a huge one its size (str() of a 5,000-digit int raises)."""
    if abs(n) < 10**20:
        return str(n)
    bits = abs(n).bit_length()
    digits = f"{len(str(abs(n)))}" if bits < 12000 else f"about {int(bits * 0.30103) + 1}"
    return f"(a {'negative ' if n < 0 else ''}number of {digits} digits)"


def check_port(port: Any) -> str:
    """Validate a vchan port (an int in 0..PORT_MAX or a short name); its path form.

    Every API and command that takes a port checks it here.
    """
    if isinstance(port, bool):
        raise TypeError("port must be an int or a str, not bool")
    if isinstance(port, int):
        if not 0 <= port <= PORT_MAX:
            raise ValueError(f"port {_show_int(port)} is out of range 0..{PORT_MAX}")
        return str(port)
    if isinstance(port, str):
        if not _PORT_NAME_RE.match(port):
            raise ValueError(f"port name {port!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
        return port
    raise TypeError(f"port must be an int or a str, not {type(port).__name__}")



def parse_port(text: str) -> Port:
    """A port as text gives it (a command line, a XenStore path): digits are a number.

    Not checked: pass the result to :func:`check_port`.
    """
    # ASCII digits only: int() would take "²" or "٣", which name no port.
    return int(text) if text.isascii() and text.isdigit() else text


# -- ring sizes ---------------------------------------------------------------------------


def check_ring_size(value: int, name: str) -> int:
    """Validate a requested ring size (bytes), naming the option on error."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (bytes), not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value}")
    if value > MAX_RING_SIZE:
        raise ValueError(f"{name}={value} is larger than the largest vchan ring "
                         f"({MAX_RING_SIZE} bytes = {MAX_RING_SIZE >> 20} MiB)")
    return value


# -- XenStore paths -----------------------------------------------------------------------


def vchan_path(server: int, client: int, port: str) -> str:
    """Where a server in ``server`` meets clients of domain ``client``."""
    return f"/local/domain/{server}/data/vchan/{client}/{port}"


def request_dir(client: int, server: int, port: str) -> str:
    """Where a client in ``client`` asks ``server`` for a listener connection."""
    return f"/local/domain/{client}/data/vchan-req/{server}/{port}"


_VCHAN_PATH = re.compile(rf"^/local/domain/(\d+)/data/vchan/(\d+)/({_PORT_NAME})$")


def parse_vchan_path(path: str) -> tuple[int, int, Port] | None:
    """``(server, client, port)`` of a :func:`vchan_path`, or None for another path.

    The domain ids are not range-checked (:func:`check_domid` does that).
    """
    m = _VCHAN_PATH.match(path)
    if m is None:
        return None
    return int(m[1]), int(m[2]), parse_port(m[3])
