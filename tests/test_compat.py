"""Byte compatibility with unmodified C libxenvchan programs, without Xen.

Debian's own binaries run on the emulated hypervisor through ``vchan sim
run``, which puts the drop-in libraries of ``kernel/compat`` (libxengnttab,
libxenevtchn, libxenctrl) first on ``LD_LIBRARY_PATH`` and points Debian's
libxenstore at the emulated xenstored.  The peer is vchan in Python
(``tests/compat_peer.py``) in another emulated domain, in its own process:

* Debian's ``vchan-socket-proxy`` (xen-utils-4.17) as server and as client,
  with small and large transfers both ways and either side closing (or
  dying);
* ``tests/c/vchan_peer.c``, linked against Debian's libxenvchan, as server
  and as client for every ring order from 10 (1 KiB) to 20 (1 MiB) in both
  directions, checking libxenvchan_is_open()'s live-byte transitions and
  that its blocking reads and writes are woken by our notifications.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import support
from procs import Children, Proc

from vchan import sim
from vchan.sim import compat
from vchan.xenstore import XenStoreSync

HERE = Path(__file__).resolve().parent
PEER = HERE / "compat_peer.py"
C_PEER = HERE / "c" / "vchan_peer.c"
PROXY = Path("/usr/lib/xen-4.17/bin/vchan-socket-proxy")
XEN_HEADERS = Path("/usr/include/xengnttab.h")
TIMEOUT = 60.0

_domids = itertools.count(600)


def _debian_lib(name: str) -> Path | None:
    for pattern in (f"/usr/lib/*/{name}", f"/lib/*/{name}", f"/usr/lib/{name}"):
        for path in Path("/").glob(pattern.lstrip("/")):
            return path
    return None


# -- prerequisites -------------------------------------------------------------


@pytest.fixture(scope="session")
def compat_libs(sim_dir: Path) -> Path:
    support.need(support.c_compiler(), "a C compiler (apt-get install gcc)")
    support.need(XEN_HEADERS.exists(), "Xen's headers (apt-get install libxen-dev)")
    return compat.build()


@pytest.fixture(scope="session")
def proxy(compat_libs: Path) -> Path:
    support.need(PROXY.exists(), "Debian's vchan-socket-proxy (apt-get install xen-utils-4.17)")
    return PROXY


@pytest.fixture(scope="session")
def c_peer(compat_libs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    support.need(_debian_lib("libxenvchan.so") and Path("/usr/include/libxenvchan.h").exists(),
                 "Debian's libxenvchan to link against (apt-get install libxen-dev)")
    out = tmp_path_factory.mktemp("cpeer") / "vchan_peer"
    cc = support.c_compiler()
    assert cc is not None
    subprocess.run([cc, "-O2", "-g", "-Wall", "-Wextra", "-o", str(out), str(C_PEER),
                    "-lxenvchan"], check=True, capture_output=True, text=True)
    return out


# -- processes -------------------------------------------------------------------


class Checked(Proc):
    """A process of these tests: a JSON report of an ``error`` fails the test."""

    def event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        answer = super().event(timeout)
        assert "error" not in answer, f"{self.name}: {answer['error']}; {self.stderr}"
        return answer


@pytest.fixture
def procs(sim_dir: Path, children: Children) -> Children:
    """The test's processes, killed and reaped at its end."""
    return children


def in_domain(procs: Children, domid: int, name: str, *argv: str | Path | int,
              lines: bool = True) -> Proc:
    """Run a program in domain ``domid`` the documented way: ``vchan sim run``."""
    p = Checked([sys.executable, "-m", "vchan", "sim", "run", "--domid", str(domid), "--",
                 *map(str, argv)], domid=domid, name=name,
                stdout="lines" if lines else "bytes", grace=0)
    procs.adopt(p)
    return p


def python_peer(procs: Children, domid: int, *argv: str | Path | int) -> Proc:
    p = Checked([sys.executable, PEER, *map(str, argv)], domid=domid,
                name=f"python peer (domain {domid})", grace=0)
    procs.adopt(p)
    assert p.expect("ready") == domid
    return p


def data_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def wait_published(path: str, timeout: float = 10.0) -> None:
    """Until a raw server has written ``path/ring-ref`` (we are domain 0)."""
    deadline = time.monotonic() + timeout
    with XenStoreSync() as xs:
        while True:
            try:
                xs.read(f"{path}/ring-ref")
                return
            except FileNotFoundError:
                assert time.monotonic() < deadline, f"nothing published at {path}"
                time.sleep(0.01)


# -- the libraries themselves --------------------------------------------------------


def _dynamic_symbols(path: Path) -> list[tuple[str, str, bool]]:
    """(name, version, defined) of a shared object's versioned dynamic symbols."""
    out = subprocess.run(["objdump", "-T", str(path)], check=True, capture_output=True,
                         text=True).stdout
    symbols = []
    for line in out.splitlines():
        m = re.search(r"\s(\*UND\*|\.\w+)\s+[0-9a-f]+\s+(?:\((\S+)\)|(\S+))\s+(\S+)$", line)
        if m:
            version = m.group(2) or m.group(3)
            symbols.append((m.group(4), version, m.group(1) != "*UND*"))
    return symbols


def test_drop_in_libraries_export_what_debian_programs_import(compat_libs: Path) -> None:
    support.need(shutil.which("objdump"), "objdump (apt-get install binutils)")
    ours = {sym[:2] for lib in compat.LIBRARIES for sym in _dynamic_symbols(compat_libs / lib)
            if sym[2]}
    users = [p for p in (_debian_lib("libxenvchan.so.4.17"), PROXY) if p and p.exists()]
    support.need(users, "Debian's libxenvchan (libxenmisc4.17)")
    imported = {sym[:2] for user in users for sym in _dynamic_symbols(user)
                if not sym[2] and sym[0].startswith(("xengnt", "xenevtchn", "xc_"))}
    assert imported, "found no imports to check"
    assert imported <= ours, f"missing: {sorted(imported - ours)}"
    # Drop-in: everything Debian's libxengnttab and libxenevtchn export.
    for lib in ("libxengnttab.so.1", "libxenevtchn.so.1"):
        debian = _debian_lib(lib)
        if debian is not None:
            theirs = {sym[:2] for sym in _dynamic_symbols(debian) if sym[2]}
            mine = {sym[:2] for sym in _dynamic_symbols(compat_libs / lib) if sym[2]}
            assert theirs == mine, f"{lib}: {sorted(theirs ^ mine)}"
    soname = subprocess.run(["objdump", "-p", str(compat_libs / "libxenctrl.so.4.17")],
                            check=True, capture_output=True, text=True).stdout
    assert re.search(r"SONAME\s+libxenctrl\.so\.4\.17", soname)


def test_sim_run_sets_up_the_domain(sim_dir: Path, compat_libs: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vchan", "sim", "run", "--domid", "7", "--",
                           "env"], capture_output=True, text=True, check=True, timeout=30)
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert env["VCHAN_DOMID"] == "7"
    assert env["VCHAN_SIM_DIR"] == str(sim_dir)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(compat_libs)
    assert env["XENSTORED_PATH"] == str(sim_dir / "xenstore" / "7.sock")
    for argv, message in ((["--", "no-such-program-here"], "no program 'no-such-program-here'"),
                          ([], "name the program"),
                          (["--domid", "40000", "true"], "--domid must be a domain id")):
        done = subprocess.run([sys.executable, "-m", "vchan", "sim", "run", *argv],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and message in done.stderr


def test_held_domain_exists_until_let_go(sim_dir: Path) -> None:
    # What `vchan sim run` hands the program, and what xc_domain_getinfo sees.
    domid = next(_domids)
    assert domid not in sim.control({"cmd": "domains"}, sim_dir)["domains"]
    held = compat.hold_domain(domid, sim_dir)
    try:
        domains = sim.control({"cmd": "domains"}, sim_dir)["domains"]
        assert domains == sorted(domains) and 0 in domains and domid in domains
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while domid in sim.control({"cmd": "domains"}, sim_dir)["domains"]:
        assert time.monotonic() < deadline, "the domain outlived its connection"
        time.sleep(0.01)


# -- vchan-socket-proxy ------------------------------------------------------------------


@pytest.mark.parametrize("size, closer", [
    (13, "python"),             # small, our client closes
    (4 << 20, "python"),        # large (through 1 KiB / 2 KiB rings), our client closes
    (4 << 20, "proxy"),         # large, the proxy closes (end of its input)
    (13, "killed"),             # the proxy dies: unmap notification
])
def test_socket_proxy_server_and_python_client(procs: Children, tmp_path: Path, proxy: Path,
                                               size: int, closer: str) -> None:
    a, b = next(_domids), next(_domids)
    path = f"/local/domain/{a}/data/vchan/{b}/proxy"
    rnd = random.Random(size)
    ours, theirs = rnd.randbytes(size), rnd.randbytes(size + 1)
    py = python_peer(procs, b, "client", a, "proxy",
                     "--send", data_file(tmp_path, "ours", ours),
                     "--expect", data_file(tmp_path, "theirs", theirs),
                     "--closer", "self" if closer == "python" else "peer", "--go-to-close")
    srv = in_domain(procs, a, "vchan-socket-proxy server", proxy, "--mode=server",
                    str(b), path, "-", lines=False)
    wait_published(path)
    py.send()
    # libxenvchan_server_init(..., 0, 0): the server reads 1 KiB, writes 2 KiB.
    assert py.expect("connected") == {"read_size": 2048, "write_size": 1024}
    srv.feed(theirs)
    assert srv.read_bytes(len(ours)) == ours            # python -> vchan -> proxy stdout
    # proxy stdin -> vchan -> python
    assert py.event() == {"received": len(theirs), "match": True}
    if closer == "python":
        py.send()                                       # close now
        assert py.expect("closed")
        assert srv.wait() == 0                          # the proxy saw us go
        assert srv.wait_eof() == ours
    else:
        if closer == "proxy":
            srv.close_stdin()
            assert srv.wait() == 0
        else:
            srv.kill()
            assert srv.wait() == -signal.SIGKILL
        answer = py.event()
        assert answer == {"eof": True, "extra": 0}      # we saw it go


@pytest.mark.parametrize("size, closer", [
    (13, "python"),
    (4 << 20, "proxy"),
])
def test_python_raw_server_and_socket_proxy_client(procs: Children, tmp_path: Path,
                                                   proxy: Path, size: int, closer: str) -> None:
    a, b = next(_domids), next(_domids)
    rnd = random.Random(size + 1)
    ours, theirs = rnd.randbytes(size), rnd.randbytes(size + 3)
    py = python_peer(procs, a, "server", b, "proxy-client",
                     "--send", data_file(tmp_path, "ours", ours),
                     "--expect", data_file(tmp_path, "theirs", theirs),
                     "--closer", "self" if closer == "python" else "peer", "--go-to-close",
                     "--read-min", "16384", "--write-min", "65536")
    cli = in_domain(procs, b, "vchan-socket-proxy client", proxy, "--mode=client",
                    str(a), f"/local/domain/{a}/data/vchan/{b}/proxy-client", "-", lines=False)
    assert py.expect("connected") == {"read_size": 16384, "write_size": 65536}
    cli.feed(theirs)
    assert cli.read_bytes(len(ours)) == ours
    assert py.event() == {"received": len(theirs), "match": True}
    if closer == "python":
        py.send()
        assert py.expect("closed")
        assert cli.wait() == 0
        assert cli.wait_eof() == ours
    else:
        cli.close_stdin()
        assert cli.wait() == 0
        assert py.event() == {"eof": True, "extra": 0}


def test_socket_proxy_client_gives_up_when_the_server_domain_goes(
        procs: Children, tmp_path: Path, proxy: Path) -> None:
    # xc_domain_getinfo (the compat libxenctrl) tells the waiting proxy that
    # the server's domain is gone.
    a, b = next(_domids), next(_domids)
    keeper = python_peer(procs, a, "client", 0, "unused", "--send", os.devnull,
                         "--expect", os.devnull, "--closer", "self")
    cli = in_domain(procs, b, "vchan-socket-proxy client", proxy, "--mode=client",
                    str(a), f"/local/domain/{a}/data/vchan/{b}/nobody", "-", lines=False)
    time.sleep(0.5)
    assert cli.poll() is None                      # waiting for a server
    keeper.close()                                      # domain a goes away
    assert cli.wait(20) == 1
    assert "vchan client init" in cli.stderr


# -- our C program on Debian's libxenvchan -------------------------------------------

# (C role, C read_min, C write_min or the Python server's read/write_min,
#  expected (C read order, C write order), who closes first)
C_CASES = [
    # C server: libxenvchan picks the orders from its read_min / write_min.
    ("server", 1024, 2048, (10, 11), "c"),
    ("server", 4096, 8192, (12, 13), "python"),
    ("server", 16384, 32768, (14, 15), "c"),
    ("server", 65536, 131072, (16, 17), "python"),
    ("server", 262144, 524288, (18, 19), "c"),
    ("server", 1 << 20, 1 << 20, (20, 20), "python"),
    # C client: our raw server picks them from its read_min / write_min
    # (its read ring is the C client's write ring).
    ("client", 1024, 2048, (11, 10), "python"),
    ("client", 4096, 8192, (13, 12), "c"),
    ("client", 16384, 32768, (15, 14), "python"),
    ("client", 65536, 131072, (17, 16), "c"),
    ("client", 262144, 524288, (19, 18), "python"),
    ("client", 1 << 20, 2048, (11, 20), "c"),
]


def test_c_cases_cross_every_order_both_ways() -> None:
    for which in (0, 1):
        assert {case[3][which] for case in C_CASES} == set(range(10, 21))


@pytest.mark.parametrize("role, read_min, write_min, orders, closer", C_CASES,
                         ids=[f"{c[0]}-{c[3][0]}-{c[3][1]}-{c[4]}-closes" for c in C_CASES])
def test_c_libxenvchan_peer(procs: Children, tmp_path: Path, c_peer: Path, role: str,
                            read_min: int, write_min: int, orders: tuple[int, int],
                            closer: str) -> None:
    c_read, c_write = (1 << orders[0]), (1 << orders[1])
    rnd = random.Random(orders[0] * 100 + orders[1])
    # Several times the rings (wrapping them) plus odd bytes.
    from_c = rnd.randbytes(3 * c_write + 1234)
    to_c = rnd.randbytes(3 * c_read + 4321)
    f_c, f_py = data_file(tmp_path, "from_c", from_c), data_file(tmp_path, "to_c", to_c)
    f_py_expect = data_file(tmp_path, "py_expect", from_c + b"DONE")
    py_closer, c_closer = ("self", "peer") if closer == "python" else ("peer", "self")
    if role == "server":
        c_dom, py_dom = next(_domids), next(_domids)
        path = f"/local/domain/{c_dom}/data/vchan/{py_dom}/cpeer"
        py = python_peer(procs, py_dom, "client", c_dom, "cpeer", "--send", f_py,
                         "--expect", f_py_expect, "--closer", py_closer)
        c = in_domain(procs, c_dom, "C server", c_peer, "server", py_dom, path,
                      read_min, write_min, f_c, f_py, c_closer)
        init = c.expect("init")
        assert init["is_open"] == 2                     # waiting for the client
        py.send()                                       # connect now
        assert c.expect("connected")["is_open"] == 1    # 2 -> 1 as the client came
    else:
        py_dom, c_dom = next(_domids), next(_domids)
        path = f"/local/domain/{py_dom}/data/vchan/{c_dom}/cpeer"
        # The client first (it retries until the ring is published): a raw
        # server waits for its peer's domain to exist.
        c = in_domain(procs, c_dom, "C client", c_peer, "client", py_dom, path,
                      f_c, f_py, c_closer)
        py = python_peer(procs, py_dom, "server", c_dom, "cpeer", "--send", f_py,
                         "--expect", f_py_expect, "--closer", py_closer,
                         "--read-min", str(read_min), "--write-min", str(write_min))
        init = c.expect("init")
        assert init["is_open"] == 1                     # the server is there
    assert (init["read_order"], init["write_order"]) == orders
    # Our side sees the same rings from the other end.
    assert py.expect("connected") == {"read_size": c_write, "write_size": c_read}
    assert c.expect("sent")["bytes"] == len(from_c)     # woken by our reads
    assert c.expect("received")["bytes"] == len(to_c)   # woken by our writes; bytes checked
    answer = py.event()
    assert answer == {"received": len(from_c) + 4, "match": True}
    if closer == "c":
        assert c.expect("closed")
        assert py.event() == {"eof": True, "extra": 0}
    else:
        assert py.event() == {"closed": True}
        assert c.expect("peer closed")["is_open"] == 0  # 1 -> 0 as we went
        assert c.expect("closed")
    assert c.wait() == 0


# -- the libraries' own rules, called directly (ctypes) ------------------------------

_LIBRARY_RULES = r"""
import ctypes, errno, fcntl, json, mmap, os
from vchan import sim

gnt = ctypes.CDLL("libxengnttab.so.1", use_errno=True)
evt = ctypes.CDLL("libxenevtchn.so.1", use_errno=True)
libc = ctypes.CDLL(None, use_errno=True)
for f in ("xengntshr_open", "xengnttab_open", "xenevtchn_open"):
    getattr(gnt if f.startswith("xengnt") else evt, f).restype = ctypes.c_void_p
gnt.xengntshr_share_pages.restype = ctypes.c_void_p
gnt.xengntshr_share_pages.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_int]
gnt.xengnttab_map_grant_refs.restype = ctypes.c_void_p
gnt.xengnttab_map_grant_refs.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int]
gnt.xengnttab_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
gnt.xengntshr_close.argtypes = gnt.xengnttab_close.argtypes = [ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
for f in ("fd", "pending", "close"):
    getattr(evt, "xenevtchn_" + f).argtypes = [ctypes.c_void_p]
evt.xenevtchn_bind_unbound_port.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
evt.xenevtchn_bind_interdomain.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
evt.xenevtchn_notify.argtypes = evt.xenevtchn_unmask.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
evt.xenevtchn_restrict.argtypes = [ctypes.c_void_p, ctypes.c_uint16]
me = int(os.environ["VCHAN_DOMID"])
out = {}

def granted():
    status = sim.control({"cmd": "status"})
    return next(d["granted_pages"] for d in status["domains"] if d["domid"] == me)

shr, tab = gnt.xengntshr_open(None, 0), gnt.xengnttab_open(None, 0)
refs = (ctypes.c_uint32 * 4)()
area = gnt.xengntshr_share_pages(shr, me, 4, refs, 1)
out["granted"] = granted()
domids = (ctypes.c_uint32 * 4)(me, me, me, me)
view = gnt.xengnttab_map_grant_refs(tab, 4, domids, refs, mmap.PROT_READ)
out["unmap_wrong_count"] = (gnt.xengnttab_unmap(tab, view, 3), ctypes.get_errno())
out["unmap"] = gnt.xengnttab_unmap(tab, view, 4)
libc.munmap(area, 4 * 4096)             # as libxenvchan does with its rings
one = (ctypes.c_uint32 * 1)()
gnt.xengntshr_share_pages(shr, me, 1, one, 1)   # the library notices here
out["granted_after_munmap"] = granted()
gnt.xengntshr_close(shr)
gnt.xengnttab_close(tab)

a, b = evt.xenevtchn_open(None, 0), evt.xenevtchn_open(None, 0)
port_a = evt.xenevtchn_bind_unbound_port(a, me)
port_b = evt.xenevtchn_bind_interdomain(b, me, port_a)
fd = evt.xenevtchn_fd(b)
fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
out["pending_nonblocking"] = (evt.xenevtchn_pending(b), ctypes.get_errno())
fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
evt.xenevtchn_notify(a, port_a)
evt.xenevtchn_notify(a, port_a)           # coalesces with the first
out["pending"] = evt.xenevtchn_pending(b) == port_b
out["unmask_foreign_port"] = evt.xenevtchn_unmask(b, 4000)
out["notify_foreign_port"] = (evt.xenevtchn_notify(b, 4000), ctypes.get_errno())
out["restrict"] = (evt.xenevtchn_restrict(a, me + 1), evt.xenevtchn_restrict(a, me + 1),
                   ctypes.get_errno())
out["bind_unbound_restricted"] = (evt.xenevtchn_bind_unbound_port(a, me), ctypes.get_errno())
evt.xenevtchn_close(a)
evt.xenevtchn_close(b)
print(json.dumps(out))
"""


def test_library_rules(sim_dir: Path, compat_libs: Path) -> None:
    domid = next(_domids)
    done = subprocess.run([sys.executable, "-m", "vchan", "sim", "run", "--domid", str(domid),
                           "--", sys.executable, "-c", _LIBRARY_RULES],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["granted"] == 4
    assert out["unmap_wrong_count"] == [-1, errno.EINVAL]    # one whole mapping only
    assert out["unmap"] == 0
    assert out["granted_after_munmap"] == 1                  # the 4 pages' grants ended
    assert out["pending_nonblocking"] == [-1, errno.EAGAIN]
    assert out["pending"] is True
    assert out["unmask_foreign_port"] == 0                   # ignored, as the driver does
    assert out["notify_foreign_port"] == [-1, errno.ENOTCONN]
    assert out["restrict"] == [0, -1, errno.EACCES]          # once per handle
    assert out["bind_unbound_restricted"] == [-1, errno.EACCES]
