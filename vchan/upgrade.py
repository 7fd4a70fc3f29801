"""The drop-in upgrade from TCP to vchan, as I/O-free message codecs and sniffers.

RULES
=====

A drop-in server (:mod:`vchan.dropin`) listens on a TCP address and serves
vchan (listener mode) on the vchan port ``tcp-<TCP port>`` at once.  A
drop-in client that has a hint that the address belongs to a co-resident
domain upgrades a TCP connection to vchan like this:

1. TCP, client -> server, the first bytes: ``HELLO`` (26 bytes)::

       MAGIC_HELLO (8) | client domid (u16, big-endian) | client nonce (16)

2. TCP, server -> client: ``OFFER`` (the server grants the upgrade)::

       MAGIC_ANSWER (8) | 0 | server domid (u16) | token (16) | n (u8) | vchan port (n)

   or ``DECLINE`` (the connection goes on as plain TCP, for both sides)::

       MAGIC_ANSWER (8) | 1 | n (u8) | why (n bytes of UTF-8)

3. vchan, client -> server, on a new stream to ``(server domid, port)``:
   ``CLAIM`` = MAGIC_CLAIM (8) | token (16).
4. vchan, server -> client: ``ACCEPT`` = MAGIC_ACCEPT (8) | client nonce (16).
   The server sends it only if the token is one it gave out on a TCP
   connection still open, to the domain that maps the stream's ring (which
   the hypervisor vouches for) -- the domain the HELLO named.  The token is
   used once.  Then the server closes the TCP connection and both sides hand
   the vchan stream to their application.

Why each field: the *token* travels only over the TCP connection, so a
stream that presents it comes from whoever holds that connection.  The
*nonce* travels only over the TCP connection too, so an ``ACCEPT`` that
returns it comes from the domain that answered on the TCP address: a domain
that claims the address in XenStore but does not own it receives at most a
``CLAIM`` (its token is worthless elsewhere) and cannot answer it.  The
client also checks the vchan peer's domid against the ``OFFER``; the grant
mapping guarantees it.

A server tells an upgrading client from any other TCP client by its first
bytes: :class:`HelloSniffer` compares each byte as it arrives with
``MAGIC_HELLO`` and gives up at the first one that differs, so a plain
client's bytes go to the application at once.  ``MAGIC_HELLO`` starts with
``0xF5``, a byte that begins no TLS record, no UTF-8 text, no HTTP, Redis,
PostgreSQL or MySQL client message.

Everything here is pure: bytes in, messages or decisions out.  Malformed
bytes from the peer are :class:`~vchan.errors.RemoteProtocolError`; bad
arguments from our own side are ``ValueError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .addresses import DOMID_MAX, check_domid
from .errors import RemoteProtocolError

__all__ = [
    "ACCEPT_SIZE",
    "CLAIM_SIZE",
    "HELLO_SIZE",
    "MAGIC_HELLO",
    "Accept",
    "AnswerReader",
    "Claim",
    "Decline",
    "Hello",
    "HelloSniffer",
    "Offer",
    "dropin_port",
]

MAGIC_HELLO = b"\xf5vchan\x01\x01"      # (version 1, message 1)
MAGIC_ANSWER = b"\xf5vchan\x01\x02"
MAGIC_CLAIM = b"\xf5vchan\x01\x03"
MAGIC_ACCEPT = b"\xf5vchan\x01\x04"
NONCE_SIZE = TOKEN_SIZE = 16
HELLO_SIZE = len(MAGIC_HELLO) + 2 + NONCE_SIZE
CLAIM_SIZE = len(MAGIC_CLAIM) + TOKEN_SIZE
ACCEPT_SIZE = len(MAGIC_ACCEPT) + NONCE_SIZE
_OFFER, _DECLINE = 0, 1


def dropin_port(tcp_port: int) -> str:
    """The vchan port a drop-in server serves for TCP port ``tcp_port``."""
    return f"tcp-{tcp_port}"


def _check_secret(value: bytes, what: str) -> None:
    if len(value) != 16:
        raise ValueError(f"{what} must be 16 bytes, got {len(value)}")


@dataclass(frozen=True)
class Hello:
    """Client -> server over TCP: upgrade me, I am ``domid``."""

    domid: int
    nonce: bytes

    def encode(self) -> bytes:
        check_domid(self.domid)
        _check_secret(self.nonce, "nonce")
        return MAGIC_HELLO + struct.pack(">H", self.domid) + self.nonce

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        if len(data) != HELLO_SIZE or not data.startswith(MAGIC_HELLO):
            raise RemoteProtocolError("malformed drop-in HELLO")
        (domid,) = struct.unpack_from(">H", data, len(MAGIC_HELLO))
        if domid > DOMID_MAX:
            raise RemoteProtocolError(f"drop-in HELLO names domain {domid}, not a domain id")
        return cls(domid, bytes(data[len(MAGIC_HELLO) + 2:]))


@dataclass(frozen=True)
class Offer:
    """Server -> client over TCP: connect to vchan ``(domid, port)`` with ``token``."""

    domid: int
    token: bytes
    port: str

    def encode(self) -> bytes:
        check_domid(self.domid)
        _check_secret(self.token, "token")
        port = self.port.encode("ascii")
        if not 0 < len(port) < 256:
            raise ValueError(f"vchan port name {self.port!r} too long")
        return MAGIC_ANSWER + struct.pack(">BH", _OFFER, self.domid) + self.token + \
            bytes([len(port)]) + port


@dataclass(frozen=True)
class Decline:
    """Server -> client over TCP: no upgrade; go on with this connection as TCP."""

    why: str

    def encode(self) -> bytes:
        why = self.why.encode("utf-8")[:255]
        return MAGIC_ANSWER + bytes([_DECLINE, len(why)]) + why


@dataclass(frozen=True)
class Claim:
    """Client -> server, first bytes of the vchan stream."""

    token: bytes

    def encode(self) -> bytes:
        _check_secret(self.token, "token")
        return MAGIC_CLAIM + self.token

    @classmethod
    def decode(cls, data: bytes) -> Claim:
        if len(data) != CLAIM_SIZE or not data.startswith(MAGIC_CLAIM):
            raise RemoteProtocolError("malformed drop-in CLAIM")
        return cls(bytes(data[len(MAGIC_CLAIM):]))


@dataclass(frozen=True)
class Accept:
    """Server -> client, first bytes of the vchan stream."""

    nonce: bytes

    def encode(self) -> bytes:
        _check_secret(self.nonce, "nonce")
        return MAGIC_ACCEPT + self.nonce

    @classmethod
    def decode(cls, data: bytes) -> Accept:
        if len(data) != ACCEPT_SIZE or not data.startswith(MAGIC_ACCEPT):
            raise RemoteProtocolError("malformed drop-in ACCEPT")
        return cls(bytes(data[len(MAGIC_ACCEPT):]))


class HelloSniffer:
    """The server's look at the first bytes of a TCP connection.

    :meth:`feed` takes bytes as they arrive and returns ``None`` while they
    may still be a HELLO, a :class:`Hello` once one is whole, or ``False``
    as soon as a byte differs from one (the connection is plain TCP: every
    byte fed so far, :attr:`data`, belongs to the application).  Bytes after
    a whole HELLO are a protocol error (the client must wait for the answer).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.result: Hello | bool | None = None

    def feed(self, data: bytes) -> Hello | bool | None:
        if self.result is not None:
            raise ValueError("HelloSniffer fed after its decision")
        start = len(self.data)
        self.data += data
        checked = self.data[start:len(MAGIC_HELLO)]
        if checked != MAGIC_HELLO[start:start + len(checked)]:
            self.result = False
            return False
        if len(self.data) < HELLO_SIZE:
            return None
        if len(self.data) > HELLO_SIZE:
            raise RemoteProtocolError("bytes after the drop-in HELLO, before the answer")
        self.result = Hello.decode(bytes(self.data))
        return self.result


class AnswerReader:
    """The client's reading of the server's answer to a HELLO (over TCP).

    :meth:`feed` returns ``None`` while the answer is incomplete, else an
    :class:`Offer` or a :class:`Decline`; :attr:`rest` is what came after a
    ``Decline`` (the application's first bytes).  A first byte that is not
    an answer's raises :class:`~vchan.errors.RemoteProtocolError`: the
    server is not a drop-in server.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self.rest = b""

    def feed(self, data: bytes) -> Offer | Decline | None:
        self._data += data
        buf = self._data
        head = buf[:len(MAGIC_ANSWER)]
        if head != MAGIC_ANSWER[:len(head)]:
            raise RemoteProtocolError(
                f"the server answered {bytes(buf[:16])!r}..., not a drop-in answer: "
                "it is not a vchan drop-in server")
        n = len(MAGIC_ANSWER)
        if len(buf) <= n:
            return None
        kind = buf[n]
        if kind not in (_OFFER, _DECLINE):
            raise RemoteProtocolError(f"unknown drop-in answer kind {kind}")
        if len(buf) < n + 2:
            return None
        if kind == _DECLINE:
            end = n + 2 + buf[n + 1]
            if len(buf) < end:
                return None
            self.rest = bytes(buf[end:])
            return Decline(buf[n + 2:end].decode("utf-8", "replace"))
        head_len = n + 3 + TOKEN_SIZE + 1
        if len(buf) < head_len:
            return None
        end = head_len + buf[head_len - 1]
        if len(buf) < end:
            return None
        if len(buf) > end:
            raise RemoteProtocolError("bytes after the drop-in OFFER")
        (domid,) = struct.unpack_from(">H", buf, n + 1)
        token = bytes(buf[n + 3:n + 3 + TOKEN_SIZE])
        try:
            port = buf[head_len:end].decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("drop-in OFFER with a non-ASCII port name") from None
        if domid > DOMID_MAX or not port:
            raise RemoteProtocolError("malformed drop-in OFFER")
        return Offer(domid, token, port)
