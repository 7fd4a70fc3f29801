"""What both sides of a drop-in connection use: the index, the timeouts,
which way a connection went, handing a connection to its protocol, the
addresses a host answers on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("vchan.dropin")


#: Where drop-in servers list themselves (made by dom0, writable by all).
INDEX = "/local/vchan-dropin"
#: The key of ``get_extra_info`` that says which way a connection went.
VIA = "vchan_via"

#: How long a server waits for a first byte before it hands a connection to
#: its application as TCP (a drop-in client sends its HELLO as soon as it is
#: connected; see docs/dropin.md for the measurement).
GRACE = 0.05
#: How long a client waits for the server's answer to its HELLO.
ANSWER_TIMEOUT = 0.5
#: How long the whole upgrade may take before the client goes back to TCP.
UPGRADE_TIMEOUT = 3.0
#: How long a server keeps an offered token for its claim.
CLAIM_TIMEOUT = 5.0
#: How long a client believes what it read in XenStore (without a watch on
#: the index telling it of changes).
HINT_TTL = 1.0
#: How long the client side keeps its watch on the index after a lookup.
INDEX_WATCH_IDLE = 5.0
#: How long a client does not try to upgrade an address that failed to.
FAILURE_TTL = 30.0

_WILDCARDS = ("", "0.0.0.0", "::")


def via(transport: asyncio.BaseTransport | asyncio.StreamWriter) -> str:
    """``"vchan"`` or ``"tcp"``: which way a drop-in connection went.

    The same as ``transport.get_extra_info("vchan_via")`` where a transport
    can carry that key (vchan's, and asyncio's own TCP transports); uvloop's
    TCP transports cannot, and this works for them too.
    """
    if isinstance(transport, asyncio.StreamWriter):
        transport = transport.transport
    said = transport.get_extra_info(VIA)
    if said is not None:
        return str(said)
    return "vchan" if transport.get_extra_info("endpoint") is not None else "tcp"


def _mark_tcp(transport: asyncio.BaseTransport) -> None:
    extra = getattr(transport, "_extra", None)
    if isinstance(extra, dict):
        extra[VIA] = "tcp"


def _names(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """A TCP connection's addresses (taken while it is open)."""
    return {"peername": transport.get_extra_info("peername"),
            "sockname": transport.get_extra_info("sockname")}


def _mark_vchan(stream: asyncio.BaseTransport, names: dict[str, Any]) -> None:
    """An upgraded stream: the TCP connection's addresses, and which way it went."""
    extra = stream._extra  # type: ignore[attr-defined]
    extra["vchan_peer"] = extra.get("peername")
    extra.update(names)
    extra[VIA] = "vchan"


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to a protocol as its transport would."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view))).cast("B")
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


def _hand_over(transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol,
               data: bytes) -> None:
    """Make ``protocol`` the transport's, as if it had been from the start."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    _deliver(protocol, data)


# -- addresses ------------------------------------------------------------------------


def _normal(address: str) -> str:
    """An IP address in its canonical text form (other strings as they are)."""
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return address


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def interface_addresses() -> list[str]:
    """This domain's IP addresses (Linux: every interface's, IPv4 and IPv6,
    without link-local IPv6 ones, which need a scope to be reached)."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 40                       # struct ifreq on 64-bit Linux
        buf = array.array("B", bytes(size * 256))
        ifconf = struct.pack("iL", len(buf), buf.buffer_info()[0])
        got = fcntl.ioctl(s.fileno(), 0x8912, ifconf)       # SIOCGIFCONF
        n = struct.unpack("iL", got)[0]
        raw = buf.tobytes()[:n]
        for i in range(0, n, size):
            found.append(socket.inet_ntoa(raw[i + 20:i + 24]))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            address = ipaddress.IPv6Address(int(line.split()[0], 16))
            if not address.is_link_local:
                found.append(str(address))
    return list(dict.fromkeys(found))


def _advertised(hosts: Iterable[str | None], sockets: Iterable[socket.socket]) -> list[str]:
    """The addresses a server's TCP sockets serve."""
    out: list[str] = []
    for sock in sockets:
        address = _normal(sock.getsockname()[0])
        if address in _WILDCARDS:
            family = sock.family
            out += [a for a in interface_addresses()
                    if (":" in a) == (family == socket.AF_INET6)]
        else:
            out.append(address)
    for host in hosts:
        if host and not _is_ip(host):
            out.append(host)            # a name the server was given: clients use it too
    return list(dict.fromkeys(out))

def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

