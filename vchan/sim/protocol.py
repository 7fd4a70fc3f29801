"""The emulated hypervisor's wire protocol: its numbers and message layouts.

``kernel/sim_proto.h`` is the one place the numbers are written; the client
side in C (``kernel/sim.c``) compiles against it, and the cffi build
declares them (``vchan/_cdefs.h``), so the values below are the C
compiler's reading of that header.  cffi also checks the header's structs
against those declarations when the extension is built, and
``tests/test_emulator_protocol.py`` checks the :mod:`struct` layouts here
against the structs.  Used by the daemon (:mod:`vchan.sim.hypervisor`) and
by vchan's own Python clients of it (:mod:`vchan.sim`, its ``watch`` and
``compat``).  The protocol itself: ``docs/sim-protocol.md``.
"""

from __future__ import annotations

import struct

from .._native import lib

__all__ = [
    "HELLO",
    "KIND_CONTROL",
    "KIND_EVTCHN",
    "KIND_GNTSHR",
    "KIND_GNTTAB",
    "REPLY",
    "REQUEST",
    "SEGMENT",
    "VS_CONTROL",
    "VS_EVT_BIND_INTERDOMAIN",
    "VS_EVT_BIND_UNBOUND",
    "VS_EVT_UNBIND",
    "VS_GNT_MAP",
    "VS_GNT_RELEASE",
    "VS_GNT_SHARE",
    "VS_HELLO",
    "VS_MAX_FDS",
    "VS_MAX_MSG",
    "VS_VERSION",
]

VS_VERSION: int = lib.VS_VERSION
VS_MAX_MSG: int = lib.VS_MAX_MSG        # bytes of one message, either way
VS_MAX_FDS: int = lib.VS_MAX_FDS        # descriptors attached to one message

# enum vs_op: what a request asks.
VS_HELLO: int = lib.VS_HELLO
VS_GNT_SHARE: int = lib.VS_GNT_SHARE
VS_GNT_MAP: int = lib.VS_GNT_MAP
VS_GNT_RELEASE: int = lib.VS_GNT_RELEASE
VS_EVT_BIND_UNBOUND: int = lib.VS_EVT_BIND_UNBOUND
VS_EVT_BIND_INTERDOMAIN: int = lib.VS_EVT_BIND_INTERDOMAIN
VS_EVT_UNBIND: int = lib.VS_EVT_UNBIND
VS_CONTROL: int = lib.VS_CONTROL

# The kind a HELLO gives its connection: a device (enum vk_kind of
# kernel/kernel.h) or a control connection, which makes no domain exist.
KIND_CONTROL: int = lib.VS_KIND_CONTROL
KIND_GNTSHR: int = lib.VK_GNTSHR
KIND_GNTTAB: int = lib.VK_GNTTAB
KIND_EVTCHN: int = lib.VK_EVTCHN

REQUEST = struct.Struct("<II")          # struct vs_request: op, len (of what follows)
REPLY = struct.Struct("<iI")            # struct vs_reply: status (0 or -errno), len
SEGMENT = struct.Struct("<IIIIQ")       # struct vs_segment: first, npages, fd, pad, offset
HELLO = struct.Struct("<IIII")          # VS_HELLO's request: version, domid, kind, pid
