"""Drop-in by address: vchan to co-resident domains, TCP to everything else.

``vchan.create_server(factory, host, port)`` (and ``start_server(cb, host,
port)``) serves a TCP address and, at once, vchan listener port
``tcp-<port>``; it advertises the address in XenStore so that clients of
other domains on the same host can find it.  ``vchan.create_connection(
factory, host, port)`` (and ``open_connection(host, port)``) connects by TCP
and, when a co-resident domain advertises that address, upgrades the
connection to vchan -- but only when the server proves over the TCP
connection that it is that domain.  The negotiation's messages and rules are
in :mod:`vchan.upgrade`; ``docs/dropin.md`` has the design and the trust
model.

THEORY OF OPERATION
===================

Advertisement (server, domain S, TCP port P)::

    /local/domain/S/data/vchan-dropin/P = "<address> <address> ..."   perms [S: r]
    /local/vchan-dropin/S-P             = ""                          perms [S: r]

The first is the claim: only S (and dom0) can write in S's tree, so it says
"S claims to serve these addresses" and nothing more.  The second is an
index entry, so that an unprivileged domain, which cannot list
``/local/domain``, finds which domains serve port P.  ``/local/vchan-dropin``
is made by the toolstack (dom0), writable by every domain; the emulator
makes it at start.  Both are hints: nothing a client does with them is
trusted without the TCP negotiation.

Client (domain C) to ``(host, P)``:

1. Hints: the domains S whose index entry names P and whose claim lists
   ``host`` (or an address ``host`` resolves to).  Cached per process: the
   index until a XenStore watch on it fires (kept while lookups come, for
   :data:`INDEX_WATCH_IDLE` seconds after the last), or for :data:`HINT_TTL`
   seconds where the watch is not set up yet; claims for :data:`HINT_TTL`
   seconds or until the index changes.  An address that failed to upgrade
   is not tried again for :data:`FAILURE_TTL` seconds.  Loopback addresses count only for
   our own domain (or on the emulator, where every domain shares the host's
   network).  No hint: a plain TCP connection, no byte added.
2. TCP connect, send HELLO, read the answer (within :data:`ANSWER_TIMEOUT`).
   DECLINE: the connection goes on as TCP.  OFFER: it must name one of the
   hinted domains; the client opens a vchan stream to it, sends CLAIM and
   waits for ACCEPT carrying its nonce.  Then the TCP connection is closed
   and the application gets the vchan transport.
3. Any failure before ACCEPT (no answer, a plain server's bytes, no vchan
   server, grants short, XenStore refusing, a timeout): a fresh plain TCP
   connection, and a debug log line saying why.

The TCP calls are the event loop's own ``create_connection`` /
``create_server`` -- those under the wrapping when the loop is a drop-in one
(:mod:`vchan.dropin_loop`).

Server (domain S): each accepted TCP connection is sniffed
(:class:`vchan.upgrade.HelloSniffer`): the first byte that is not HELLO's
hands the connection to the application with every byte received; a whole
HELLO gets an OFFER (a one-time token, kept with the TCP connection until
:data:`CLAIM_TIMEOUT`) and the vchan server starts serving the domain the
HELLO named.  A connection on which no byte comes within ``grace`` seconds
(server-first protocols: SMTP, MySQL, SSH) is handed over as TCP.  A vchan
stream that presents a token given to its own domain gets ACCEPT, the TCP
connection is closed, and the stream goes to the application.
"""

from .client import create_connection, create_connection_on
from .common import (
    ANSWER_TIMEOUT,
    CLAIM_TIMEOUT,
    FAILURE_TTL,
    GRACE,
    HINT_TTL,
    INDEX,
    INDEX_WATCH_IDLE,
    UPGRADE_TIMEOUT,
    VIA,
    interface_addresses,
    via,
)
from .hints import forget_hints
from .server import DropinServer, create_server

__all__ = [
    "ANSWER_TIMEOUT",
    "CLAIM_TIMEOUT",
    "FAILURE_TTL",
    "GRACE",
    "HINT_TTL",
    "INDEX",
    "INDEX_WATCH_IDLE",
    "UPGRADE_TIMEOUT",
    "VIA",
    "DropinServer",
    "create_connection",
    "create_connection_on",
    "create_server",
    "forget_hints",
    "interface_addresses",
    "via",
]
