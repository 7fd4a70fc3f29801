"""vchan.handshake: the XenStore meetings as I/O-free generators, and their drivers.

The generators are driven here by a dictionary standing in for XenStore --
no daemon, no event loop -- which is what I/O-free buys: every branch of a
meeting can be walked deterministically.  Then the two real drivers: the
blocking ``vchan.Vchan`` runs neither an event loop nor a thread, and calls
no XenStore from ``__del__``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

import vchan
from vchan import handshake, sim
from vchan.handshake import (
    Answer,
    Directory,
    GetPerms,
    Mkdir,
    Read,
    Rm,
    SetPerms,
    Sleep,
    Transaction,
    WaitChange,
    Write,
    client_cleanup,
    client_rendezvous,
    publish,
)
from vchan.xenstore import Perm


class FakeStore:
    """Enough of XenStore for the meetings: paths, values, permissions."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.perms: dict[str, tuple[Perm, ...]] = {}
        self.log: list[Any] = []
        self.fail: dict[str, OSError] = {}

    def _check(self, op: Any) -> None:
        self.log.append(op)
        err = self.fail.pop(type(op).__name__, None)
        if err is not None:
            raise err

    def apply(self, op: Any) -> Any:
        self._check(op)
        if isinstance(op, Read):
            if op.path not in self.values:
                raise FileNotFoundError(errno.ENOENT, op.path)
            return self.values[op.path]
        if isinstance(op, Write):
            self.values[op.path] = op.value.encode()
            return None
        if isinstance(op, Mkdir):
            self.values.setdefault(op.path, b"")
            return None
        if isinstance(op, Rm):
            for p in [p for p in self.values if p == op.path or p.startswith(op.path + "/")]:
                del self.values[p]
            return None
        if isinstance(op, Directory):
            if op.path not in self.values:
                raise FileNotFoundError(errno.ENOENT, op.path)
            prefix = op.path + "/"
            return sorted({p[len(prefix):].split("/")[0] for p in self.values
                           if p.startswith(prefix)})
        if isinstance(op, GetPerms):
            return list(self.perms.get(op.path, ()))
        if isinstance(op, SetPerms):
            self.perms[op.path] = op.perms
            return None
        raise AssertionError(f"unexpected {op!r}")


def drive(meeting: Any, store: FakeStore, on_wait: Any = None) -> Any:
    """A third driver, synchronous and in memory."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = meeting.throw(error) if error is not None else meeting.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(op, WaitChange):
                if on_wait is not None:
                    on_wait(store)
            elif isinstance(op, Sleep):
                store.log.append(op)
            elif isinstance(op, Transaction):
                value = drive(op.body(), store)
            else:
                value = store.apply(op)
        except OSError as exc:
            error = exc


BASE = "/local/domain/1/data/vchan/2/p"
REQDIR = "/local/domain/2/data/vchan-req/1/p"


def _rendezvous(session: bool = True) -> Any:
    return client_rendezvous(own=2, server=1, port="p", nonce="0123456789abcdef",
                             read_min=0, write_min=0, session=session)


def test_a_raw_server_is_connected_to_directly_without_a_request() -> None:
    store = FakeStore()
    drive(publish(BASE, 77, 5, 1, 2), store)
    answer = drive(_rendezvous(), store)
    assert answer == Answer(77, 5, "raw")
    assert not any(isinstance(op, Write) and "vchan-req" in op.path for op in store.log)


def test_a_listener_answers_the_request_with_a_session() -> None:
    store = FakeStore()

    def server_answers(store: FakeStore) -> None:
        request = f"{REQDIR}/0123456789abcdef"
        if request in store.values and f"{BASE}/0123456789abcdef/ring-ref" not in store.values:
            assert store.values[request] == b"0 0 session"
            assert store.perms[REQDIR] == (Perm(2, "n"), Perm(1, "r"))
            drive(publish(f"{BASE}/0123456789abcdef", 9, 3, 1, 2, session=True), store)

    answer = drive(_rendezvous(), store, on_wait=server_answers)
    assert answer == Answer(9, 3, "session")
    drive(client_cleanup(own=2, server=1, port="p", nonce="0123456789abcdef"), store)
    assert not any(p.startswith(REQDIR) for p in store.values), "request left behind"


def test_a_listener_without_sessions_gives_a_ring_of_its_own() -> None:
    store = FakeStore()

    def server_answers(store: FakeStore) -> None:
        if f"{REQDIR}/0123456789abcdef" in store.values:
            drive(publish(f"{BASE}/0123456789abcdef", 9, 3, 1, 2), store)

    assert drive(_rendezvous(), store, on_wait=server_answers).mode == "listener"


def test_a_refusal_names_the_servers_reason() -> None:
    store = FakeStore()

    def server_refuses(store: FakeStore) -> None:
        if f"{REQDIR}/0123456789abcdef" in store.values:
            store.values[f"{BASE}/0123456789abcdef/error"] = b"grant limit is reached"

    with pytest.raises(ConnectionRefusedError, match="grant limit is reached"):
        drive(_rendezvous(), store, on_wait=server_refuses)


def test_a_full_request_directory_is_waited_out() -> None:
    store = FakeStore()
    store.fail["Write"] = OSError(errno.ENOSPC, "node too big")

    def server_answers(store: FakeStore) -> None:
        if f"{REQDIR}/0123456789abcdef" in store.values:
            drive(publish(f"{BASE}/0123456789abcdef", 9, 3, 1, 2), store)

    assert drive(_rendezvous(), store, on_wait=server_answers).mode == "listener"
    assert any(isinstance(op, Sleep) for op in store.log)


def test_other_errors_are_the_callers() -> None:
    store = FakeStore()
    store.fail["Mkdir"] = PermissionError(errno.EACCES, "no")
    with pytest.raises(PermissionError):
        drive(_rendezvous(), store)


def test_publish_is_one_transaction_with_the_peers_read_permission() -> None:
    store = FakeStore()
    meeting = publish(BASE, 12, 34, 1, 2, session=True)
    op = next(meeting)
    assert isinstance(op, Transaction)
    drive(op.body(), store)
    assert store.values[f"{BASE}/ring-ref"] == b"12"
    assert store.values[f"{BASE}/event-channel"] == b"34"
    assert store.values[f"{BASE}/session"] == b"1"
    assert all(store.perms[f"{BASE}/{k}"] == (Perm(1, "n"), Perm(2, "r"))
               for k in ("ring-ref", "event-channel", "session"))


# -- the real drivers --------------------------------------------------------------------


def test_blocking_vchan_runs_no_event_loop_and_no_thread(
        sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("vchan.Vchan started an event loop or a thread")

    monkeypatch.setattr(asyncio, "run", forbidden)
    monkeypatch.setattr(asyncio, "new_event_loop", forbidden)
    monkeypatch.setattr(threading.Thread, "start", forbidden)
    own = vchan.own_domid()
    with vchan.Vchan.server(own, "noloop", read_min=4096, write_min=4096) as srv, \
            vchan.Vchan.client(own, "noloop", timeout=10) as cli:
        cli.send(b"ping")
        assert srv.recv_exactly(4) == b"ping"


async def test_blocking_vchan_works_inside_a_running_loop(sim_dir: Path) -> None:
    own = vchan.own_domid()
    with vchan.Vchan.server(own, "inloop", read_min=4096, write_min=4096) as srv, \
            vchan.Vchan.client(own, "inloop", timeout=10) as cli:
        cli.send(b"pong")
        assert srv.recv_exactly(4) == b"pong"


def test_blocking_client_times_out_and_tidies_up(sim_dir: Path) -> None:
    own = vchan.own_domid()
    with pytest.raises(TimeoutError, match="no vchan server"):
        vchan.Vchan.client(own, "nobody", timeout=0.3)
    from vchan.xenstore import XenStoreSync

    with XenStoreSync() as xs, pytest.raises(FileNotFoundError):
        xs.directory(f"/local/domain/{own}/data/vchan-req/{own}/nobody")


def test_no_xenstore_from_a_finalizer(sim_dir: Path) -> None:
    own = vchan.own_domid()
    srv = vchan.Vchan.server(own, "finalized", read_min=4096, write_min=4096)

    def requests() -> int:
        st = sim.control({"cmd": "status"}, sim_dir)
        return int(st["xenstore"]["requests"].get(str(own), 0))

    before = requests()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del srv
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert requests() == before
    # The raw server's path stays; a new server there replaces it.
    with vchan.Vchan.server(own, "finalized", read_min=4096, write_min=4096), \
            vchan.Vchan.client(own, "finalized", timeout=10):
        pass


def test_the_asyncio_driver_runs_the_same_meeting(sim_dir: Path) -> None:
    from vchan.xenstore import XenStore

    async def main() -> None:
        xs = await XenStore.open()
        try:
            await handshake.run_async(publish("/local/domain/0/data/hs-test", 5, 6, 0, 0), xs)
            assert await xs.read("/local/domain/0/data/hs-test/ring-ref") == b"5"
            await handshake.run_async(handshake.remove_if_empty("/local/domain/0/data/hs-test"),
                                      xs)
            assert await xs.read("/local/domain/0/data/hs-test/ring-ref") == b"5"  # not empty
            await xs.rm("/local/domain/0/data/hs-test")
        finally:
            await xs.close()

    if vchan.own_domid() != 0:
        pytest.skip("writes dom0 paths")
    asyncio.run(main())
