"""vchan: Xen inter-domain shared-memory channels for Python and asyncio.

vchan speaks the libxenvchan wire format byte for byte, over pages shared
with the Linux ``gntalloc`` / ``gntdev`` devices and event channels, or over
an emulated hypervisor where there is no Xen.  Existing asyncio code moves
from TCP to vchan by changing one call::

    reader, writer = await vchan.open_connection(domid, port)
    server = await vchan.start_server(handle_client, port, peers=domid)

or by address, vchan to domains of the same host and TCP to the rest
(:mod:`vchan.dropin`; unmodified programs: :mod:`vchan.dropin_loop`, ``vchan run``)::

    reader, writer = await vchan.open_connection("10.0.0.2", 8080)
    server = await vchan.start_server(handle_client, "10.0.0.2", 8080)
"""

from __future__ import annotations

from . import dropin, dropin_loop
from .blocking import Vchan, own_domid
from .client import create_connection
from .errors import (
    HalfCloseUnsupportedError,
    LocalProtocolError,
    NoSuchDomainError,
    RemoteProtocolError,
    VchanError,
)
from .server import Server, create_server
from .streams import StreamReader, StreamWriter, open_connection, start_server
from .transport import VchanTransport

__all__ = [
    "HalfCloseUnsupportedError",
    "LocalProtocolError",
    "NoSuchDomainError",
    "RemoteProtocolError",
    "Server",
    "StreamReader",
    "StreamWriter",
    "Vchan",
    "VchanError",
    "VchanTransport",
    "__version__",
    "create_connection",
    "create_server",
    "dropin",
    "dropin_loop",
    "open_connection",
    "own_domid",
    "start_server",
]

__version__ = "0.1.0"
