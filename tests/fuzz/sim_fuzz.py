"""Fuzzing the emulator daemon's own protocols: what a hostile client sends it.

The emulated hypervisor (``vchan/sim/hypervisor.py``) and its xenstored
(``vchan/sim/xenstored.py``) answer every process that claims to be a
domain, so every byte a client sends them is hostile input.  This fuzzer
talks to a real daemon over its real sockets, as any client could:

* the hypervisor protocol (``docs/sim-protocol.md``): HELLO with any
  version, domain and kind; GNT_SHARE / GNT_MAP / GNT_RELEASE /
  EVT_BIND_* / EVT_UNBIND with interesting and random field values,
  references, ports and ids that exist (so deep states are reached: real
  mappings, notify offsets, bound ports) and ones that do not; wrong
  lengths, truncated and oversized messages, descriptors attached to
  requests, tokens closed in any order, connections dropped mid-state;
  CONTROL with any JSON (and not JSON);
* the XenStore protocol (``docs/xenstore.md``): every message type and
  unknown ones, paths valid and not, NULs anywhere, permissions, watches,
  transactions, pipelined bursts, headers whose length lies.

What must hold after every message (a failure is a "crash"):

1. the daemon answers each request exactly once, well-formed, within
   ``HANG_SECONDS`` -- never ``EIO`` (the daemon's answer when a handler
   raised something unexpected), never a hang;
2. the daemon is alive and keeps serving a well-behaved client (the canary:
   a share mapped by another domain, an event channel, a XenStore
   write/read) after every scenario;
3. once every fuzzing client is gone, nothing of theirs is left: no grant,
   mapping, port, domain, XenStore connection, watch or transaction, and no
   more descriptors open in the daemon than before;
4. the daemon's log holds no traceback (no exception escaped a handler or a
   callback of its loop).

Run by ``tests/test_sim_fuzz.py`` (a short run in the default suite, a long
one with ``--soak``; CI's soak step runs it for ``VCHAN_SOAK_SECONDS``), or
by hand against a daemon of its own::

    python tests/fuzz/sim_fuzz.py --seconds 60 [--seed N]

A run is reproducible from its seed (up to timing).  On failure the
messages of the failing scenario are written, one JSON line each, to the
artifact file named in the error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HANG_SECONDS = 5.0          # no answer within this: the daemon hangs

# The hypervisor protocol (kernel/sim_proto.h).
VS_VERSION = 1
HELLO, SHARE, MAP, RELEASE, BIND_UNBOUND, BIND_INTERDOMAIN, UNBIND, CONTROL = \
    1, 2, 3, 4, 6, 7, 8, 9
OPS = (HELLO, SHARE, MAP, RELEASE, BIND_UNBOUND, BIND_INTERDOMAIN, UNBIND, CONTROL)
KIND_CONTROL, KIND_GNTSHR, KIND_GNTTAB, KIND_EVTCHN = 0, 1, 2, 3
MAX_MSG = 65536
PAGE = 4096
HDR = struct.Struct("<II")
REPLY = struct.Struct("<iI")
SEG = struct.Struct("<IIIIQ")

# The XenStore protocol (xen/io/xs_wire.h).
XS_HDR = struct.Struct("=IIII")
XS_PAYLOAD_MAX = 4096
XS_WATCH_EVENT, XS_ERROR = 15, 16
XS_TYPES = tuple(range(0, 23))
XS_ERRORS = {"EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
             "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM"}

# Fuzzing clients play these domains (few, so that the daemon's per-domain
# XenStore sockets settle); the canary plays two others.
FUZZ_DOMAINS = (0, 3, 4, 5)
CANARY = (61, 62)

U32 = (0, 1, 2, 7, 8, 9, 63, 64, 4095, 4096, 0x7FEF, 0x7FF0, 0x7FF1, 0x7FF2, 0x7FF5,
       0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
I32 = (-(1 << 31), -4096, -2, -1, 0, 1, 2, 4095, 4096, 4097, 8191, 8192, (1 << 31) - 1)


class FuzzFailure(AssertionError):
    """The daemon broke one of the rules above."""


@dataclass
class Stats:
    scenarios: int = 0
    hv_messages: int = 0
    xs_messages: int = 0
    replies_ok: int = 0
    replies_error: dict[str, int] = field(default_factory=dict)
    connections_dropped: int = 0        # the daemon cut a client off (allowed for some input)
    canary_checks: int = 0
    leak_checks: int = 0

    def error(self, name: str) -> None:
        self.replies_error[name] = self.replies_error.get(name, 0) + 1


# -- talking to the daemon -------------------------------------------------------


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class HvConn:
    """A raw client of the hypervisor socket; every reply is checked."""

    def __init__(self, fuzzer: Fuzzer, domid: int = -1, kind: int = -1) -> None:
        self.fuzzer = fuzzer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(str(fuzzer.dir / "hypervisor.sock"))
        self.domid, self.kind = domid, kind
        self.open = True
        self.ports: list[int] = []

    def close(self) -> None:
        if self.open:
            self.open = False
            self.sock.close()

    def request(self, op: int, body: bytes, *, length: int | None = None,
                fds: list[int] | None = None) -> tuple[int, bytes, list[int]] | None:
        """Send one request; its reply (status, payload, fds), or None if cut off."""
        message = HDR.pack(op & 0xFFFFFFFF, len(body) if length is None else length) + body
        self.fuzzer.record("hv", message, op=op)
        self.fuzzer.stats.hv_messages += 1
        try:
            if fds:
                socket.send_fds(self.sock, [message], fds)
            else:
                self.sock.send(message)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                self.fuzzer.stats.connections_dropped += 1
                self.close()
                return None
            if exc.errno == errno.EMSGSIZE:
                return None             # too big for the socket: never reached the daemon
            raise
        ready, _, _ = select.select([self.sock], [], [], HANG_SECONDS)
        if not ready:
            raise FuzzFailure(f"the daemon did not answer a hypervisor request "
                              f"(op {op}, {len(message)} bytes) within {HANG_SECONDS} s")
        data, anc, flags, _ = self.sock.recvmsg(MAX_MSG * 2, socket.CMSG_SPACE(64 * 4),
                                                 socket.MSG_CMSG_CLOEXEC)
        got: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.extend(struct.unpack(f"{len(payload) // 4}i",
                                         payload[: len(payload) - len(payload) % 4]))
        if not data:
            _close_all(got)
            self.fuzzer.stats.connections_dropped += 1
            self.close()
            return None
        if len(data) < REPLY.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(got)
            raise FuzzFailure(f"malformed reply to op {op}: {data[:32].hex()}")
        status, rlen = REPLY.unpack_from(data)
        payload = data[REPLY.size:]
        if rlen != len(payload) or status > 0:
            _close_all(got)
            raise FuzzFailure(f"malformed reply to op {op}: status {status}, length {rlen} "
                              f"for {len(payload)} bytes")
        if status < 0:
            _close_all(got)
            name = errno.errorcode.get(-status, str(-status))
            self.fuzzer.stats.error(name)
            if -status == errno.EIO:
                raise FuzzFailure(f"the daemon answered EIO to op {op}: a handler raised "
                                  "something unexpected (see its log)")
            if got or (payload and op != CONTROL):
                # (A failed control request says why, in text.)
                raise FuzzFailure(f"a failed reply to op {op} carries a payload or descriptors")
            return status, payload, []
        self.fuzzer.stats.replies_ok += 1
        return status, payload, got

    def hello(self, domid: int, kind: int, version: int = VS_VERSION) -> bool:
        reply = self.request(HELLO, struct.pack("<IIII", version, domid, kind, os.getpid()))
        if reply is not None and reply[0] == 0:
            self.domid, self.kind = domid, kind
            return True
        return False


class XsConn:
    """A raw client of one domain's XenStore socket."""

    def __init__(self, fuzzer: Fuzzer, domid: int) -> None:
        self.fuzzer = fuzzer
        self.domid = domid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(fuzzer.xs_path(domid))
        self.buf = bytearray()
        self.open = True
        self.txs: list[int] = []

    def close(self) -> None:
        if self.open:
            self.open = False
            self.sock.close()

    def send(self, mtype: int, req_id: int, tx_id: int, payload: bytes,
             length: int | None = None) -> bytes:
        message = XS_HDR.pack(mtype & 0xFFFFFFFF, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF,
                              len(payload) if length is None else length) + payload
        self.fuzzer.record("xs", message, domid=self.domid)
        self.fuzzer.stats.xs_messages += 1
        return message

    def write(self, data: bytes, *, chunked: bool = False) -> bool:
        rng = self.fuzzer.rng
        try:
            if chunked and len(data) > 1:
                # Split anywhere: the daemon must reassemble a byte stream.
                pos = 0
                while pos < len(data):
                    n = rng.randint(1, max(1, len(data) - pos))
                    self.sock.sendall(data[pos:pos + n])
                    pos += n
            else:
                self.sock.sendall(data)
        except OSError:
            self.fuzzer.stats.connections_dropped += 1
            self.close()
            return False
        return True

    def reply(self, req_id: int, mtype: int) -> tuple[int, bytes] | None:
        """The reply to ``req_id`` (watch events skipped), or None if cut off."""
        deadline = time.monotonic() + HANG_SECONDS
        while True:
            while len(self.buf) >= XS_HDR.size:
                rtype, rid, _tx, rlen = XS_HDR.unpack_from(self.buf)
                if rlen > XS_PAYLOAD_MAX:
                    raise FuzzFailure(f"xenstored sent a {rlen}-byte payload")
                if len(self.buf) < XS_HDR.size + rlen:
                    break
                payload = bytes(self.buf[XS_HDR.size:XS_HDR.size + rlen])
                del self.buf[:XS_HDR.size + rlen]
                if rtype == XS_WATCH_EVENT:
                    if payload.count(b"\0") < 2:
                        raise FuzzFailure(f"malformed watch event {payload!r}")
                    continue
                if rid != req_id:
                    raise FuzzFailure(f"xenstored answered request {rid} while {req_id} "
                                      "was the one outstanding")
                if rtype == XS_ERROR:
                    name = payload.rstrip(b"\0").decode("latin-1")
                    if name not in XS_ERRORS:
                        raise FuzzFailure(f"xenstored sent an unknown error {name!r}")
                    self.fuzzer.stats.error("XS_" + name)
                    if name == "EIO":
                        raise FuzzFailure(f"xenstored answered EIO to type {mtype}: a handler "
                                          "raised something unexpected (see its log)")
                elif rtype != (mtype & 0xFFFFFFFF):
                    raise FuzzFailure(f"xenstored answered type {mtype} with type {rtype}")
                else:
                    self.fuzzer.stats.replies_ok += 1
                return rtype, payload
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not ready:
                raise FuzzFailure(f"xenstored did not answer request {req_id} (type {mtype}) "
                                  f"within {HANG_SECONDS} s")
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.fuzzer.stats.connections_dropped += 1
                self.close()
                return None
            self.buf += data


# -- the fuzzer --------------------------------------------------------------------


@dataclass
class Share:
    conn: HvConn
    id: int
    refs: list[int]
    count: int
    peer: int
    writable: bool
    token: int


@dataclass
class Mapping:
    conn: HvConn
    id: int
    token: int


class Fuzzer:
    """Fuzzes the daemon serving ``directory`` (pid ``pid``, log ``log``)."""

    def __init__(self, directory: Path, pid: int, log: Path, seed: int,
                 artifacts: Path | None = None) -> None:
        self.dir = directory
        self.pid = pid
        self.log = log
        self.seed = seed
        self.rng = random.Random(seed)
        self.artifacts = artifacts or directory
        self.stats = Stats()
        self.trace: list[dict[str, Any]] = []
        self.conns: list[HvConn] = []
        self.xs_conns: list[XsConn] = []
        self.shares: list[Share] = []
        self.maps: list[Mapping] = []
        self.ids: list[int] = []
        self._xs_paths: dict[int, str] = {}
        self.baseline_fds = 0
        self.baseline_sockets = 0

    # -- bookkeeping ------------------------------------------------------------

    def record(self, proto: str, message: bytes, **info: Any) -> None:
        self.trace.append({"proto": proto, "hex": message.hex(), **info})

    def control(self, command: Any, raw: bytes | None = None) -> dict[str, Any] | None:
        conn = HvConn(self)
        try:
            if not conn.hello(0, KIND_CONTROL):
                raise FuzzFailure("the daemon refused a control connection")
            body = raw if raw is not None else json.dumps(command).encode()
            reply = conn.request(CONTROL, body)
            if reply is None or reply[0] < 0:
                return None
            answer = json.loads(reply[1])
            return answer if isinstance(answer, dict) else None
        finally:
            conn.close()

    def xs_path(self, domid: int) -> str:
        path = self._xs_paths.get(domid)
        if path is None:
            answer = self.control({"cmd": "xenstore-socket", "domid": domid})
            if answer is None:
                raise FuzzFailure(f"no XenStore socket for domain {domid}")
            path = self._xs_paths[domid] = str(answer["path"])
        return path

    def u32(self, *extra: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.45 and extra:
            return rng.choice(extra) & 0xFFFFFFFF
        if r < 0.85:
            return rng.choice(U32)
        return rng.getrandbits(32)

    def i32(self, *extra: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.5 and extra:
            return rng.choice(extra)
        if r < 0.9:
            return rng.choice(I32)
        return rng.getrandbits(32) - (1 << 31)

    def mangle(self, body: bytes) -> bytes:
        """Sometimes cut, extend or flip a well-formed body."""
        rng = self.rng
        r = rng.random()
        if r < 0.80 or not body:
            return body
        if r < 0.87:
            return body[:rng.randrange(len(body))]
        if r < 0.94:
            return body + rng.randbytes(rng.choice((1, 3, 4, 8, 100)))
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b)

    # -- the hypervisor protocol --------------------------------------------------------

    def new_hv(self) -> HvConn | None:
        rng = self.rng
        conn = HvConn(self)
        self.conns.append(conn)
        if rng.random() < 0.05:
            return conn                 # no HELLO: everything must be refused
        r = rng.random()
        domid = rng.choice(FUZZ_DOMAINS) if r < 0.9 else self.u32()
        kind = rng.choice((KIND_GNTSHR, KIND_GNTTAB, KIND_EVTCHN, KIND_CONTROL)) \
            if rng.random() < 0.93 else self.u32()
        version = VS_VERSION if rng.random() < 0.95 else self.u32()
        conn.hello(domid, kind, version)
        if conn.open and rng.random() < 0.05:
            # A second HELLO, maybe as another domain.
            conn.request(HELLO, struct.pack("<IIII", VS_VERSION, rng.choice(FUZZ_DOMAINS),
                                            rng.choice((1, 2, 3)), 1))
        return conn

    def hv_step(self, conn: HvConn) -> None:
        rng = self.rng
        op = rng.choice((SHARE, SHARE, MAP, MAP, MAP, RELEASE, BIND_UNBOUND, BIND_UNBOUND,
                         BIND_INTERDOMAIN, BIND_INTERDOMAIN, UNBIND, CONTROL, 0, 5, 10,
                         rng.getrandbits(32)))
        peers = [c.domid for c in self.conns if c.domid >= 0] or [0]
        body = b""
        if op == SHARE:
            count = rng.choice((1, 1, 2, 3, 8, 0, 16368, 16369, 1 << 20)) \
                if rng.random() < 0.9 else self.u32()
            size = (count * PAGE) & 0x7FFFFFFF
            body = struct.pack("<IIIii", self.u32(*peers), count,
                               rng.choice((0, 1)) if rng.random() < 0.9 else self.u32(),
                               self.i32(-1, -1, 0, size - 1, size, size + 1),
                               self.i32(-1, -1, *conn.ports, *self.all_ports()))
        elif op == MAP:
            grants = [(s.conn.domid, ref, s.count) for s in self.shares for ref in s.refs]
            n = rng.choice((1, 1, 2, 3, 0)) if rng.random() < 0.95 else rng.randint(1, 70)
            pairs = []
            for _ in range(n):
                if grants and rng.random() < 0.8:
                    domid, ref, _ = rng.choice(grants)
                    pairs.append((domid if rng.random() < 0.9 else self.u32(*peers),
                                  ref if rng.random() < 0.9 else self.u32(ref + 1)))
                else:
                    pairs.append((self.u32(*peers), self.u32(8, 9)))
            size = n * PAGE
            count = n if rng.random() < 0.9 else self.u32(n + 1)
            body = struct.pack("<IIii", count,
                               rng.choice((0, 1)) if rng.random() < 0.9 else self.u32(),
                               self.i32(-1, -1, 0, size - 1, size, size + 1),
                               self.i32(-1, -1, *conn.ports)) + \
                b"".join(struct.pack("<II", d & 0xFFFFFFFF, r & 0xFFFFFFFF) for d, r in pairs)
        elif op == RELEASE:
            body = struct.pack("<Q", rng.choice(self.ids) if self.ids and rng.random() < 0.8
                               else rng.getrandbits(64))
        elif op == BIND_UNBOUND:
            body = struct.pack("<I", self.u32(*peers, 0x7FF0))
        elif op == BIND_INTERDOMAIN:
            unbound = [(c.domid, p) for c in self.conns for p in c.ports]
            if unbound and rng.random() < 0.8:
                domid, port = rng.choice(unbound)
            else:
                domid, port = self.u32(*peers), self.u32(0, 1, 2, 4095, 4096)
            body = struct.pack("<II", domid & 0xFFFFFFFF, port & 0xFFFFFFFF)
        elif op == UNBIND:
            body = struct.pack("<I", self.u32(*conn.ports, *self.all_ports()))
        elif op == CONTROL:
            body = self.control_body()
        else:
            body = rng.randbytes(rng.choice((0, 1, 4, 8, 16, 20, 64)))
        body = self.mangle(body)
        length = None
        if rng.random() < 0.03:
            length = self.u32(len(body) + 1, len(body) - 1)
        fds: list[int] = []
        if rng.random() < 0.04:
            r, w = os.pipe2(os.O_CLOEXEC)
            fds = [r, w]
        if rng.random() < 0.01:
            body += bytes(MAX_MSG)      # more than one message may hold
        try:
            reply = conn.request(op, body, length=length, fds=fds)
        finally:
            _close_all(fds)
        if reply is None or reply[0] < 0:
            if op == CONTROL:
                self.restore_settings()
            return
        self.take_reply(conn, op, body, reply)

    def all_ports(self) -> list[int]:
        return [p for c in self.conns for p in c.ports]

    def take_reply(self, conn: HvConn, op: int, body: bytes,
                   reply: tuple[int, bytes, list[int]]) -> None:
        _, payload, fds = reply
        try:
            if op == SHARE and len(payload) >= 8 and len(fds) == 2:
                (mid,) = struct.unpack_from("<Q", payload)
                peer, count, writable = struct.unpack_from("<III", body)
                refs = list(struct.unpack_from(f"<{(len(payload) - 8) // 4}I", payload, 8))
                if len(refs) != count:
                    raise FuzzFailure(f"GNT_SHARE of {count} pages returned {len(refs)} refs")
                os.close(fds.pop(0))    # the memfd: the daemon keeps its own
                self.shares.append(Share(conn, mid, refs, count, peer, bool(writable),
                                         fds.pop(0)))
                self.ids.append(mid)
            elif op == MAP and len(payload) >= 16 and fds:
                mid, nseg, _ = struct.unpack_from("<QII", payload)
                if len(payload) != 16 + nseg * SEG.size or nseg + 1 > len(fds) + nseg:
                    raise FuzzFailure(f"malformed GNT_MAP reply: {payload.hex()}")
                self.maps.append(Mapping(conn, mid, fds.pop(0)))
                self.ids.append(mid)
            elif op in (BIND_UNBOUND, BIND_INTERDOMAIN) and len(payload) == 4:
                (port,) = struct.unpack("<I", payload)
                if len(fds) != 2 or not 0 < port < 4096:
                    raise FuzzFailure(f"bind answered port {port} with {len(fds)} descriptors")
                conn.ports.append(port)
            elif op == UNBIND and len(body) >= 4:
                (port,) = struct.unpack_from("<I", body)
                for c in self.conns:
                    if c.domid == conn.domid and port in c.ports:
                        c.ports.remove(port)
            elif op == CONTROL:
                self.restore_settings()
        finally:
            _close_all(fds)

    def control_body(self) -> bytes:
        rng = self.rng
        values: list[Any] = [0, 1, -1, 2**31 - 1, 2**31, 2**63, 10**30, True, None, "1", 1.5,
                             [], {}, "x" * 300]
        r = rng.random()
        if r < 0.1:
            return rng.randbytes(rng.randint(0, 64))
        if r < 0.15:
            depth = rng.choice((10, 1000, 30000))
            return b"[" * depth + b"]" * depth
        if r < 0.2:
            return json.dumps(rng.choice(values)).encode()
        cmd = rng.choice(("status", "domains", "set", "xenstore-socket", "may-claim", "nope",
                          None, 7))
        command: dict[str, Any] = {"cmd": cmd}
        if cmd == "set":
            command["key"] = rng.choice(("grant-limit", "xenstore-quota-nodes",
                                         "xenstore-quota-watches", "xenstore-quota-nope",
                                         "xenstore-quota-", None, 3))
            command["value"] = rng.choice(values)
        elif cmd in ("xenstore-socket", "may-claim"):
            command["domid"] = rng.choice((*FUZZ_DOMAINS, *values))
        return json.dumps(command).encode()

    def restore_settings(self) -> None:
        """Undo what a control request may have changed (the canary needs grants)."""
        self.control({"cmd": "set", "key": "grant-limit", "value": 1024})
        for name, value in (("nodes", 1000), ("watches", 128), ("transactions", 10),
                            ("transaction-nodes", 1024), ("node-permissions", 5),
                            ("node-size", 2048), ("path-max", 2048)):
            self.control({"cmd": "set", "key": f"xenstore-quota-{name}", "value": value})

    def hv_scenario(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 5)):
            self.new_hv()
        for _ in range(rng.randint(1, 40)):
            live = [c for c in self.conns if c.open]
            r = rng.random()
            if r < 0.75 and live:
                self.hv_step(rng.choice(live))
            elif r < 0.83:
                self.new_hv()
            elif r < 0.92 and (self.shares or self.maps):
                self.drop_token()
            elif live:
                rng.choice(live).close()
        self.end_hv()

    def drop_token(self) -> None:
        """Close a share's or mapping's token (the last user goes: notify, end grants)."""
        rng = self.rng
        if self.shares and (not self.maps or rng.random() < 0.5):
            share = self.shares.pop(rng.randrange(len(self.shares)))
            token, mid, conn = share.token, share.id, share.conn
        else:
            m = self.maps.pop(rng.randrange(len(self.maps)))
            token, mid, conn = m.token, m.id, m.conn
        os.close(token)
        if conn.open and rng.random() < 0.7:
            conn.request(RELEASE, struct.pack("<Q", mid))

    def end_hv(self) -> None:
        rng = self.rng
        tokens = [s.token for s in self.shares] + [m.token for m in self.maps]
        rng.shuffle(tokens)
        everything: list[Callable[[], None]] = [functools.partial(os.close, t) for t in tokens]
        everything += [c.close for c in self.conns]
        rng.shuffle(everything)
        for close in everything:
            close()
        self.conns.clear()
        self.shares.clear()
        self.maps.clear()
        self.ids.clear()

    # -- the XenStore protocol ------------------------------------------------------

    def xs_path_arg(self, domid: int) -> str:
        rng = self.rng
        r = rng.random()
        home = f"/local/domain/{domid}"
        if r < 0.25:
            return rng.choice(("data/x", "data", "data/a/b/c", "x", "domid", "name"))
        if r < 0.6:
            return rng.choice((f"{home}/data/f", f"{home}/data", home, "/local/domain/3/data/f",
                               "/local/domain/4", "/local", "/", "/tool", "/fuzz/a"))
        if r < 0.75:
            return rng.choice(("@introduceDomain", "@releaseDomain", "@releaseDomain/3",
                               "@other", "@"))
        if r < 0.9:
            return rng.choice(("", "//", "/a//b", "/a/", "a b", "/\xe9", "/a\x01", "/" + "a" * 5000,
                               "/" + "a/" * 1100 + "a", f"{home}/" + "d" * 2040, "../x",
                               "/local/domain/99999/x", "/local/domain/-1/x"))
        return "".join(rng.choice("ab/@-_0\0 .") for _ in range(rng.randint(0, 20)))

    def xs_payload(self, conn: XsConn, mtype: int) -> bytes:
        rng = self.rng
        path = self.xs_path_arg(conn.domid).encode("latin-1")
        r = rng.random()
        if r < 0.1:
            return rng.randbytes(rng.randint(0, 300))
        if mtype == 11:                                 # WRITE
            return path + b"\0" + rng.randbytes(rng.choice((0, 1, 10, 2000, 4000)))
        if mtype == 14:                                 # SET_PERMS
            perms = [rng.choice(("n0", "r3", "b4", "w5", "n32752", "r65535", "b99999", "x1",
                                 "r", "", "n-1", "r0x", f"b{conn.domid}"))
                     for _ in range(rng.choice((0, 1, 2, 3, 6, 20)))]
            return path + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        if mtype in (4, 5):                             # WATCH, UNWATCH
            token = rng.choice((b"t", b"", b"tok" * 100, b"\xff"))
            extra = rng.choice((b"", b"", b"0\0", b"1\0", b"-1\0", b"x\0", b"99999999999\0"))
            return path + b"\0" + token + b"\0" + extra
        if mtype == 7:                                  # TRANSACTION_END
            return rng.choice((b"T\0", b"F\0", b"T", b"X\0", b"", b"T\0F\0"))
        if mtype == 22:                                 # DIRECTORY_PART
            off = rng.choice((b"0", b"1", b"-5", b"99999", b"x", b"", b" 3", b"1" * 40))
            return path + b"\0" + off + b"\0"
        if mtype in (10, 17):                           # GET_DOMAIN_PATH, IS_INTRODUCED
            return rng.choice((b"0\0", b"3\0", b"32752\0", b"65535\0", b"65536\0", b"-1\0",
                               b"\0", b"1" * 50 + b"\0", b"3"))
        if mtype == 0:                                  # CONTROL
            return rng.choice((b"help\0", b"quota\0", b"quota\x003\0", b"quota\0set\0nodes\0"
                               b"5\0", b"quota\0set\0nope\x005\0",
                               b"quota\0set\0nodes\0" + b"9" * 40 + b"\0", b"print\0hi\0",
                               b"check\0", b"nope\0", b"\0", b"quota\x0099999999\0"))
        if mtype == 6:                                  # TRANSACTION_START
            return rng.choice((b"\0", b"", b"x\0"))
        return path + (b"\0" if rng.random() < 0.9 else b"")

    def xs_scenario(self) -> None:
        rng = self.rng
        conn = XsConn(self, rng.choice(FUZZ_DOMAINS))
        self.xs_conns.append(conn)
        try:
            for _ in range(rng.randint(1, 40)):
                if not conn.open:
                    break
                self.xs_step(conn)
        finally:
            conn.close()
            self.xs_conns.remove(conn)

    def xs_step(self, conn: XsConn) -> None:
        rng = self.rng
        burst = rng.choice((1, 1, 1, 1, 2, 5))
        sent: list[tuple[int, int]] = []
        data = b""
        for _ in range(burst):
            mtype = rng.choice((1, 2, 3, 4, 5, 6, 7, 10, 11, 11, 12, 13, 13, 14, 17, 21, 22, 0,
                                8, 9, 15, 16, 18, 19, 20, 23, 999, 0xFFFFFFFF))
            req_id = rng.choice((0, 1, 7, 0xFFFFFFFF, rng.getrandbits(32)))
            if any(r == req_id for r, _ in sent):
                continue
            tx = 0
            r = rng.random()
            if conn.txs and r < 0.4:
                tx = rng.choice(conn.txs)
            elif r < 0.5:
                tx = self.u32()
            payload = self.xs_payload(conn, mtype)
            length = None
            if len(payload) > XS_PAYLOAD_MAX or rng.random() < 0.01:
                # A header that lies: too long is cut off at once, and a
                # shorter payload than announced leaves the daemon waiting.
                length = rng.choice((XS_PAYLOAD_MAX + 1, 0xFFFFFFFF, len(payload) + 10))
                data += conn.send(mtype, req_id, tx, payload, length)
                if conn.write(data, chunked=rng.random() < 0.3) and length > XS_PAYLOAD_MAX:
                    self.expect_cut_off(conn)
                conn.close()
                return
            data += conn.send(mtype, req_id, tx, payload)
            sent.append((req_id, mtype))
        if not conn.write(data, chunked=rng.random() < 0.3):
            return
        for req_id, mtype in sent:
            reply = conn.reply(req_id, mtype)
            if reply is None:
                raise FuzzFailure(f"xenstored cut off a client that sent well-framed "
                                  f"messages (last type {mtype})")
            rtype, payload = reply
            if mtype == 6 and rtype == 6:
                with contextlib.suppress(ValueError):
                    conn.txs.append(int(payload.rstrip(b"\0")))

    def expect_cut_off(self, conn: XsConn) -> None:
        ready, _, _ = select.select([conn.sock], [], [], HANG_SECONDS)
        if not ready:
            raise FuzzFailure("xenstored kept a client that announced an oversized message")
        with contextlib.suppress(OSError):
            while conn.sock.recv(65536):
                ready, _, _ = select.select([conn.sock], [], [], HANG_SECONDS)
                if not ready:
                    raise FuzzFailure("xenstored kept a client that announced an "
                                      "oversized message")

    # -- checks ----------------------------------------------------------------------

    def check_alive(self) -> None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("Z", "X", "gone"):
            raise FuzzFailure(f"the daemon (pid {self.pid}) died")

    def canary(self) -> None:
        """A well-behaved pair of domains still gets everything done."""
        self.stats.canary_checks += 1
        a_shr = HvConn(self)
        b_tab = HvConn(self)
        a_ev, b_ev = HvConn(self), HvConn(self)
        opened = [a_shr, b_tab, a_ev, b_ev]
        fds: list[int] = []
        try:
            ok = a_shr.hello(CANARY[0], KIND_GNTSHR) and b_tab.hello(CANARY[1], KIND_GNTTAB) \
                and a_ev.hello(CANARY[0], KIND_EVTCHN) and b_ev.hello(CANARY[1], KIND_EVTCHN)
            if not ok:
                raise FuzzFailure("the daemon refused the canary's HELLO")
            r = a_ev.request(BIND_UNBOUND, struct.pack("<I", CANARY[1]))
            if r is None or r[0] < 0:
                raise FuzzFailure(f"canary: bind_unbound failed: {r}")
            (port,) = struct.unpack("<I", r[1])
            fds += r[2]
            r = b_ev.request(BIND_INTERDOMAIN, struct.pack("<II", CANARY[0], port))
            if r is None or r[0] < 0:
                raise FuzzFailure(f"canary: bind_interdomain failed: {r}")
            fds += r[2]
            r = a_shr.request(SHARE, struct.pack("<IIIii", CANARY[1], 1, 1, 0, port))
            if r is None or r[0] < 0:
                raise FuzzFailure(f"canary: share failed: {r}")
            memfd, token = r[2]
            fds += [memfd, token]
            (ref,) = struct.unpack_from("<I", r[1], 8)
            os.pwrite(memfd, b"canary", 0)
            r = b_tab.request(MAP, struct.pack("<IIiiII", 1, 1, -1, -1, CANARY[0], ref))
            if r is None or r[0] < 0:
                raise FuzzFailure(f"canary: map failed: {r}")
            fds += r[2]
            _, _, index, _, offset = SEG.unpack_from(r[1], 16)
            if os.pread(r[2][index], 6, offset) != b"canary":
                raise FuzzFailure("canary: the mapping does not show the shared page")
            xs = XsConn(self, 0)
            try:
                xs.write(xs.send(11, 1, 0, b"/canary\0ok"))
                if xs.reply(1, 11) != (11, b"OK\0"):
                    raise FuzzFailure("canary: XenStore write failed")
                xs.write(xs.send(2, 2, 0, b"/canary\0"))
                if xs.reply(2, 2) != (2, b"ok"):
                    raise FuzzFailure("canary: XenStore read failed")
            finally:
                xs.close()
        finally:
            _close_all(fds)
            for c in opened:
                c.close()

    def resources(self) -> dict[str, Any]:
        status = self.control({"cmd": "status"})
        if status is None:
            raise FuzzFailure("the daemon refused a status request")
        return status

    def check_leaks(self) -> None:
        """Nothing a finished client held is left (the daemon settles tokens at once)."""
        self.stats.leak_checks += 1
        deadline = time.monotonic() + 2.0
        while True:
            st = self.resources()
            problems = []
            if st["maps"]:
                problems.append(f"{st['maps']} shares/mappings")
            for d in st["domains"]:
                if d["domid"] != 0 and d["alive"]:
                    problems.append(f"domain {d['domid']} still alive")
                if d["granted_pages"] or d["ports"] or d["shares"] or d["mappings"]:
                    problems.append(f"domain {d['domid']}: {d['granted_pages']} granted pages, "
                                    f"{len(d['ports'])} ports")
            xs = st["xenstore"]
            if xs["watches"] or xs["transactions"]:
                problems.append(f"xenstore: {xs['watches']} watches, "
                                f"{xs['transactions']} transactions")
            if st["connections"] > 1:
                problems.append(f"{st['connections']} hypervisor connections")
            # Each domain that ever lived keeps its XenStore socket (by design).
            allowed = self.baseline_fds + self.xs_sockets() - self.baseline_sockets + 4
            if st["open_fds"] > allowed:
                problems.append(f"{st['open_fds']} descriptors open in the daemon "
                                f"(baseline {self.baseline_fds}, allowed {allowed})")
            if not problems:
                return
            if time.monotonic() > deadline:
                raise FuzzFailure("left behind after every fuzzing client went: "
                                  + "; ".join(problems))
            time.sleep(0.05)

    def check_log(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        for marker in ("Traceback", "Exception in callback", " ERROR "):
            at = text.find(marker)
            if at >= 0:
                raise FuzzFailure(f"the daemon's log has {marker!r}:\n"
                                  f"{text[max(0, at - 2000):at + 3000]}")

    # -- the run ---------------------------------------------------------------------

    def setup(self) -> None:
        for domid in (*FUZZ_DOMAINS, *CANARY):
            self.xs_path(domid)
        self.canary()
        time.sleep(0.1)
        self.baseline_fds = self.resources()["open_fds"]
        self.baseline_sockets = self.xs_sockets()

    def xs_sockets(self) -> int:
        return len(list((self.dir / "xenstore").glob("*.sock")))

    def run(self, seconds: float) -> Stats:
        self.setup()
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            scenario = self.rng.choice((self.hv_scenario, self.hv_scenario, self.xs_scenario))
            self.trace.append({"scenario": n, "kind": scenario.__name__})
            try:
                scenario()
                self.check_alive()
                self.canary()
                if n % 10 == 9:
                    # The messages since the last clean check are what a failure needs.
                    self.check_leaks()
                    self.check_log()
                    self.trace = []
            except FuzzFailure as exc:
                raise FuzzFailure(f"{exc}\n(seed {self.seed}, scenario {n}: the messages "
                                  f"since the last clean check are in {self.dump()})") from None
            except OSError as exc:
                raise FuzzFailure(f"{exc!r} talking to the daemon (seed {self.seed}, "
                                  f"scenario {n}: its messages are in {self.dump()})") from exc
            finally:
                self.end_hv()
                for c in self.xs_conns:
                    c.close()
                self.xs_conns.clear()
            n += 1
            self.stats.scenarios = n
        self.check_leaks()
        self.check_log()
        return self.stats

    def dump(self) -> Path:
        path = self.artifacts / f"sim-fuzz-seed{self.seed}-scenario{self.stats.scenarios}.jsonl"
        with open(path, "w") as f:
            for entry in self.trace:
                f.write(json.dumps(entry) + "\n")
        return path


# -- a daemon of its own ---------------------------------------------------------------


@contextlib.contextmanager
def private_daemon(directory: Path, preexec: Any = None) -> Iterator[tuple[int, Path]]:
    """A daemon in ``directory`` for the run (its pid and log), stopped afterwards
    (SIGTERM; SIGKILL after 10 s).  ``preexec`` runs in the child before it starts."""
    log = directory / "fuzz-daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vchan.sim.hypervisor", "--dir",
                                 str(directory)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, preexec_fn=preexec)
    try:
        deadline = time.monotonic() + 30
        sock = directory / "hypervisor.sock"
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FuzzFailure(f"the daemon did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield proc.pid, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.send(HDR.pack(HELLO, 16) + struct.pack("<IIII", VS_VERSION, 0, 0, 0))
            return len(s.recv(64)) >= REPLY.size
    except OSError:
        return False


def fuzz(seconds: float, seed: int, workdir: Path) -> Stats:
    """Fuzz a private daemon in ``workdir`` for ``seconds``; raises :class:`FuzzFailure`."""
    directory = workdir / "sim"
    directory.mkdir(parents=True, exist_ok=True)
    with private_daemon(directory) as (pid, log):
        return Fuzzer(directory, pid, log, seed, artifacts=workdir).run(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the daemon runs and failing inputs go (default: a "
                             "temporary directory)")
    args = parser.parse_args()
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sim-fuzz-"))
    print(f"sim_fuzz: seed {seed}, {args.seconds} s, in {workdir}", flush=True)
    try:
        stats = fuzz(args.seconds, seed, workdir)
    except FuzzFailure as exc:
        print(f"sim_fuzz: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
