"""The XenStore client and the emulator's xenstored, across real processes.

Domain 0 is this test process (privileged); other domains are real separate
processes (``domains.DomainProcess``) driving :class:`XenStoreSync`.  A fake
xenstored in the test (a plain Unix socket server) pins down what the real
one never does: answers out of order, a connection that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import os
import random
import signal
import struct
import threading
import time
import tty
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from domains import AgentError, DomainProcess

from vchan import sim
from vchan.xenstore import (
    Op,
    Perm,
    Transaction,
    TransactionConflict,
    WatchEvent,
    XenStore,
    XenStoreSync,
    error_name,
    error_number,
)

HDR = struct.Struct("=IIII")
# Each test takes its own domain ids: a domain's death is noticed by the
# daemon a moment after its process exits, and must not spill into the next test.
_domids = itertools.count(200)


@pytest.fixture(autouse=True)
def _no_xenstored_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)


@pytest.fixture
def base(sim_dir: Path) -> str:
    """A fresh directory of domain 0's tree for one test."""
    return f"/local/domain/0/data/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def xs(sim_dir: Path) -> AsyncIterator[XenStore]:
    store = await XenStore.open()
    try:
        yield store
    finally:
        await store.close()


class Domains:
    """Processes playing emulated domains, each holding a XenStoreSync ``xs``."""

    def __init__(self) -> None:
        self.procs: list[DomainProcess] = []

    def start(self, domid: int | None = None) -> DomainProcess:
        proc = DomainProcess(next(_domids) if domid is None else domid)
        self.procs.append(proc)
        # The first reply proves the daemon took the connection: from then on
        # the domain exists (and its home with it).
        proc("from vchan.xenstore import XenStoreSync, Perm\n"
             "xs = XenStoreSync()\n"
             "xs.read('domid')")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture
def domains(sim_dir: Path) -> Iterator[Domains]:
    d = Domains()
    try:
        yield d
    finally:
        d.close()


def _status(sim_dir: Path, domid: int) -> dict[str, Any] | None:
    for d in sim.control({"cmd": "status"}, sim_dir)["domains"]:
        if d["domid"] == domid:
            return dict(d)
    return None


async def _next(watch: Any, timeout: float = 5.0) -> WatchEvent:
    event: WatchEvent = await asyncio.wait_for(anext(watch), timeout)
    return event


async def _no_event(watch: Any, wait: float = 0.1) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(watch), wait)


async def _until(predicate: Callable[[], Awaitable[bool]], what: str,
                 timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the wire contract ---------------------------------------------------------------


def test_error_names_follow_xs_wire_h() -> None:
    assert error_number("ENOENT") == errno.ENOENT
    assert error_number("EQUOTA") == errno.EINVAL        # unknown names mean EINVAL
    assert error_name(errno.ENOSPC) == "ENOSPC"
    assert error_name(errno.EDQUOT) == "EINVAL"          # not in xsd_errors


def test_perm_wire_form() -> None:
    assert Perm(5, "r").to_wire() == "r5" and str(Perm(0)) == "n0"
    assert Perm.from_wire("b12") == Perm(12, "b")
    for bad in ("x1", "r", "r-1", "rx", "", "r1 "):
        with pytest.raises(ValueError):
            Perm.from_wire(bad)
    with pytest.raises(ValueError):
        Perm(1, "x")  # type: ignore[arg-type]


# -- basic operations ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_write_read_mkdir_directory_rm(xs: XenStore, base: str) -> None:
    await xs.write(f"{base}/a/b/c", "value")             # parents are made
    assert await xs.read(f"{base}/a/b/c") == b"value"
    assert await xs.read(f"{base}/a") == b""
    await xs.write(f"{base}/bin", b"\x00\xffbinary")
    assert await xs.read(f"{base}/bin") == b"\x00\xffbinary"
    await xs.mkdir(f"{base}/a/b/c")                       # leaves the value alone
    assert await xs.read(f"{base}/a/b/c") == b"value"
    await xs.mkdir(f"{base}/a/d")
    assert await xs.directory(f"{base}/a") == ["b", "d"]  # in creation order
    assert await xs.directory(f"{base}/a/d") == []
    await xs.rm(f"{base}/a")                              # the whole subtree
    with pytest.raises(FileNotFoundError):
        await xs.read(f"{base}/a/b/c")
    await xs.rm(f"{base}/a")                              # not there: fine
    with pytest.raises(FileNotFoundError):
        await xs.rm(f"{base}/no/such")                    # ... but its parent must be
    assert await xs.get_domain_path(7) == "/local/domain/7"


@pytest.mark.asyncio
async def test_errors_are_oserrors_named_after_xenstore(xs: XenStore, base: str) -> None:
    with pytest.raises(FileNotFoundError) as nf:
        await xs.read(f"{base}/missing")
    assert nf.value.errno == errno.ENOENT
    assert str(nf.value) == f"[Errno 2] xenstore READ {base}/missing: ENOENT"
    for bad in (f"{base}//x", f"{base}/x/", f"{base}/spa ce", "@releaseDomain", ""):
        with pytest.raises(OSError) as inval:
            await xs.write(bad, "x")
        assert inval.value.errno == errno.EINVAL and "EINVAL" in str(inval.value)
    with pytest.raises(OSError) as root:
        await xs.rm("/")
    assert root.value.errno == errno.EINVAL
    with pytest.raises(OSError) as big:
        await xs.write(f"{base}/big", b"x" * 4096)       # payload > 4096 with the path
    assert big.value.errno == errno.E2BIG
    with pytest.raises(FileNotFoundError, match="TRANSACTION_END"):
        await xs._request(Op.TRANSACTION_END, b"T\0", "T", 4242)   # no such transaction
    with pytest.raises(OSError) as nosys:
        await xs._request(Op.INTRODUCE, b"1\x000\x001\0", "1")
    assert nosys.value.errno == errno.ENOSYS
    w = await xs.watch(f"{base}/w", token="tok")
    with pytest.raises(FileExistsError):
        await xs.watch(f"{base}/w", token="tok")
    await w.close()
    with pytest.raises(ValueError):
        await xs.read("nul\0inside")


@pytest.mark.asyncio
async def test_reset_watches_ends_every_watch(xs: XenStore, base: str) -> None:
    watch = await xs.watch(base)
    await _next(watch)
    tx = await xs.transaction().start()
    await xs.reset_watches()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    with pytest.raises(FileNotFoundError):
        await tx.commit()                   # the transaction went too
    await watch.close()
    await xs.write(base, "x")               # and nothing fires any more


@pytest.mark.asyncio
async def test_relative_paths_resolve_against_the_domain_home(xs: XenStore, base: str,
                                                              domains: Domains) -> None:
    await xs.write("data/rel-x", "dom0")
    assert await xs.read("/local/domain/0/data/rel-x") == b"dom0"
    await xs.rm("data/rel-x")
    d = domains.start()
    d("xs.write('data/mine', 'dom-u')")
    assert await xs.read(f"/local/domain/{d.domid}/data/mine") == b"dom-u"
    assert d("xs.read('domid')") == str(d.domid)
    assert d(f"xs.get_domain_path({d.domid})") == f"/local/domain/{d.domid}"
    # A relative watch reports relative paths.
    events = d("w = xs.watch('data/mine', timeout=2); [w.wait(2)]")
    assert events == [["data/mine", events[0][1]]]
    await xs.write(f"/local/domain/{d.domid}/data/mine", "changed")
    assert d("tuple(w.wait(2))")[0] == "data/mine"


@pytest.mark.asyncio
async def test_large_directories_are_read_in_parts(xs: XenStore, base: str) -> None:
    names = [f"child-{i:05d}-{'x' * 20}" for i in range(300)]   # ~9 KiB of names

    async def make(tx: Transaction) -> None:
        for name in names:
            await tx.mkdir(f"{base}/big/{name}")

    await xs.transact(make)
    assert await xs.directory(f"{base}/big") == names
    with XenStoreSync() as sync:
        assert sync.directory(f"{base}/big") == names


# -- permissions ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_new_domain_home_follows_libxl(xs: XenStore, domains: Domains) -> None:
    d = domains.start()
    home = f"/local/domain/{d.domid}"
    assert await xs.get_perms(home) == [Perm(0, "n"), Perm(d.domid, "r")]
    assert await xs.read(f"{home}/domid") == str(d.domid).encode()
    assert await xs.get_perms(f"{home}/domid") == [Perm(0, "n"), Perm(d.domid, "r")]
    assert await xs.get_perms(f"{home}/data") == [Perm(d.domid, "n")]
    assert d("xs.read('domid')") == str(d.domid)
    with pytest.raises(AgentError) as denied:
        d("xs.write('domid', '0')")                   # readable, not writable
    assert denied.value.type == "PermissionError" and "EACCES" in denied.value.message


@pytest.mark.asyncio
async def test_permissions_between_domains(xs: XenStore, base: str, domains: Domains) -> None:
    d1, d2 = domains.start(), domains.start()
    node = f"{base}/secret"
    await xs.write(node, "for d1")
    await xs.set_perms(node, [Perm(0, "n"), Perm(d1.domid, "r")])
    assert d1(f"xs.read({node!r})") == "for d1"
    for dom, code, errname in ((d1, f"xs.write({node!r}, 'x')", "EACCES"),
                               (d2, f"xs.read({node!r})", "EACCES"),
                               (d2, f"xs.get_perms({node!r})", "EACCES"),
                               (d1, f"xs.rm({node!r})", "EACCES")):
        with pytest.raises(AgentError) as info:
            dom(code)
        assert info.value.type == "PermissionError", code
        assert info.value.errno == errno.EACCES and errname in info.value.message
    # Default access (first entry) and a per-domain override.
    await xs.set_perms(node, [Perm(0, "r"), Perm(d2.domid, "n")])
    assert d1(f"xs.read({node!r})") == "for d1"
    with pytest.raises(AgentError):
        d2(f"xs.read({node!r})")
    await xs.set_perms(node, [Perm(0, "n"), Perm(d2.domid, "b")])
    d2(f"xs.write({node!r}, 'by d2')")
    assert await xs.read(node) == b"by d2"
    # Only the owner sets permissions; only domain 0 changes the owner.
    with pytest.raises(AgentError) as info:
        d2(f"xs.set_perms({node!r}, [Perm({d2.domid}, 'b')])")
    assert info.value.errno == errno.EACCES
    await xs.set_perms(node, [Perm(d1.domid, "n")])       # domain 0 gives it to d1
    d1(f"xs.set_perms({node!r}, [Perm({d1.domid}, 'r')])")  # the owner may
    with pytest.raises(AgentError) as info:
        d1(f"xs.set_perms({node!r}, [Perm({d2.domid}, 'n')])")
    assert info.value.type == "PermissionError" and info.value.errno == errno.EPERM
    assert await xs.get_perms(node) == [Perm(d1.domid, "r")]


@pytest.mark.asyncio
async def test_created_nodes_inherit_permissions_and_belong_to_their_creator(
        xs: XenStore, base: str, domains: Domains) -> None:
    d = domains.start()
    shared = f"{base}/shared"
    await xs.mkdir(shared)
    await xs.set_perms(shared, [Perm(0, "r"), Perm(d.domid, "w")])
    d(f"xs.write({shared!r} + '/from-d/leaf', 'x')")
    owner_first = [Perm(d.domid, "r"), Perm(d.domid, "w")]
    assert await xs.get_perms(f"{shared}/from-d") == owner_first
    assert await xs.get_perms(f"{shared}/from-d/leaf") == owner_first
    await xs.write(f"{shared}/from-0", "x")               # domain 0 keeps the parent's owner
    assert await xs.get_perms(f"{shared}/from-0") == [Perm(0, "r"), Perm(d.domid, "w")]


@pytest.mark.asyncio
async def test_missing_nodes_do_not_leak_through_unreadable_parents(
        xs: XenStore, base: str, domains: Domains) -> None:
    d = domains.start()
    await xs.mkdir(f"{base}/closed")                       # n0: nothing for d
    await xs.mkdir(f"{base}/open")
    await xs.set_perms(f"{base}/open", [Perm(0, "r")])
    with pytest.raises(AgentError) as closed:
        d(f"xs.read({base!r} + '/closed/nothing')")
    assert closed.value.type == "PermissionError"
    with pytest.raises(AgentError) as opened:
        d(f"xs.read({base!r} + '/open/nothing')")
    assert opened.value.type == "FileNotFoundError"
    with pytest.raises(AgentError) as create:
        d(f"xs.write({base!r} + '/open/new', 'x')")       # creating needs write on the parent
    assert create.value.type == "PermissionError"


@pytest.mark.asyncio
async def test_watch_events_respect_permissions(xs: XenStore, base: str,
                                                domains: Domains) -> None:
    d = domains.start()
    node = f"{base}/guarded"
    await xs.write(node, "0")
    d(f"w = xs.watch({node!r}); first = w.wait(2)")       # the first event always comes
    await xs.write(node, "1")                             # d may not read it: no event
    with pytest.raises(AgentError) as info:
        d("w.wait(0.2)")
    assert info.value.type == "TimeoutError"
    await xs.set_perms(node, [Perm(0, "n"), Perm(d.domid, "r")])
    assert d("tuple(w.wait(2))")[0] == node
    await xs.write(node, "2")
    assert d("tuple(w.wait(2))")[0] == node


# -- watches ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_watch_fires_on_create_change_and_delete(xs: XenStore, base: str) -> None:
    async with await xs.watch(f"{base}/w") as watch:
        assert await _next(watch) == (f"{base}/w", watch.token)   # at once, as xenstored
        await xs.write(f"{base}/w", "created")
        assert (await _next(watch)).path == f"{base}/w"
        await xs.write(f"{base}/w", "changed")
        assert (await _next(watch)).path == f"{base}/w"
        await xs.write(f"{base}/w/child", "x")                    # below it
        assert (await _next(watch)).path == f"{base}/w/child"
        await xs.set_perms(f"{base}/w", [Perm(0, "r")])
        assert (await _next(watch)).path == f"{base}/w"
        await xs.write(f"{base}/elsewhere", "x")                  # not below it
        await xs.rm(f"{base}/w")
        assert (await _next(watch)).path == f"{base}/w"           # removal of the watched
        await _no_event(watch)                                    # ... once: children exact
        await xs.mkdir(f"{base}/w")
        assert (await _next(watch)).path == f"{base}/w"
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


@pytest.mark.asyncio
async def test_removing_a_parent_fires_watches_on_its_children(xs: XenStore,
                                                               base: str) -> None:
    await xs.write(f"{base}/p/q/r", "x")
    deep = await xs.watch(f"{base}/p/q/r")
    mid = await xs.watch(f"{base}/p/q")
    for w in (deep, mid):
        await _next(w)
    await xs.rm(f"{base}/p")
    assert (await _next(deep)).path == f"{base}/p/q/r"
    assert (await _next(mid)).path == f"{base}/p/q"
    await _no_event(mid)
    await deep.close()
    await mid.close()


@pytest.mark.asyncio
async def test_100_watches_deliver_every_event_in_order(xs: XenStore, base: str) -> None:
    n_watches, n_events = 100, 20
    watches = [await xs.watch(f"{base}/w{i}") for i in range(n_watches)]
    for w in watches:
        assert (await _next(w)).path == w.path
    order = [(i, k) for k in range(n_events) for i in range(n_watches)]
    random.Random(4).shuffle(order)
    # The writes go out all at once; XenStore serves them in order, so each
    # watch sees its own nodes in the order of its writes.
    seq = {i: 0 for i in range(n_watches)}
    writes = []
    for i, _ in order:
        writes.append(xs.write(f"{base}/w{i}/e{seq[i]:03d}", "x"))
        seq[i] += 1
    await asyncio.gather(*writes)
    for i, w in enumerate(watches):
        got = [(await _next(w)).path for _ in range(n_events)]
        assert got == [f"{base}/w{i}/e{k:03d}" for k in range(n_events)]
        assert w.pending() == 0
    await asyncio.gather(*(w.close() for w in watches))


@pytest.mark.asyncio
async def test_watches_sharing_a_token_get_their_own_events(xs: XenStore, base: str) -> None:
    a = await xs.watch(f"{base}/a", token="same")
    b = await xs.watch(f"{base}/b", token="same")
    assert (await _next(a)).path == f"{base}/a"
    assert (await _next(b)).path == f"{base}/b"
    await xs.write(f"{base}/b", "x")
    assert (await _next(b)).path == f"{base}/b"
    await _no_event(a)
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_special_watches_follow_domains_coming_and_going(xs: XenStore,
                                                               domains: Domains) -> None:
    domid = next(_domids)
    intro = await xs.watch("@introduceDomain")
    release = await xs.watch("@releaseDomain")
    release_one = await xs.watch(f"@releaseDomain/{domid}")
    for w in (intro, release, release_one):
        assert (await _next(w)).path == w.path
    d = domains.start(domid)
    assert (await _next(intro)).path == "@introduceDomain"
    await _until(lambda: _exists(xs, f"/local/domain/{domid}/domid"), "the domain's home")
    d("xs.write('data/x', '1')")
    d.kill(signal.SIGKILL)
    d.wait()
    assert (await _next(release_one)).path == f"@releaseDomain/{domid}"
    while (await _next(release)).path != "@releaseDomain":
        pass
    for w in (intro, release, release_one):
        await w.close()


async def _exists(xs: XenStore, path: str) -> bool:
    try:
        await xs.read(path)
    except FileNotFoundError:
        return False
    return True


# -- a domain dies ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dead_domain_is_released_and_its_nodes_removed(
        xs: XenStore, base: str, sim_dir: Path, domains: Domains) -> None:
    d = domains.start()
    home = f"/local/domain/{d.domid}"
    shared = f"{base}/shared"
    await xs.mkdir(shared)
    await xs.set_perms(shared, [Perm(0, "n"), Perm(d.domid, "w")])
    d(f"xs.write('data/mine', 'x'); xs.write({shared!r} + '/from-d/deep', 'y')")
    await xs.write(f"{shared}/from-0", "stays")
    assert await xs.directory(shared) == ["from-d", "from-0"]
    status = _status(sim_dir, d.domid)
    assert status is not None and status["alive"]      # a XenStore connection suffices
    assert await xs._request(Op.IS_DOMAIN_INTRODUCED, f"{d.domid}\0".encode(), "") == b"T\0"
    release = await xs.watch(f"@releaseDomain/{d.domid}")
    gone_home = await xs.watch(home)
    await _next(release)
    await _next(gone_home)
    other = domains.start()                 # any domain may watch @releaseDomain
    other(f"rw = xs.watch('@releaseDomain/{d.domid}'); rw.wait(2)")

    d.kill(signal.SIGKILL)
    d.wait()
    assert (await _next(release)).path == f"@releaseDomain/{d.domid}"
    assert other("tuple(rw.wait(5))")[0] == f"@releaseDomain/{d.domid}"
    assert (await _next(gone_home)).path.startswith(home)
    assert not await _exists(xs, home)
    assert await xs.directory(shared) == ["from-0"]     # what it owned elsewhere is gone
    assert await xs._request(Op.IS_DOMAIN_INTRODUCED, f"{d.domid}\0".encode(), "") == b"F\0"
    assert _status(sim_dir, d.domid) is None
    await release.close()
    await gone_home.close()


# -- transactions --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_transaction_conflict_is_eagain_then_the_retry_succeeds(
        xs: XenStore, domains: Domains) -> None:
    d = domains.start()
    counter = f"/local/domain/{d.domid}/data/counter"
    d("xs.write('data/counter', '0')")                # d's node; domain 0 may do anything

    # By hand: read, someone else writes, commit fails with EAGAIN.
    tx = await xs.transaction().start()
    assert await tx.read(counter) == b"0"
    d("xs.write('data/counter', '100')")               # another domain, another process
    await tx.write(counter, "1")
    with pytest.raises(TransactionConflict) as conflict:
        await tx.commit()
    assert conflict.value.errno == errno.EAGAIN and "EAGAIN" in str(conflict.value)
    assert isinstance(conflict.value, OSError)
    assert await xs.read(counter) == b"100"             # nothing of the loser was applied

    # transact(): the first attempt loses, the rerun commits.
    attempts = 0

    async def increment(tx: Transaction) -> int:
        nonlocal attempts
        attempts += 1
        value = int(await tx.read(counter))
        if attempts == 1:
            d("xs.write('data/counter', str(int(xs.read('data/counter')) + 10))")
        await tx.write(counter, str(value + 1))
        return value + 1

    assert await xs.transact(increment) == 111
    assert attempts == 2
    assert await xs.read(counter) == b"111"


@pytest.mark.asyncio
async def test_transactions_are_isolated_until_commit(xs: XenStore, base: str) -> None:
    async with await XenStore.open() as other:
        watch = await other.watch(base)
        await _next(watch)
        async with xs.transaction() as tx:
            await tx.write(f"{base}/a", "1")
            await tx.mkdir(f"{base}/b")
            assert await tx.read(f"{base}/a") == b"1"
            assert await tx.directory(base) == ["a", "b"]
            with pytest.raises(FileNotFoundError):
                await other.read(f"{base}/a")             # not visible outside yet
            await _no_event(watch)                        # nor its watches
        assert await other.read(f"{base}/a") == b"1"
        assert {(await _next(watch)).path for _ in range(2)} == {f"{base}/a", f"{base}/b"}

        with pytest.raises(RuntimeError, match="boom"):  # an exception aborts
            async with xs.transaction() as tx:
                await tx.write(f"{base}/a", "2")
                raise RuntimeError("boom")
        assert await xs.read(f"{base}/a") == b"1"
        tx = await xs.transaction().start()
        await tx.rm(f"{base}/a")
        await tx.abort()
        assert await xs.read(f"{base}/a") == b"1"
        await _no_event(watch)
        await watch.close()


@pytest.mark.asyncio
async def test_a_removal_inside_a_transaction_conflicts_with_a_write_below(
        xs: XenStore, base: str) -> None:
    await xs.write(f"{base}/t/x", "1")
    tx = await xs.transaction().start()
    await tx.rm(f"{base}/t")
    await xs.write(f"{base}/t/x", "2")
    with pytest.raises(TransactionConflict):
        await tx.commit()
    assert await xs.read(f"{base}/t/x") == b"2"


# -- quotas ------------------------------------------------------------------------------


@contextlib.contextmanager
def _quota(sim_dir: Path, name: str, value: int) -> Iterator[None]:
    key = f"xenstore-quota-{name}"
    old = sim.control({"cmd": "status"}, sim_dir)["xenstore"]["quotas"][name]
    assert sim.control({"cmd": "set", "key": key, "value": value}, sim_dir) == {key: value}
    try:
        yield
    finally:
        sim.control({"cmd": "set", "key": key, "value": old}, sim_dir)


def test_quotas_default_to_xenstored_values(sim_dir: Path) -> None:
    quotas = sim.control({"cmd": "status"}, sim_dir)["xenstore"]["quotas"]
    assert quotas == {"nodes": 1000, "watches": 128, "transactions": 10,
                      "transaction-nodes": 1024, "node-permissions": 5,
                      "node-size": 2048, "path-max": 2048}
    with pytest.raises(OSError) as bad:
        sim.control({"cmd": "set", "key": "xenstore-quota-bogus", "value": 1}, sim_dir)
    assert bad.value.errno == errno.EINVAL


def test_transaction_and_watch_quotas(sim_dir: Path, domains: Domains) -> None:
    d = domains.start()
    assert d("txs = [xs.transaction().start() for _ in range(10)]; len(txs)") == 10
    with pytest.raises(AgentError) as tx_quota:
        d("xs.transaction().start()")
    assert tx_quota.value.errno == errno.ENOSPC and "ENOSPC" in tx_quota.value.message
    d("for t in txs: t.abort()")
    assert d("ws = [xs.watch(f'data/w{i}') for i in range(128)]; len(ws)") == 128
    with pytest.raises(AgentError) as watch_quota:
        d("xs.watch('data/one-more')")
    assert watch_quota.value.errno == errno.ENOSPC
    d("for w in ws: w.close()")
    with _quota(sim_dir, "transactions", 2):
        d("a = xs.transaction().start(); b = xs.transaction().start()")
        with pytest.raises(AgentError):
            d("xs.transaction().start()")
        d("a.abort(); b.abort()")
    assert d("len([xs.transaction().start() for _ in range(3)])") == 3


def _usage(sim_dir: Path, domid: int) -> dict[str, int]:
    usage = sim.control({"cmd": "status"}, sim_dir)["xenstore"]["usage"]
    return dict(usage.get(str(domid), {"nodes": 0, "watches": 0, "transactions": 0}))


def test_watch_and_transaction_quotas_count_the_whole_domain(
        sim_dir: Path, domains: Domains) -> None:
    """xenstored charges a domain, not a connection: more connections (here two
    processes of one domain, and a second connection in one of them) give no
    more watches or transactions (issue 14: one domU held 2,560 watches over
    20 connections)."""
    a = domains.start()
    b = domains.start(a.domid)
    assert a("ws = [xs.watch(f'data/a{i}') for i in range(100)]; len(ws)") == 100
    assert b("ws = [xs.watch(f'data/b{i}') for i in range(27)]; len(ws)") == 27
    assert b("xs2 = XenStoreSync(); w2 = xs2.watch('data/b-last'); 1") == 1    # the 128th
    for proc, code in ((a, "xs.watch('data/a-more')"), (b, "xs.watch('data/b-more')"),
                       (b, "xs2.watch('data/b-more')")):
        with pytest.raises(AgentError) as over:
            proc(code)
        assert over.value.errno == errno.ENOSPC, over.value.message
    assert _usage(sim_dir, a.domid)["watches"] == 128
    # Given back by one connection, usable by another; gone with a process.
    a("ws.pop().close()")
    assert b("w3 = xs2.watch('data/b-again'); 1") == 1
    b("w2.close(); w3.close(); xs2.close()")
    a("for w in ws: w.close()")
    assert _usage(sim_dir, a.domid)["watches"] == 27

    assert a("txs = [xs.transaction().start() for _ in range(6)]; len(txs)") == 6
    assert b("txs = [xs.transaction().start() for _ in range(4)]; len(txs)") == 4
    for proc in (a, b):
        with pytest.raises(AgentError) as over:
            proc("xs.transaction().start()")
        assert over.value.errno == errno.ENOSPC, over.value.message
    assert _usage(sim_dir, a.domid)["transactions"] == 10
    b.close()                               # its watches and transactions go with it
    deadline = time.monotonic() + 5
    while _usage(sim_dir, a.domid) != {**_usage(sim_dir, a.domid), "watches": 0,
                                       "transactions": 6}:
        assert time.monotonic() < deadline, _usage(sim_dir, a.domid)
        time.sleep(0.01)
    assert a("t = xs.transaction().start(); t.abort(); 1") == 1
    a("for t in txs: t.abort()")
    assert _usage(sim_dir, a.domid)["transactions"] == 0


def test_node_quotas(sim_dir: Path, domains: Domains) -> None:
    d = domains.start()
    with pytest.raises(AgentError) as size:
        d("xs.write('data/big', b'x' * 2100)")             # node-size 2048
    assert size.value.errno == errno.ENOSPC
    with pytest.raises(AgentError) as perms:
        d(f"xs.write('data/p', ''); xs.set_perms('data/p', [Perm({d.domid}, 'n')] + "
          "[Perm(i, 'r') for i in range(1, 6)])")        # 6 entries > 5
    assert perms.value.errno == errno.ENOSPC
    with pytest.raises(AgentError) as path:
        d("xs.write('data/' + 'x' * 2100, '')")             # path-max 2048
    assert path.value.errno == errno.EINVAL
    with _quota(sim_dir, "nodes", 8):                       # it owns data, data/p (+0 home)
        d("for i in range(6): xs.write(f'data/n{i}', '')")
        with pytest.raises(AgentError) as nodes:
            d("xs.write('data/one-too-many', '')")
        assert nodes.value.errno == errno.ENOSPC
        with pytest.raises(AgentError) as in_tx:
            d("with xs.transaction() as t: t.write('data/one-too-many', '')")
        assert in_tx.value.errno == errno.ENOSPC


# -- one connection, many requests ----------------------------------------------------------


@pytest.mark.asyncio
async def test_1000_concurrent_requests_pair_their_replies(xs: XenStore, base: str) -> None:
    async def one(i: int) -> object:
        kind = i % 4
        if kind == 0:
            await xs.write(f"{base}/k{i}", f"v{i}")
            return await xs.read(f"{base}/k{i}")
        if kind == 1:
            return await xs.get_domain_path(i)
        if kind == 2:
            try:
                await xs.read(f"{base}/absent{i}")
            except FileNotFoundError as exc:
                return str(exc)
            return "no error?"
        await xs.mkdir(f"{base}/d{i}")
        return await xs.get_perms(f"{base}/d{i}")

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    for i, got in enumerate(results):
        expected = [f"v{i}".encode(), f"/local/domain/{i}",
                    f"[Errno 2] xenstore READ {base}/absent{i}: ENOENT",
                    [Perm(0, "n")]][i % 4]
        assert got == expected, i
    assert not xs._pending


class FakeXenStored:
    """A scripted XenStore on a Unix socket: ``behave`` answers each request."""

    def __init__(self, path: Path,
                 behave: Callable[[list[tuple[int, int, int, bytes]], asyncio.StreamWriter],
                                  Awaitable[bool]]) -> None:
        self.path = path
        self.behave = behave
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> FakeXenStored:
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        seen: list[tuple[int, int, int, bytes]] = []
        try:
            while True:
                header = await reader.readexactly(HDR.size)
                mtype, req_id, tx_id, length = HDR.unpack(header)
                seen.append((mtype, req_id, tx_id, await reader.readexactly(length)))
                if not await self.behave(seen, writer):
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()


def _reply(writer: asyncio.StreamWriter, mtype: int, req_id: int, payload: bytes) -> None:
    writer.write(HDR.pack(mtype, req_id, 0, len(payload)) + payload)


@pytest.mark.asyncio
async def test_replies_in_any_order_reach_their_requests(tmp_path: Path) -> None:
    async def backwards(seen: list[tuple[int, int, int, bytes]],
                        writer: asyncio.StreamWriter) -> bool:
        if len(seen) == 1000:           # all 1000 were in flight at once
            shuffled = list(seen)
            random.Random(7).shuffle(shuffled)
            for mtype, req_id, _tx, payload in shuffled:
                _reply(writer, mtype, req_id, b"echo:" + payload.rstrip(b"\0"))
            # A watch event in the middle of it all, for nobody.
            _reply(writer, Op.WATCH_EVENT, 0, b"/x\0nobody\0")
            seen.clear()
        return True

    async with FakeXenStored(tmp_path / "xs.sock", backwards), \
            await XenStore.open(str(tmp_path / "xs.sock")) as xs:
        got = await asyncio.gather(*(xs.read(f"/n{i}") for i in range(1000)))
    assert got == [f"echo:/n{i}".encode() for i in range(1000)]


@pytest.mark.asyncio
async def test_connection_loss_fails_pending_requests_and_watches(tmp_path: Path) -> None:
    async def then_die(seen: list[tuple[int, int, int, bytes]],
                       writer: asyncio.StreamWriter) -> bool:
        mtype, req_id, _tx, payload = seen[-1]
        if mtype == Op.WATCH:
            _reply(writer, Op.WATCH, req_id, b"OK\0")
            path, token = payload.split(b"\0")[:2]
            _reply(writer, Op.WATCH_EVENT, 0, path + b"\0" + token + b"\0")
            return True
        return False                    # anything else: hang up

    async with FakeXenStored(tmp_path / "xs.sock", then_die):
        xs = await XenStore.open(str(tmp_path / "xs.sock"))
        watch = await xs.watch("/w")
        pending = [asyncio.ensure_future(xs.read(f"/r{i}")) for i in range(5)]
        for fut in pending:
            with pytest.raises(ConnectionResetError, match=r"xenstore connection to .* lost"):
                await fut
        assert (await _next(watch)).path == "/w"        # what came before is delivered
        with pytest.raises(ConnectionResetError, match="xenstore"):
            await _next(watch)
        with pytest.raises(ConnectionResetError, match="xenstore"):
            await xs.read("/after")
        assert xs.closed and "lost" in repr(xs)
        await xs.close()
        with pytest.raises(ValueError, match="closed"):
            await xs.read("/closed")


@pytest.mark.asyncio
async def test_close_ends_watches_and_a_leaked_connection_warns(xs: XenStore,
                                                                base: str) -> None:
    other = await XenStore.open()
    watch = await other.watch(base)
    await _next(watch)
    await other.close()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    leaked = await XenStore.open()
    with pytest.warns(ResourceWarning, match="unclosed <XenStore"):
        del leaked
        gc.collect()


@pytest.mark.asyncio
async def test_control_requests_are_for_domain_0(xs: XenStore, domains: Domains) -> None:
    assert b"quota" in await xs._request(Op.CONTROL, b"help\0", "help")
    quotas = await xs._request(Op.CONTROL, b"quota\0", "quota")
    assert b"transactions" in quotas and b"128" in quotas
    d = domains.start()
    with pytest.raises(AgentError) as denied:
        d("from vchan.xenstore import Op; xs._request(Op.CONTROL, b'help\\0', 'help')")
    assert denied.value.errno == errno.EACCES


class FakeXenbus:
    """A character device standing in for /dev/xen/xenbus: a raw pseudo-terminal.

    A thread answers from the master side: READ gets ``value-of:<path>``,
    WATCH gets OK and its first event.
    """

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)                   # no echo, no line editing: bytes pass as they are
        self.path = os.ttyname(slave)
        self._slave = slave
        self.requests = 0
        self.max_unanswered = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            # Whole requests that arrived before we answered any: the device
            # would have overwritten all but the last one's payload.
            self.max_unanswered = max(self.max_unanswered, _count_whole(buf))
            while len(buf) >= HDR.size:
                mtype, req_id, tx_id, length = HDR.unpack_from(buf)
                if len(buf) < HDR.size + length:
                    break
                payload, buf = buf[HDR.size:HDR.size + length], buf[HDR.size + length:]
                self.requests += 1
                if mtype == Op.WATCH:
                    out = HDR.pack(mtype, req_id, tx_id, 3) + b"OK\0"
                    out += HDR.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload
                else:
                    answer = b"value-of:" + payload.rstrip(b"\0")
                    out = HDR.pack(mtype, req_id, tx_id, len(answer)) + answer
                os.write(self.master, out)

    def close(self) -> None:
        os.close(self._slave)
        os.close(self.master)
        self._thread.join(5)


def _count_whole(buf: bytes) -> int:
    n = at = 0
    while len(buf) - at >= HDR.size:
        length = HDR.unpack_from(buf, at)[3]
        if len(buf) - at < HDR.size + length:
            break
        at += HDR.size + length
        n += 1
    return n


@pytest.mark.asyncio
async def test_xenbus_gets_one_request_at_a_time() -> None:
    """Linux's xenbus device holds one request's payload per open file until it
    is sent: a second one written meanwhile replaces it (wrong answers on real
    Xen).  So on a character device requests wait for the previous reply."""
    dev = FakeXenbus()
    try:
        async with await XenStore.open(dev.path) as xs:
            got = await asyncio.gather(*(xs.read(f"/n{i}") for i in range(200)))
            assert got == [f"value-of:/n{i}".encode() for i in range(200)]
            # A caller that gives up does not let the next request overtake its own.
            slow = asyncio.ensure_future(xs.read("/gives-up"))
            await asyncio.sleep(0)
            slow.cancel()
            assert await xs.read("/after") == b"value-of:/after"
        assert dev.max_unanswered == 1
    finally:
        dev.close()


@pytest.mark.asyncio
async def test_a_character_device_works_like_xenbus() -> None:
    dev = FakeXenbus()
    try:
        async with await XenStore.open(dev.path) as xs:
            assert not xs._ep.is_socket
            got = await asyncio.gather(*(xs.read(f"/n{i}") for i in range(300)))
            assert got == [f"value-of:/n{i}".encode() for i in range(300)]
            watch = await xs.watch("/w", token="t")
            assert await _next(watch) == ("/w", "t")
        with XenStoreSync(dev.path) as sync:
            assert sync.read("/sync") == b"value-of:/sync"
        assert dev.requests == 302
    finally:
        dev.close()


# -- the blocking API --------------------------------------------------------------------------


def test_blocking_api(sim_dir: Path, base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with XenStoreSync() as xs:
        xs.write(f"{base}/a/b", "1")
        xs.mkdir(f"{base}/c")
        assert xs.read(f"{base}/a/b") == b"1"
        assert xs.directory(base) == ["a", "c"]
        xs.set_perms(f"{base}/c", ["r0", Perm(3, "b")])
        assert xs.get_perms(f"{base}/c") == [Perm(0, "r"), Perm(3, "b")]
        assert xs.get_domain_path(3) == "/local/domain/3"
        with pytest.raises(FileNotFoundError, match="xenstore READ"):
            xs.read(f"{base}/zzz")

        with xs.watch(f"{base}/a", timeout=0.2) as watch:
            assert list(watch) == [(f"{base}/a", watch.token)]   # ends after the timeout
            xs.write(f"{base}/a/b", "2")
            xs.rm(f"{base}/a/b")
            assert [watch.wait(2).path for _ in range(2)] == [f"{base}/a/b"] * 2
            with pytest.raises(TimeoutError):
                watch.wait(0.05)

        with xs.transaction() as tx:
            tx.write(f"{base}/t", "in tx")
        assert xs.read(f"{base}/t") == b"in tx"
        with pytest.raises(KeyError), xs.transaction() as tx:
            tx.write(f"{base}/t", "aborted")
            raise KeyError("abort")
        assert xs.read(f"{base}/t") == b"in tx"

        calls = 0

        def bump(tx: Any) -> None:
            nonlocal calls
            calls += 1
            value = tx.read(f"{base}/t")
            if calls == 1:
                with XenStoreSync() as other:
                    other.write(f"{base}/t", "meddled")
            tx.write(f"{base}/t", value + b"!")

        xs.transact(bump)
        assert calls == 2 and xs.read(f"{base}/t") == b"meddled!"
        # XENSTORED_PATH wins over everything else.
        monkeypatch.setenv("XENSTORED_PATH", str(sim_dir / "xenstore" / "0.sock"))
        with XenStoreSync() as again:
            assert again.read(f"{base}/t") == b"meddled!"
    assert xs.closed
    with pytest.raises(ValueError, match="closed"):
        xs.read(f"{base}/t")


def test_open_finds_the_socket_of_its_own_domain(sim_dir: Path, domains: Domains) -> None:
    d = domains.start()
    assert d("xs.path").endswith(f"/xenstore/{d.domid}.sock")
    assert d("xs.read('domid')") == str(d.domid)
    path = sim.control({"cmd": "xenstore-socket", "domid": d.domid}, sim_dir)["path"]
    assert path == d("xs.path")
    with pytest.raises(OSError):
        sim.control({"cmd": "xenstore-socket", "domid": 0x7FF0}, sim_dir)
    assert os.stat(path).st_mode & 0o777 == 0o600
