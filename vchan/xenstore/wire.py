"""XenStore's wire protocol, both directions, without I/O.

RULES (``xen/include/public/io/xs_wire.h``, ``docs/misc/xenstore.txt``)
=====================================================================

1. Every message either way is a 16-byte header ``{u32 type, req_id, tx_id,
   len}`` in native byte order (little-endian wherever Xen runs vchan)
   followed by ``len`` bytes of payload; ``len`` is at most
   :data:`PAYLOAD_MAX` (4096) in both directions.  A peer that announces
   more has broken the protocol: :class:`Framer` raises
   :class:`ProtocolError` and the connection ends (xenstored kills such a
   client; a client drops such a daemon).
2. A request's arguments are strings, each NUL-terminated; WRITE's value is
   the raw bytes after the path's NUL, unterminated.  xenstored reads the
   strings up to the last NUL and ignores what follows it.
3. A reply echoes the request's ``type``, ``req_id`` and ``tx_id``.  Its
   payload is ``"OK\\0"`` for an operation that only succeeds, the raw
   value for READ, NUL-terminated strings for lists, one NUL-terminated
   string for a single answer -- or the reply has type ``ERROR`` and the
   NUL-terminated *name* of an errno (:data:`XSD_ERRORS`).
4. XenStore sends ``WATCH_EVENT`` messages unasked (``path\\0token\\0``,
   ``req_id`` 0) whenever a watched node changes -- once at once when the
   watch is set.  An event too long for one message is not sent.
5. A directory whose list of children does not fit in one reply answers
   DIRECTORY with E2BIG; it is then read in parts with DIRECTORY_PART
   (``path\\0offset\\0``), each answered ``generation\\0`` and the next
   names, with one more NUL after the last name of the list.  A different
   generation means the node changed meanwhile: start again.

Strings: the clients encode text as UTF-8 (undecodable bytes kept as
surrogates); xenstored handles them as Latin-1, i.e. as bytes, so whatever
a client sends comes back to it byte for byte.

This module only turns values into bytes and bytes into values.  The
clients (:mod:`vchan.xenstore`) and the emulated xenstored
(:mod:`vchan.sim.xenstored`) do the I/O.  Errors are of two kinds, as in
h11: ``ValueError`` when the caller asks for what cannot be sent (a string
with a NUL in it), :class:`ProtocolError` when the peer sent what the
protocol does not allow.
"""

from __future__ import annotations

import errno as _errno
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, NamedTuple

from ..addresses import DOMID_FIRST_RESERVED

__all__ = [
    "ABS_PATH_MAX",
    "HEADER",
    "OK",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "XSD_ERRORS",
    "DirectoryPager",
    "Framer",
    "Message",
    "Op",
    "Perm",
    "ProtocolError",
    "TransactionConflict",
    "WatchEvent",
    "XsError",
    "error_name",
    "error_number",
]


class Op(IntEnum):
    """Message types (``enum xsd_sockmsg_type``)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


HEADER = struct.Struct("=IIII")
PAYLOAD_MAX = 4096          # XENSTORE_PAYLOAD_MAX, both directions
ABS_PATH_MAX = 3072         # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048         # XENSTORE_REL_PATH_MAX
DOMID_SELF = DOMID_FIRST_RESERVED     # Xen names the caller's own domain so
OK = b"OK\0"

# -- errors ----------------------------------------------------------------------------

#: ``xsd_errors`` in xs_wire.h, in its order: the names XenStore sends.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
_BY_NAME: dict[str, int] = {name: getattr(_errno, name) for name in XSD_ERRORS}
_BY_NUMBER = {num: name for name, num in _BY_NAME.items()}


def error_number(name: str) -> int:
    """The errno for a XenStore error name (unknown names mean EINVAL, as in libxenstore)."""
    return _BY_NAME.get(name, _errno.EINVAL)


def error_name(number: int) -> str:
    """The XenStore error name for an errno (EINVAL for one XenStore cannot send)."""
    return _BY_NUMBER.get(number, "EINVAL")


class TransactionConflict(OSError):
    """A transaction lost a race (EAGAIN at commit): run it again."""


class ProtocolError(Exception):
    """The peer sent what the XenStore protocol does not allow."""


class XsError(Exception):
    """xenstored's side: the request fails with this errno (sent as its XenStore name)."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or error_name(err))
        self.errno = err


def xs_error(err: int, op: Op | str, what: str) -> OSError:
    """The client's exception for an ERROR reply: ``OSError(err, "xenstore READ /p: ENOENT")``."""
    name = op.name if isinstance(op, Op) else op
    text = f"xenstore {name} {what}: {error_name(err)}" if what else \
        f"xenstore {name}: {error_name(err)}"
    if err == _errno.EAGAIN and name == Op.TRANSACTION_END.name:
        return TransactionConflict(err, text)
    return OSError(err, text)


def check_size(op: Op, what: str, payload: bytes) -> None:
    """OSError(E2BIG) for a request xenstored would kill the connection for."""
    if len(payload) > PAYLOAD_MAX:
        # As libxenstore: never send it.
        raise OSError(_errno.E2BIG, f"xenstore {op.name} {what}: E2BIG "
                                    f"({len(payload)} bytes > {PAYLOAD_MAX})")


def encode_error(err: int) -> bytes:
    """The payload of an ERROR reply."""
    return error_name(err).encode() + b"\0"


def decode_error(payload: bytes) -> int:
    """The errno an ERROR reply names."""
    return error_number(payload.rstrip(b"\0").decode("ascii", "replace"))


# -- messages --------------------------------------------------------------------------


class Message(NamedTuple):
    """One whole message, header fields and payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def pack(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """A message as it goes on the wire (one write on the xenbus device)."""
    return HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload


class Framer:
    """Turns a byte stream into whole :class:`Message` s (rule 1).

    :meth:`feed` what was read, then take :meth:`next_message` until it
    returns None (more bytes needed).  Messages before a malformed header
    are still returned; the header itself raises :class:`ProtocolError`,
    every time it is reached.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def __repr__(self) -> str:
        return f"<Framer buffered={len(self._buf) - self._pos}>"

    def feed(self, data: bytes) -> None:
        """Add bytes read from the peer."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes are fed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
        if length > PAYLOAD_MAX:
            raise ProtocolError(f"message of {length} bytes (more than {PAYLOAD_MAX})")
        end = pos + HEADER.size + length
        if len(buf) < end:
            return None
        self._pos = end
        return Message(mtype, req_id, tx_id, bytes(buf[pos + HEADER.size:end]))


# -- strings ---------------------------------------------------------------------------


def arg(text: str) -> bytes:
    """One request argument: the string, NUL-terminated."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"XenStore strings cannot contain NUL: {text!r}")
    return raw + b"\0"


def args(*texts: str) -> bytes:
    """Request arguments, each NUL-terminated (``CONTROL``, ``INTRODUCE``...)."""
    return b"".join(arg(t) for t in texts)


def value_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    """A node's value as sent: text as UTF-8, bytes as they are."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def reply_strings(payload: bytes) -> list[str]:
    """The client's reading of a list reply (a trailing unterminated part counts too)."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def reply_string(payload: bytes) -> str:
    """The client's reading of a one-string reply (GET_DOMAIN_PATH, CONTROL)."""
    return payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


def request_strings(payload: bytes) -> list[str]:
    """xenstored's reading of a request: the strings up to the last NUL (rule 2)."""
    parts = payload.split(b"\0")[:-1]
    return [p.decode("latin-1") for p in parts]


def one_arg(payload: bytes) -> str | None:
    """xenstored's onearg(): exactly one string, NUL-terminated; None if not."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1].decode("latin-1")


def string_reply(text: str) -> bytes:
    """xenstored's one-string reply."""
    return text.encode("latin-1") + b"\0"


def strings_reply(texts: Iterable[str]) -> bytes:
    """xenstored's list reply: each string NUL-terminated."""
    return b"".join(t.encode("latin-1") + b"\0" for t in texts)


def atoi(text: str) -> int:
    """C's atoi(), as xenstored reads numbers: leading digits, else 0."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def protocol_error(why: str) -> ConnectionResetError:
    """The client's exception for a reply it cannot use."""
    return ConnectionResetError(_errno.ECONNRESET, f"xenstore protocol error: {why}")


def expect_ok(op: Op, what: str, payload: bytes) -> None:
    """Check a reply that only says ``OK``."""
    if payload.rstrip(b"\0") != b"OK":
        raise protocol_error(f"{op.name} {what}: expected OK, got {payload[:40]!r}")


# -- permissions -----------------------------------------------------------------------

PermLetter = Literal["n", "r", "w", "b"]
_PERM_LETTERS = ("n", "r", "w", "b")


@dataclass(frozen=True)
class Perm:
    """One permission entry of a node: ``domid`` may ``perm``.

    ``perm`` is ``"n"`` (none), ``"r"`` (read), ``"w"`` (write) or ``"b"``
    (both).  The first entry of a node names its owner (who may always do
    everything) and, by its ``perm``, what every domain not listed after it
    may do.  On the wire an entry is the letter then the decimal domid:
    ``"r5"``.
    """

    domid: int
    perm: PermLetter = "n"

    def __post_init__(self) -> None:
        if self.perm not in _PERM_LETTERS:
            raise ValueError(f"permission must be one of n, r, w, b; got {self.perm!r}")
        if isinstance(self.domid, bool) or not isinstance(self.domid, int) \
                or not 0 <= self.domid <= 0xFFFF:
            raise ValueError(f"permission domid must be an int in 0..65535, got {self.domid!r}")

    @property
    def can_read(self) -> bool:
        return self.perm in ("r", "b")

    @property
    def can_write(self) -> bool:
        return self.perm in ("w", "b")

    def to_wire(self) -> str:
        """The wire form, e.g. ``"r5"``."""
        return f"{self.perm}{self.domid}"

    @classmethod
    def from_wire(cls, text: str) -> Perm:
        """Parse the wire form (``"b0"``, ``"n12"``); ValueError if malformed."""
        digits = text[1:]
        if text[:1] not in _PERM_LETTERS or not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"malformed XenStore permission {text!r}")
        letter: PermLetter = text[0]  # type: ignore[assignment]
        return cls(int(text[1:]), letter)

    def __str__(self) -> str:
        return self.to_wire()


# -- each operation: the client's request, xenstored's reading of it, -------------------
# -- xenstored's reply and the client's reading of that. -----------------------------
#
# READ, MKDIR, RM, DIRECTORY, GET_PERMS: ``path\0`` (arg / one_arg).  READ's reply is
# the value; DIRECTORY's and GET_PERMS' are lists (strings_reply / reply_strings);
# the others say OK.  TRANSACTION_START and RESET_WATCHES send one empty string,
# which xenstored ignores.  CONTROL, INTRODUCE, RELEASE, RESUME, SET_TARGET: strings
# (args / request_strings).


def write_request(path: str, value: bytes | bytearray | memoryview | str) -> bytes:
    """WRITE: ``path\\0`` then the value, unterminated."""
    return arg(path) + value_bytes(value)


def decode_write(payload: bytes) -> tuple[str, bytes] | None:
    """xenstored's reading of WRITE: (path, value), None if malformed."""
    nul = payload.find(b"\0")
    if nul < 0:
        return None
    return payload[:nul].decode("latin-1"), payload[nul + 1:]


def set_perms_request(path: str, perms: Iterable[Perm | str]) -> bytes:
    """SET_PERMS: the path, then the entries, owner first."""
    entries = [p if isinstance(p, Perm) else Perm.from_wire(p) for p in perms]
    if not entries:
        raise ValueError("a node needs at least one permission entry (its owner)")
    return arg(path) + b"".join(arg(p.to_wire()) for p in entries)


def decode_set_perms(payload: bytes) -> tuple[str, list[str]] | None:
    """xenstored's reading of SET_PERMS: (path, entries unparsed), None if malformed."""
    parts = request_strings(payload)
    if len(parts) < 2:
        return None
    return parts[0], parts[1:]


def perms_reply(perms: Iterable[Perm]) -> bytes:
    """GET_PERMS' reply."""
    return strings_reply(p.to_wire() for p in perms)


def decode_perms(payload: bytes) -> list[Perm]:
    """The client's reading of GET_PERMS' reply."""
    try:
        return [Perm.from_wire(s) for s in reply_strings(payload)]
    except ValueError as exc:
        raise protocol_error(str(exc)) from None


def watch_request(path: str, token: str) -> bytes:
    """WATCH and UNWATCH: ``path\\0token\\0``."""
    return arg(path) + arg(token)


def decode_watch(payload: bytes) -> tuple[str, str, int] | None:
    """xenstored's reading of WATCH: (path, token, depth or -1), None if malformed.

    (A third string, a depth limit, is an extension of C xenstored.)
    """
    parts = request_strings(payload)
    depth = -1
    if len(parts) == 3:
        depth = atoi(parts[2])
        if depth < 0:
            return None
    elif len(parts) != 2:
        return None
    return parts[0], parts[1], depth


def decode_unwatch(payload: bytes) -> tuple[str, str] | None:
    """xenstored's reading of UNWATCH: (path, token), None if malformed."""
    parts = request_strings(payload)
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def transaction_start_reply(tx_id: int) -> bytes:
    return string_reply(str(tx_id))


def decode_transaction_start(payload: bytes) -> int:
    """The client's reading of TRANSACTION_START's reply: the transaction id."""
    try:
        return int(payload.rstrip(b"\0"))
    except ValueError:
        raise protocol_error(f"TRANSACTION_START answered {payload[:40]!r}") from None


def transaction_end_request(commit: bool) -> bytes:
    """TRANSACTION_END: ``T\\0`` commits, ``F\\0`` aborts."""
    return arg("T" if commit else "F")


def decode_transaction_end(payload: bytes) -> bool | None:
    """xenstored's reading of TRANSACTION_END: commit or not, None if malformed."""
    text = one_arg(payload)
    return None if text not in ("T", "F") else text == "T"


_DECIMAL = re.compile(r"\d+\Z")


def domid_request(domid: int) -> bytes:
    """GET_DOMAIN_PATH, IS_DOMAIN_INTRODUCED: the domid in decimal."""
    return arg(str(domid))


def is_decimal(text: str) -> bool:
    """Whether ``text`` is digits only, as xenstored wants numbers it parses strictly."""
    return _DECIMAL.match(text) is not None


def decode_domid(text: str | None) -> int | None:
    """xenstored's reading of a domid argument, None if it is not one."""
    if text is None or not is_decimal(text) or int(text) > 65535:
        return None
    return int(text)


def bool_reply(value: bool) -> bytes:
    """IS_DOMAIN_INTRODUCED's reply."""
    return b"T\0" if value else b"F\0"


# -- watch events ----------------------------------------------------------------------


class WatchEvent(NamedTuple):
    """One watch firing: the node that changed and the watch's token."""

    path: str
    token: str


def event_payload(path: str, token: str) -> bytes | None:
    """xenstored's WATCH_EVENT payload; None when it is too long to send (rule 4)."""
    payload = path.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"
    return payload if len(payload) <= PAYLOAD_MAX else None


def decode_event(payload: bytes) -> WatchEvent | None:
    """The client's reading of a WATCH_EVENT; None if it does not name path and token."""
    parts = reply_strings(payload)
    if len(parts) < 2:
        return None
    return WatchEvent(parts[0], parts[1])


def watch_matches(watch_path: str, event_path: str) -> bool:
    """Whether an event on ``event_path`` is for a watch set on ``watch_path``."""
    if event_path == watch_path or watch_path == "/":
        return True
    return event_path.startswith(watch_path + "/")


# -- directories in parts (rule 5) ------------------------------------------------------


def directory_part_request(path: str, offset: int) -> bytes:
    return arg(path) + arg(str(offset))


def decode_directory_part(payload: bytes) -> tuple[str, int] | None:
    """xenstored's reading of DIRECTORY_PART: (path, offset), None if malformed."""
    parts = request_strings(payload)
    if len(parts) != 2 or payload.count(b"\0") != 2:
        return None
    return parts[0], atoi(parts[1])


def directory_part_reply(generation: int, children: list[str], offset: int) -> bytes:
    """xenstored's reply: the names from byte ``offset`` on that fit in one message."""
    names = strings_reply(children)
    gen = string_reply(str(generation))
    if offset < 0 or offset >= len(names):
        return gen + b"\0"
    maxlen = PAYLOAD_MAX - len(gen) - 1
    end = offset
    while end < len(names):
        nxt = names.index(b"\0", end) + 1
        if nxt - offset > maxlen:
            break
        end = nxt
    return gen + names[offset:end] + (b"\0" if end == len(names) else b"")


class DirectoryPager:
    """The client's side of reading a directory in parts.

    Ask for the part at :attr:`offset`, :meth:`feed` the reply; it returns
    the names once the list is complete, else None (ask again: a changed
    node has started the list afresh).
    """

    def __init__(self) -> None:
        self._names = bytearray()
        self._gen: str | None = None

    @property
    def offset(self) -> int:
        """Where the next part starts (bytes of names so far)."""
        return len(self._names)

    def feed(self, reply: bytes) -> list[str] | None:
        raw_gen, _, chunk = reply.partition(b"\0")
        gen = raw_gen.decode("ascii", "replace")
        if self._gen is None:
            self._gen = gen
        elif gen != self._gen:
            self._names.clear()         # changed meanwhile: start again
            self._gen = None
            return None
        if chunk in (b"", b"\0"):
            return reply_strings(bytes(self._names))
        if chunk.endswith(b"\0\0"):
            self._names += chunk[:-1]
            return reply_strings(bytes(self._names))
        self._names += chunk
        return None
