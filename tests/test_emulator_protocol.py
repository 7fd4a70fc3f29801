"""The emulator daemon's own protocols against hostile clients.

The daemon believes nothing a client sends it: every field of every
hypervisor request (docs/sim-protocol.md, "Validation") and every XenStore
message is checked and answered with an errno, never an exception inside the
daemon, and a refused request leaves nothing behind.  Two kinds of test:

* the fuzzer, ``tests/fuzz/sim_fuzz.py``, against a private daemon over its
  real sockets: ``VCHAN_SIM_FUZZ_SECONDS`` (default 10) in the default suite,
  ``VCHAN_SOAK_SECONDS`` with ``--soak`` (CI's soak step runs that, shortened
  to 60 s); any rule broken -- an EIO, a hang, the daemon gone, the canary
  client failing, anything left behind, a traceback in the daemon's log -- is
  a failure that names the seed and writes the messages that led to it;
* one test per bug the fuzzer found, each on the smallest input that showed it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import random
import resource
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support import soak_seconds

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
FUZZ_SECONDS = float(os.environ.get("VCHAN_SIM_FUZZ_SECONDS", "10"))


def _load_fuzzer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vchan_sim_fuzz", FUZZ_DIR / "sim_fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


fz = _load_fuzzer()


def _short_dir() -> Path:
    # Unix socket paths are limited to 107 bytes: keep the state directory short.
    return Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))


def _fuzz(seconds: float) -> None:
    seed = int(os.environ.get("VCHAN_SIM_FUZZ_SEED", random.randrange(1 << 32)))
    workdir = _short_dir()
    try:
        started = time.monotonic()
        stats = fz.fuzz(seconds, seed, workdir)
    except fz.FuzzFailure as exc:
        pytest.fail(f"sim_fuzz (seed {seed}; replay: python tests/fuzz/sim_fuzz.py --seed "
                    f"{seed} --seconds {seconds:g}): {exc}", pytrace=False)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nsim_fuzz: seed {seed}, {stats.scenarios} scenarios, {stats.hv_messages} "
          f"hypervisor and {stats.xs_messages} XenStore messages in "
          f"{time.monotonic() - started:.1f} s; {stats.canary_checks} canary and "
          f"{stats.leak_checks} leak checks; refusals: {json.dumps(stats.replies_error)}")
    assert stats.scenarios > 0


@pytest.mark.timeout(int(FUZZ_SECONDS) + 120)
def test_the_daemon_survives_fuzzing_of_both_its_protocols() -> None:
    _fuzz(FUZZ_SECONDS)


@pytest.mark.soak
@pytest.mark.timeout(int(soak_seconds()) + 240)
def test_the_daemon_survives_fuzzing_of_both_its_protocols_soak() -> None:
    """The same for VCHAN_SOAK_SECONDS (run with --soak; CI runs it for 60 s)."""
    _fuzz(soak_seconds())


# -- one source for the protocol's numbers -------------------------------------------------


def test_python_takes_the_protocol_from_the_c_header() -> None:
    """kernel/sim_proto.h is the one place the numbers are written: vchan.sim.protocol
    reads them through the cffi build, its struct layouts pack what the header's
    structs hold, and the fuzzer (a client on its own, importing nothing of vchan)
    agrees with both."""
    from vchan._native import ffi

    from vchan.sim import protocol as p

    layouts = [
        ("struct vs_request", p.REQUEST, {"op": 7, "len": 0x01020304}),
        ("struct vs_reply", p.REPLY, {"status": -errno.EINVAL, "len": 0x01020304}),
        ("struct vs_segment", p.SEGMENT,
         {"first": 1, "npages": 2, "fd": 3, "pad": 4, "offset": 0x0102030405060708}),
    ]
    for cname, layout, fields in layouts:
        c = ffi.new(f"{cname} *", fields)
        assert bytes(ffi.buffer(c)) == layout.pack(*fields.values()), cname
    ops = (p.VS_HELLO, p.VS_GNT_SHARE, p.VS_GNT_MAP, p.VS_GNT_RELEASE, p.VS_EVT_BIND_UNBOUND,
           p.VS_EVT_BIND_INTERDOMAIN, p.VS_EVT_UNBIND, p.VS_CONTROL)
    assert ops == fz.OPS
    assert (fz.VS_VERSION, fz.MAX_MSG) == (p.VS_VERSION, p.VS_MAX_MSG)
    assert (fz.KIND_CONTROL, fz.KIND_GNTSHR, fz.KIND_GNTTAB, fz.KIND_EVTCHN) == \
        (p.KIND_CONTROL, p.KIND_GNTSHR, p.KIND_GNTTAB, p.KIND_EVTCHN)
    assert (fz.HDR.format, fz.REPLY.format, fz.SEG.format) == \
        (p.REQUEST.format, p.REPLY.format, p.SEGMENT.format)


# -- one test per bug --------------------------------------------------------------------


class Daemon:
    """A private daemon and raw clients of it (the fuzzer's, which check every reply)."""

    def __init__(self, directory: Path, pid: int, log: Path) -> None:
        self.dir, self.pid, self.log = directory, pid, log
        self.fuzzer = fz.Fuzzer(directory, pid, log, seed=0)

    def conn(self, domid: int, kind: int) -> Any:
        c = fz.HvConn(self.fuzzer)
        assert c.hello(domid, kind)
        return c

    def status(self) -> dict[str, Any]:
        return self.fuzzer.resources()  # type: ignore[no-any-return]

    def domain(self, domid: int) -> dict[str, Any] | None:
        return next((d for d in self.status()["domains"] if d["domid"] == domid), None)

    def check_log(self) -> None:
        self.fuzzer.check_log()


@contextlib.contextmanager
def _daemon(preexec: Any = None) -> Iterator[Daemon]:
    directory = _short_dir()
    try:
        with fz.private_daemon(directory, preexec) as (pid, log):
            yield Daemon(directory, pid, log)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with _daemon() as d:
        yield d


def _status_of(reply: Any) -> int:
    assert reply is not None, "the daemon hung up"
    return int(reply[0])


def test_a_notify_offset_outside_the_pages_is_einval_and_leaves_nothing(
        daemon: Daemon) -> None:
    """It was taken as is and, when the last user went, raised IndexError in the
    daemon's loop: the unmap notification never fired and the grants were never
    ended.  Now: EINVAL, for a share and for a mapping, and nothing allocated."""
    shr = daemon.conn(3, fz.KIND_GNTSHR)
    tab = daemon.conn(4, fz.KIND_GNTTAB)
    ev = daemon.conn(3, fz.KIND_EVTCHN)
    for offset in (4096, 4097, 1 << 30, (1 << 31) - 1, -2, -(1 << 31)):
        assert _status_of(shr.request(fz.SHARE, struct.pack("<IIIii", 4, 1, 1, offset, -1))) \
            == -errno.EINVAL, offset
    dom = daemon.domain(3)
    assert dom is None or (dom["granted_pages"] == 0 and dom["shares"] == 0)
    # A good share; a mapping of it with a bad offset is refused the same way.
    status, payload, fds = shr.request(fz.SHARE, struct.pack("<IIIii", 4, 2, 1, 8191, -1))
    assert status == 0
    memfd, token = fds
    (ref0, ref1) = struct.unpack_from("<II", payload, 8)
    for offset in (8192, -2):
        assert _status_of(tab.request(fz.MAP, struct.pack("<IIiiIIII", 2, 1, offset, -1,
                                                           3, ref0, 3, ref1))) \
            == -errno.EINVAL
    assert daemon.status()["maps"] == 1         # the share only
    # The last byte is inside: when the sharer lets go, it is cleared.
    os.pwrite(memfd, b"\x01", 8191)
    os.close(token)
    assert _status_of(shr.request(fz.RELEASE, payload[:8])) == 0
    assert os.pread(memfd, 1, 8191) == b"\0"
    os.close(memfd)
    assert daemon.status()["maps"] == 0
    for c in (shr, tab, ev):
        c.close()
    daemon.check_log()


def test_a_second_hello_is_eisconn_and_the_domain_goes_with_its_connection(
        daemon: Daemon) -> None:
    """A second HELLO re-labelled the connection: the first domain kept it for
    ever (alive with no process), the second got it too."""
    c = daemon.conn(3, fz.KIND_EVTCHN)
    reply = c.request(fz.HELLO, struct.pack("<IIII", 1, 4, fz.KIND_GNTSHR, 1))
    assert _status_of(reply) == -errno.EISCONN
    assert daemon.domain(3)["alive"]            # type: ignore[index]
    assert daemon.domain(4) is None
    c.close()
    deadline = time.monotonic() + 5
    while daemon.domain(3) is not None:
        assert time.monotonic() < deadline, daemon.domain(3)
        time.sleep(0.02)


def test_every_request_of_the_wrong_length_is_einval(daemon: Daemon) -> None:
    """Short bodies raised struct.error (EINVAL by luck); long ones were
    accepted with their tails ignored.  Each operation takes exactly its length."""
    bodies = {
        fz.SHARE: (fz.KIND_GNTSHR, struct.pack("<IIIii", 4, 1, 1, -1, -1)),
        fz.MAP: (fz.KIND_GNTTAB, struct.pack("<IIiiII", 1, 1, -1, -1, 3, 8)),
        fz.RELEASE: (fz.KIND_GNTSHR, struct.pack("<Q", 1)),
        fz.BIND_UNBOUND: (fz.KIND_EVTCHN, struct.pack("<I", 4)),
        fz.BIND_INTERDOMAIN: (fz.KIND_EVTCHN, struct.pack("<II", 4, 1)),
        fz.UNBIND: (fz.KIND_EVTCHN, struct.pack("<I", 1)),
    }
    dom4 = daemon.conn(4, fz.KIND_EVTCHN)       # domain 4 exists
    for op, (kind, body) in bodies.items():
        c = daemon.conn(3, kind)
        for wrong in (body[:-1], body + b"\0", body + b"\0" * 4, b""):
            assert _status_of(c.request(op, wrong)) == -errno.EINVAL, (op, len(wrong))
        c.close()
    c = fz.HvConn(daemon.fuzzer)
    assert _status_of(c.request(fz.HELLO, struct.pack("<IIIII", 1, 3, 1, 1, 0))) \
        == -errno.EINVAL
    c.close()
    dom4.close()
    daemon.check_log()


def test_out_of_range_fields_are_einval(daemon: Daemon) -> None:
    """A flag that is not 0/1, a peer domain id beyond the real ones, a share of
    more pages than one reply can list, a port below -1."""
    shr = daemon.conn(3, fz.KIND_GNTSHR)
    for body in (struct.pack("<IIIii", 4, 1, 2, -1, -1),           # writable = 2
                 struct.pack("<IIIii", 0x7FF0, 1, 1, -1, -1),      # DOMID_SELF as a peer
                 struct.pack("<IIIii", 0xFFFFFFFF, 1, 1, -1, -1),
                 struct.pack("<IIIii", 4, 0, 1, -1, -1),           # no pages
                 struct.pack("<IIIii", 4, 1 << 20, 1, -1, -1),     # more than a reply lists
                 struct.pack("<IIIii", 4, 1, 1, -1, -2)):          # port -2
        assert _status_of(shr.request(fz.SHARE, body)) == -errno.EINVAL, body.hex()
    tab = daemon.conn(4, fz.KIND_GNTTAB)
    assert _status_of(tab.request(fz.MAP, struct.pack("<IIiiII", 1, 7, -1, -1, 3, 8))) \
        == -errno.EINVAL
    assert _status_of(tab.request(fz.MAP, struct.pack("<IIii", 0xFFFFFFFF, 1, -1, -1))) \
        == -errno.EINVAL
    for c in (shr, tab):
        c.close()
    daemon.check_log()


def test_control_requests_that_are_not_objects_or_nest_deep_are_einval(
        daemon: Daemon) -> None:
    """``[]`` raised AttributeError in the daemon (EIO), a deeply nested array
    RecursionError; both are malformed requests."""
    c = daemon.conn(0, fz.KIND_CONTROL)
    for body in (b"[]", b"7", b'"status"', b"null", b"[" * 30000 + b"]" * 30000,
                 b"\xff\xfe", b"{"):
        assert _status_of(c.request(fz.CONTROL, body)) == -errno.EINVAL, body[:20]
    assert _status_of(c.request(fz.CONTROL, b'{"cmd": "domains"}')) == 0
    c.close()
    daemon.check_log()


def test_release_works_with_more_than_1024_descriptors_open(daemon: Daemon) -> None:
    """GNT_RELEASE looked at the token with select(), which cannot take a
    descriptor >= 1024: with many shares open it answered EINVAL (and so could
    not settle a release at once, as gntalloc's accounting is)."""
    shr = daemon.conn(3, fz.KIND_GNTSHR)
    daemon.fuzzer.control({"cmd": "set", "key": "grant-limit", "value": 4096})
    held = []
    for _ in range(600):                        # a memfd and a token each, in the daemon
        status, payload, fds = shr.request(fz.SHARE, struct.pack("<IIIii", 4, 1, 1, -1, -1))
        assert status == 0
        os.close(fds[0])
        held.append((payload[:8], fds[1]))
    assert daemon.status()["open_fds"] > 1100
    mid, token = held.pop()
    copy = os.dup(token)                # another user: not released yet
    os.close(token)
    status, payload, _ = shr.request(fz.RELEASE, mid)
    assert status == 0 and struct.unpack("<I", payload) == (0,)
    os.close(copy)                      # the last one: now it is
    status, payload, _ = shr.request(fz.RELEASE, mid)
    assert status == 0                  # (settled by this or, just before, by the loop)
    assert daemon.domain(3)["granted_pages"] == 599                 # type: ignore[index]
    for _, token in held:
        os.close(token)
    shr.close()
    daemon.check_log()


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_daemon_waits_instead_of_spinning() -> None:
    """accept() failing with EMFILE left the listener readable: the loop called
    it again at once, for ever, at 100 % CPU.  Now it pauses, and serves again
    as soon as descriptors are free."""
    with _daemon(preexec=_limit_descriptors) as daemon:
        socks = []
        with contextlib.suppress(OSError):
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(0.5)
                s.connect(str(daemon.dir / "hypervisor.sock"))
                socks.append(s)
        time.sleep(0.5)                         # the daemon is out of descriptors now
        before = _cpu_seconds(daemon.pid)
        time.sleep(1.0)
        spent = _cpu_seconds(daemon.pid) - before
        assert spent < 0.5, f"the daemon spent {spent:.2f} s of CPU in 1 s with no descriptors"
        for s in socks:
            s.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                daemon.conn(3, fz.KIND_EVTCHN).close()
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "the daemon did not serve again"
                time.sleep(0.1)
        text = daemon.log.read_text()
        assert "cannot accept a connection" in text
        assert "Traceback" not in text
