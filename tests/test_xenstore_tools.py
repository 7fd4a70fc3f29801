"""Debian's own xenstore-* tools (xenstore-utils) against the emulated xenstored.

The tools are unmodified ``libxenstore`` programs: ``XENSTORED_PATH`` names
the emulator's socket of the domain they play.  A domain other than 0 exists
only while a process of it is connected, so those tests keep one alive
(``keeper``) while the tools come and go.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from domains import DomainProcess
from procs import Proc

from vchan import sim
from vchan.xenstore import Perm, XenStoreSync

TOOLS = ("xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm",
         "xenstore-exists", "xenstore-chmod", "xenstore-watch")
_domids = itertools.count(400)


@pytest.fixture(autouse=True)
def _tools(monkeypatch: pytest.MonkeyPatch) -> None:
    support.need(all(shutil.which(t) for t in TOOLS),
                 "Debian's xenstore-utils (apt-get install xenstore-utils)")
    monkeypatch.delenv("XENSTORED_PATH", raising=False)


def socket_of(sim_dir: Path, domid: int) -> str:
    path: str = sim.control({"cmd": "xenstore-socket", "domid": domid}, sim_dir)["path"]
    return path


def tool(sim_dir: Path, domid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a xenstore-* tool as a process of ``domid``."""
    env = dict(os.environ, XENSTORED_PATH=socket_of(sim_dir, domid))
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=10,
                          check=False)


def ok(sim_dir: Path, domid: int, *argv: str) -> str:
    done = tool(sim_dir, domid, *argv)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def fails(sim_dir: Path, domid: int, *argv: str) -> str:
    done = tool(sim_dir, domid, *argv)
    assert done.returncode != 0, f"{argv} succeeded: {done.stdout}"
    return done.stderr


@pytest.fixture
def base(sim_dir: Path) -> str:
    return f"/local/domain/0/data/tools-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keeper(sim_dir: Path) -> Iterator[DomainProcess]:
    """A process that keeps a fresh domain alive (by holding a XenStore connection)."""
    with DomainProcess(next(_domids)) as proc:
        proc("from vchan.xenstore import XenStoreSync\nxs = XenStoreSync()\nxs.read('domid')")
        yield proc


def xenstore_watch(sim_dir: Path, domid: int, *paths: str, count: int = -1) -> Proc:
    """``xenstore-watch`` running in the background as a process of ``domid``;
    read its lines one by one (``line(5)``), close it when done."""
    argv = ["xenstore-watch", *(["-n", str(count)] if count > 0 else []), *paths]
    return Proc(argv, env={"XENSTORED_PATH": socket_of(sim_dir, domid)},
                stdin=subprocess.DEVNULL, grace=0)


def test_dom0_write_read_list_ls_exists_rm(sim_dir: Path, base: str) -> None:
    ok(sim_dir, 0, "xenstore-write", f"{base}/a", "1", f"{base}/b/c", "two words")
    assert ok(sim_dir, 0, "xenstore-read", f"{base}/a", f"{base}/b/c") == "1\ntwo words\n"
    assert ok(sim_dir, 0, "xenstore-list", base) == "a\nb\n"
    listing = ok(sim_dir, 0, "xenstore-ls", "-p", base)
    assert 'a = "1"' in listing and "(n0)" in listing and 'c = "two words"' in listing
    assert tool(sim_dir, 0, "xenstore-exists", f"{base}/b/c").returncode == 0
    ok(sim_dir, 0, "xenstore-rm", f"{base}/b")
    assert tool(sim_dir, 0, "xenstore-exists", f"{base}/b/c").returncode == 1
    assert "couldn't read path" in fails(sim_dir, 0, "xenstore-read", f"{base}/b")
    ok(sim_dir, 0, "xenstore-rm", "-t", f"{base}/a")       # -t: and empty parents
    assert tool(sim_dir, 0, "xenstore-exists", base).returncode == 1
    # The whole store, as a real dom0 sees it.
    tree = ok(sim_dir, 0, "xenstore-ls", "/")
    assert "tool = " in tree and "local = " in tree and 'name = "Domain-0"' in tree


def test_large_directories_are_listed_in_parts(sim_dir: Path, base: str) -> None:
    names = [f"child-{i:05d}-{'x' * 20}" for i in range(300)]    # ~9 KiB: DIRECTORY_PART

    def make(tx: Any) -> None:
        for name in names:
            tx.mkdir(f"{base}/{name}")

    with XenStoreSync() as xs:
        xs.transact(make)
    assert ok(sim_dir, 0, "xenstore-list", base).split() == names


def test_tools_and_our_client_see_each_other(sim_dir: Path, base: str) -> None:
    with XenStoreSync() as xs:
        xs.write(f"{base}/from-client", "hello")
        assert ok(sim_dir, 0, "xenstore-read", f"{base}/from-client") == "hello\n"
        with xs.watch(base) as watch:
            assert watch.wait(2).path == base
            ok(sim_dir, 0, "xenstore-write", f"{base}/from-tool", "hi")
            assert watch.wait(2).path == f"{base}/from-tool"
        assert xs.read(f"{base}/from-tool") == b"hi"


def test_guest_tools_use_relative_paths_and_are_denied_elsewhere(
        sim_dir: Path, base: str, keeper: DomainProcess) -> None:
    d = keeper.domid
    ok(sim_dir, d, "xenstore-write", "data/x", "guest")
    assert ok(sim_dir, d, "xenstore-read", "data/x") == "guest\n"
    assert ok(sim_dir, d, "xenstore-read", "domid") == f"{d}\n"
    assert ok(sim_dir, 0, "xenstore-read", f"/local/domain/{d}/data/x") == "guest\n"
    ok(sim_dir, 0, "xenstore-write", f"{base}/private", "dom0 only")
    assert "couldn't read path" in fails(sim_dir, d, "xenstore-read", f"{base}/private")
    assert "Permission denied" in fails(sim_dir, d, "xenstore-ls", "/local/domain/0")
    assert "Permission denied" in fails(sim_dir, d, "xenstore-ls", "/")
    fails(sim_dir, d, "xenstore-write", f"{base}/private", "guest was here")
    fails(sim_dir, d, "xenstore-rm", f"{base}/private")
    fails(sim_dir, d, "xenstore-chmod", f"{base}/private", f"b{d}")
    assert ok(sim_dir, 0, "xenstore-read", f"{base}/private") == "dom0 only\n"


def test_chmod_grants_and_revokes_access_between_domains(
        sim_dir: Path, base: str, keeper: DomainProcess) -> None:
    d = keeper.domid
    ok(sim_dir, 0, "xenstore-write", f"{base}/t/a", "A", f"{base}/t/b", "B")
    ok(sim_dir, 0, "xenstore-chmod", "-r", f"{base}/t", "n0", f"r{d}")   # recursive
    assert ok(sim_dir, d, "xenstore-read", f"{base}/t/a", f"{base}/t/b") == "A\nB\n"
    assert f"(n0,r{d})" in ok(sim_dir, 0, "xenstore-ls", "-p", f"{base}/t")
    fails(sim_dir, d, "xenstore-write", f"{base}/t/a", "no")            # read only
    ok(sim_dir, 0, "xenstore-chmod", f"{base}/t/a", "n0", f"b{d}")
    ok(sim_dir, d, "xenstore-write", f"{base}/t/a", "yes")
    assert ok(sim_dir, 0, "xenstore-read", f"{base}/t/a") == "yes\n"
    ok(sim_dir, 0, "xenstore-chmod", f"{base}/t/b", "n0")                # revoke
    fails(sim_dir, d, "xenstore-read", f"{base}/t/b")
    # Give the guest a node: it may then set its permissions, but not its owner.
    ok(sim_dir, 0, "xenstore-chmod", f"{base}/t/a", f"n{d}")
    ok(sim_dir, d, "xenstore-chmod", f"{base}/t/a", f"n{d}", "r0")
    fails(sim_dir, d, "xenstore-chmod", f"{base}/t/a", "n0")
    with XenStoreSync() as xs:
        assert xs.get_perms(f"{base}/t/a") == [Perm(d, "n"), Perm(0, "r")]


def test_xenstore_watch_reports_create_change_and_delete(sim_dir: Path, base: str) -> None:
    watcher = xenstore_watch(sim_dir, 0, f"{base}/w", count=5)
    try:
        assert watcher.line(5) == f"{base}/w"               # fired once when set
        ok(sim_dir, 0, "xenstore-write", f"{base}/w", "created")
        assert watcher.line(5) == f"{base}/w"
        ok(sim_dir, 0, "xenstore-write", f"{base}/w", "changed")
        assert watcher.line(5) == f"{base}/w"
        ok(sim_dir, 0, "xenstore-write", f"{base}/w/child", "below")
        assert watcher.line(5) == f"{base}/w/child"
        ok(sim_dir, 0, "xenstore-write", f"{base}/other", "elsewhere")
        ok(sim_dir, 0, "xenstore-rm", f"{base}/w")
        assert watcher.line(5) == f"{base}/w"
        assert watcher.wait(5) == 0                     # -n 5: done
    finally:
        watcher.close()


def test_guest_watches_only_what_it_may_read(sim_dir: Path, base: str,
                                             keeper: DomainProcess) -> None:
    d = keeper.domid
    ok(sim_dir, 0, "xenstore-write", f"{base}/n", "0")
    watcher = xenstore_watch(sim_dir, d, f"{base}/n")
    try:
        assert watcher.line(5) == f"{base}/n"
        ok(sim_dir, 0, "xenstore-write", f"{base}/n", "1")  # unreadable for d: nothing
        assert watcher.quiet()
        ok(sim_dir, 0, "xenstore-chmod", f"{base}/n", "n0", f"r{d}")
        assert watcher.line(5) == f"{base}/n"
        ok(sim_dir, 0, "xenstore-write", f"{base}/n", "2")
        assert watcher.line(5) == f"{base}/n"
    finally:
        watcher.close()


def test_xenstore_watch_sees_domains_go(sim_dir: Path) -> None:
    domain = DomainProcess(next(_domids))
    mine = f"@releaseDomain/{domain.domid}"
    watcher = xenstore_watch(sim_dir, 0, "@releaseDomain", mine)
    try:
        assert {watcher.line(5), watcher.line(5)} == {"@releaseDomain", mine}
        domain("from vchan.xenstore import XenStoreSync\nxs = XenStoreSync()\n"
               "xs.write('data/x', '1')")
        assert ok(sim_dir, 0, "xenstore-read", f"/local/domain/{domain.domid}/data/x") == "1\n"
        domain.kill(signal.SIGKILL)
        domain.wait()
        seen: list[str] = []
        while not seen or seen[-1] != mine:     # other domains' releases may come first
            seen.append(watcher.line(5))
        assert "@releaseDomain" in seen          # fired just before the domain's own
        assert tool(sim_dir, 0, "xenstore-exists",
                    f"/local/domain/{domain.domid}").returncode == 1
    finally:
        domain.close()
        watcher.close()


def test_quotas_are_set_with_vchan_sim_set(sim_dir: Path, keeper: DomainProcess) -> None:
    def vchan(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vchan", "sim", *argv],
                              capture_output=True, text=True, timeout=30, check=False,
                              env=dict(os.environ, VCHAN_SIM_DIR=str(sim_dir)))

    d = keeper.domid
    done = vchan("set", "xenstore-quota-watches", "2")
    assert done.returncode == 0 and "xenstore-quota-watches = 2" in done.stdout
    try:
        watcher = xenstore_watch(sim_dir, d, "data/a", "data/b", "data/c")
        try:
            assert watcher.wait(5) == 1
            assert "Unable to add watch on data/c" in watcher.stderr
        finally:
            watcher.close()
    finally:
        assert vchan("set", "xenstore-quota-watches", "128").returncode == 0
    bad = vchan("set", "xenstore-quota-bogus", "1")
    assert bad.returncode == 2 and "unknown setting" in bad.stderr
    assert "xenstore-quota-transactions" in bad.stderr and "grant-limit" in bad.stderr
    bad = vchan("set", "xenstore-quota-nodes", "many")
    assert bad.returncode == 2 and "must be a number" in bad.stderr

