"""Exceptions raised by vchan.

As h11 does, vchan separates errors of the caller ("you misused the API")
from errors of the peer ("the other side broke the protocol"):

* :class:`LocalProtocolError` -- this program did something the protocol
  forbids (writing after ``write_eof()``, a message larger than the ring),
  or asked for what this connection cannot do (:class:`HalfCloseUnsupportedError`).
* :class:`RemoteProtocolError` -- the peer wrote something no correct peer
  writes into the shared page (an index outside the ring, a changed ring
  order, an impossible live byte).  The connection cannot continue.  It is a
  :class:`ConnectionError`, so asyncio code that handles connection loss
  handles it too.

Bad arguments raise the builtin :class:`ValueError` / :class:`TypeError`.
"""

from __future__ import annotations

__all__ = [
    "HalfCloseUnsupportedError",
    "LocalProtocolError",
    "NoSuchDomainError",
    "RemoteProtocolError",
    "VchanError",
]


class VchanError(Exception):
    """Base class of every vchan-specific exception."""


class LocalProtocolError(VchanError, RuntimeError):
    """This side used the connection in a way the protocol does not allow."""


class HalfCloseUnsupportedError(LocalProtocolError, NotImplementedError):
    """``write_eof()`` to a peer that cannot half-close: a plain libxenvchan endpoint.

    ``can_write_eof()`` says so beforehand.  :class:`vchan.Vchan` and the
    asyncio transport raise this same error.  It is a
    :class:`LocalProtocolError` -- this side asked for what the connection
    cannot do; the peer broke nothing -- and a :class:`NotImplementedError`,
    which is what asyncio's transports raise from ``write_eof()`` when
    ``can_write_eof()`` is False (``asyncio.sslproto``), and what asyncio
    code catches.
    """

    def __init__(self, message: str = "write_eof(): the peer is a plain libxenvchan "
                 "endpoint, which has no half-close (only vchan peers understand the EOF "
                 "extension)") -> None:
        super().__init__(message)


class RemoteProtocolError(VchanError, ConnectionError):
    """The peer corrupted the shared ring; the connection is unusable.

    ``code`` is the ring's error code (``vchan.ring.EINDEX``, ``EORDER`` or
    ``ELIVE``) and names which rule the peer broke.
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[RemoteProtocolError], tuple[str, int]]:
        return (type(self), (str(self), self.code))


class NoSuchDomainError(VchanError, ConnectionRefusedError):
    """The peer domain does not exist (or went away)."""
