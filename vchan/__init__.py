"""vchan: Xen inter-domain shared-memory channels for Python and asyncio.

vchan speaks the libxenvchan wire format byte for byte, over pages shared
with the Linux ``gntalloc`` / ``gntdev`` devices and event channels, or over
an emulated hypervisor where there is no Xen.
"""

from __future__ import annotations

from .errors import LocalProtocolError, RemoteProtocolError, VchanError

__all__ = ["LocalProtocolError", "RemoteProtocolError", "VchanError", "__version__"]

__version__ = "0.1.0"
