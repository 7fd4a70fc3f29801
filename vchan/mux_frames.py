"""The session protocol's vocabulary: frame kinds, limits and tunables.

The wire format is ``vchan/mux.h`` (a 16-byte header: type, flags, stream
id, payload length, arg) and the rules are in :mod:`vchan.mux`'s theory of
operation; this module holds what both halves of a session use, the
:class:`~vchan.mux.Session` (the ring pair and its frames) and the
:class:`~vchan.mux_stream.StreamTransport` (one connection over it).
"""

from __future__ import annotations

import struct
import time
from typing import Any

from ._native import ffi, lib
from .errors import RemoteProtocolError
from .ring import strerror

HELLO, OPEN, DATA, WINDOW, EOF, CLOSE, RESET, GOAWAY, BLOCKED = range(1, 10)
_NAMES = {HELLO: "HELLO", OPEN: "OPEN", DATA: "DATA", WINDOW: "WINDOW", EOF: "EOF",
          CLOSE: "CLOSE", RESET: "RESET", GOAWAY: "GOAWAY", BLOCKED: "BLOCKED"}
RESET_REFUSED = 1
LOUD, QUIET, DEFERRED = 0, 1, 2     # how a control frame wakes the peer (_send_control)

VERSION = 1
HEADER: int = lib.VCHAN_MUX_HEADER
MAX_FRAME = 1 << 20             # payload bytes per DATA frame a peer may send (cut to the ring)
# DATA frames we write: 64 KiB.  A receiver makes a bytes object of each;
# 256 KiB ones (a quarter of the default ring) sit above glibc's mmap
# threshold and a StreamReader's pause point, and a StreamReader-paced bulk
# stream measured 1.5-2.4 GB/s with them against 3.5-4.0 with 64 KiB ones
# (1 MiB writes; Protocol and BufferedProtocol receivers no slower).
DATA_FRAME = 65536
MAX_CONTROL = 1024              # payload bytes of any other frame
DEFAULT_WINDOW = 4 << 20        # per stream, each way: four full rings of credit
MAX_STREAMS = 65536             # streams a session accepts at once, by default
READ_BUDGET = 1 << 20           # bytes read per look before yielding to the loop
QUANTUM = 1 << 20               # bytes a stream writes in its turn before the next one
MIN_CHUNK = 4096                # smallest piece of a larger write worth a frame
GATHER = 16384                  # DATA frames smaller than this are read in runs...
GATHER_MAX = 65536              # ...of up to this many bytes, one data_received()
HOLD_PIECE = 65536              # bytes held for a stream are kept in pieces this large
CORK_MAX = 16384                # writes smaller than this may wait to be merged...
CORK_FLUSH = 65536              # ...until this many bytes wait, or the iteration ends
CORK_GAP = 10e-6                # small writes this close together are a burst: merged
ADAPTIVE_POLL = 50e-6           # the default's first poll window after a write (seconds)...
ADAPTIVE_POLL_MAX = 200e-6      # ...doubled up to this while answers come within it...
POLL_BACKOFF_MAX = 64           # ...skipped for up to this many writes after a miss
# Microsecond intervals (CORK_GAP, busy-poll windows) need a clock that has
# them: uvloop's loop.time() counts whole milliseconds, so with it every small
# write within a millisecond of the last was taken for part of a burst (corked
# for an iteration, a ping-pong's answer included).
_clock = time.monotonic
_LATER = lib.VCHAN_SESSION_LATER   # vchan_session_send: not now (a burst's write waits)
_MAX_CREDIT = (1 << 31) - 1
_HELLO_BODY = struct.Struct("<II")
_FULL: int = lib.VCHAN_MUX_FULL
_EFRAME: int = lib.VCHAN_MUX_EFRAME
_REMOTE_CODES = {lib.VCHAN_EINDEX, lib.VCHAN_EORDER, lib.VCHAN_ELIVE}


def _ring_error(code: int, what: str) -> Exception:
    if code == _EFRAME:
        return RemoteProtocolError(f"vchan session peer broke the protocol ({what}): "
                                   "a frame longer than allowed or with reserved bits set")
    if code in _REMOTE_CODES:
        return RemoteProtocolError(f"vchan peer broke the protocol ({what}): "
                                   f"{strerror(code)}", code)
    return RuntimeError(f"{what}: {strerror(code)}")


def _protocol_error(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"vchan session peer broke the protocol: {why}")


def _unpack(a: Any, alen: int, b: Any, blen: int, skip: int) -> bytes:
    """A payload's bytes from its two pieces of the ring, after the first ``skip``."""
    if skip < alen:
        if not blen:
            return ffi.unpack(ffi.cast("char *", a) + skip, alen - skip)  # type: ignore[no-any-return]
        # Wrapped: one copy of each piece into the result.
        return b"".join((ffi.buffer(ffi.cast("char *", a) + skip, alen - skip),
                         ffi.buffer(b, blen)))
    return ffi.unpack(ffi.cast("char *", b) + (skip - alen), blen - (skip - alen))  # type: ignore[no-any-return]
