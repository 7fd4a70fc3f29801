"""vchan streams across real processes in separate emulated domains.

Server and client are separate Python processes (``tests/peer_roles.py``, the
roles the Xen rig runs too) in emulated domains 1 and 2, on the same event
loop kind as the test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from memory import Memory, assert_nothing_grows
from procs import Children, Proc
from support import grant_limit, soak_seconds

import vchan
from vchan import sim

PEER = Path(__file__).with_name("peer_roles.py")


def _loop_kind() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


@pytest.fixture
def peers(sim_dir: Path, children: Children) -> Children:
    """The test's peer processes (``tests/peer_roles.py``), reaped at its end."""
    return children


def _spawn(peers: Children, domid: int, *args: str) -> Proc:
    """``peer_roles.py ARGS`` in emulated domain ``domid``, on the test's loop kind."""
    return peers.start([sys.executable, PEER, *args], domid=domid,
                       env={"VCHAN_TEST_LOOP": _loop_kind()},
                       name=f"{' '.join(args[:3])} (domain {domid})")


def _check_duplex(server: dict[str, Any], client: dict[str, Any], nbytes: int) -> None:
    assert server.get("event") == "duplexed", server
    assert client.get("result") == "duplexed", client
    assert server["sent"] == client["received"] == nbytes
    assert client["sent"] == server["received"] == nbytes
    assert server["sent_sha256"] == client["received_sha256"]
    assert client["sent_sha256"] == server["received_sha256"]


# -- bulk ---------------------------------------------------------------------------


async def test_one_gibibyte_each_way_at_once(peers: Children) -> None:
    nbytes = 1 << 30
    await _bulk(peers, nbytes, "bulk")


@pytest.mark.soak
async def test_soak_ten_gibibytes_each_way(peers: Children) -> None:
    # Bounded by VCHAN_SOAK_SECONDS: ~0.5 GB/s each way under the emulator.
    nbytes = min(10 << 30, int(soak_seconds() * 0.25e9))
    await _bulk(peers, nbytes, "soak", timeout=soak_seconds() * 2 + 120)


async def _bulk(peers: Children, nbytes: int, port: str, timeout: float = 300) -> None:
    deadline = str(timeout + 60)
    server = _spawn(peers, 1, "--deadline", deadline, "duplex-server", port, "--peers", "2",
                    "--bytes", str(nbytes), "--connections", "1")
    assert (await server.aevent())["domid"] == 1
    client = _spawn(peers, 2, "--deadline", deadline, "duplex-client", "1", port,
                    "--bytes", str(nbytes))
    assert (await client.aevent())["event"] == "connected"
    s, c = await asyncio.gather(server.aevent(timeout), client.aevent(timeout))
    _check_duplex(s, c, nbytes)


async def test_raw_mode_server(peers: Children) -> None:
    server = _spawn(peers, 1, "duplex-server", "rawport", "--peers", "2", "--raw", "--bytes",
                    "3000000", "--connections", "2")
    assert (await server.aevent())["event"] == "listening"
    for seed in (1, 2):       # a raw server serves clients one after another
        client = _spawn(peers, 2, "duplex-client", "1", "rawport", "--bytes", "3000000",
                        "--seed", str(seed))
        assert (await client.aevent())["event"] == "connected"
        s, c = await asyncio.gather(server.aevent(), client.aevent())
        _check_duplex(s, c, 3000000)


# -- many clients ---------------------------------------------------------------------


async def test_two_hundred_concurrent_connections(peers: Children, sim_dir: Path) -> None:
    # The clients ask for 64 KiB rings each way: 33 granted pages per
    # connection on the server's side; 200 connections need 6,600 of them, so
    # this runs with the emulator's grant limit raised to 8,192 pages per
    # domain (the default 1,024 allows 31).
    with grant_limit(sim_dir, 8192):
        server = _spawn(peers, 1, "echo-server", "many", "--peers", "2", "--connections",
                        "200", "--summary")
        assert (await server.aevent())["event"] == "listening"
        client = _spawn(peers, 2, "many-client", "1", "many", "--connections", "200",
                        "--ring", "65536", "--hold")
        result = await client.await_event("holding", 120)
        assert result["opened"] == result["echoed"] == 200
        status = sim.control({"cmd": "status"}, sim_dir)
        dom1 = next(d for d in status["domains"] if d["domid"] == 1)
        assert dom1["granted_pages"] == 200 * 33


async def test_clients_connecting_at_the_same_instant(peers: Children) -> None:
    n = 12
    server = _spawn(peers, 1, "duplex-server", "rush", "--peers", "2,3", "--bytes", "200000",
                    "--connections", str(n))
    assert (await server.aevent())["event"] == "listening"
    clients = [_spawn(peers, 2 + i % 2, "duplex-client", "1", "rush", "--bytes", "200000",
                      "--seed", str(100 + i)) for i in range(n)]
    for c in clients:
        assert (await c.aevent())["event"] == "connected"
    results = [await c.aevent() for c in clients]
    served = [await server.aevent() for _ in range(n)]
    for r, sv in zip(results, served, strict=True):
        assert r["result"] == "duplexed" and sv["event"] == "duplexed", (r, sv)
    # Every client's bytes reached the server intact, each on its own ring.
    assert sorted(r["sent_sha256"] for r in results) == \
        sorted(s["received_sha256"] for s in served)
    assert sorted(r["received_sha256"] for r in results) == \
        sorted(s["sent_sha256"] for s in served)


async def test_client_started_before_its_server(peers: Children) -> None:
    # Domain 1 is up (as a VM would be) but its server has not started yet.
    from domains import DomainProcess

    with DomainProcess(1) as vm:
        vm("_presence = GrantMapper()")
        await _client_before_server(peers)


async def _client_before_server(peers: Children) -> None:
    client = _spawn(peers, 2, "duplex-client", "1", "late", "--bytes", "100000")
    await asyncio.sleep(1.0)
    assert client.poll() is None, "the client gave up instead of waiting"
    server = _spawn(peers, 1, "duplex-server", "late", "--peers", "2", "--bytes", "100000",
                    "--connections", "1")
    assert (await server.aevent())["event"] == "listening"
    assert (await client.aevent())["event"] == "connected"
    s, c = await asyncio.gather(server.aevent(), client.aevent())
    _check_duplex(s, c, 100000)


# -- crashes ----------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["server", "client"])
async def test_sigkill_mid_transfer_resets_the_survivor(peers: Children, victim: str) -> None:
    nbytes = 1 << 40            # never finishes
    server = _spawn(peers, 1, "duplex-server", f"kill{victim}", "--peers", "2", "--bytes",
                    str(nbytes), "--connections", "1")
    assert (await server.aevent())["event"] == "listening"
    client = _spawn(peers, 2, "duplex-client", "1", f"kill{victim}", "--bytes", str(nbytes))
    assert (await client.aevent())["event"] == "connected"
    await asyncio.sleep(0.5)                    # data is flowing
    dead, survivor = (server, client) if victim == "server" else (client, server)
    t0 = dead.kill()
    report = await survivor.aevent(10)
    elapsed = time.monotonic() - t0
    assert "ConnectionResetError" in report.get("error", ""), report
    assert elapsed < 1.0, f"noticed after {elapsed:.2f} s"


# -- bad input ------------------------------------------------------------------------------


async def test_unknown_domain(sim_dir: Path) -> None:
    with pytest.raises(vchan.NoSuchDomainError, match="domain 4242 does not exist"):
        await vchan.open_connection(4242, 1, timeout=5)


async def test_no_server_times_out(sim_dir: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no vchan server at domain 0 port nobody"):
        await vchan.open_connection(0, "nobody", timeout=0.3)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"port": -1}, ValueError, r"port -1 is out of range 0\.\.2147483647"),
    ({"port": "no/slashes"}, ValueError, "port name"),
    ({"port": 1.5}, TypeError, "port must be an int or a str"),
    ({"domid": -3}, ValueError, "domain id"),
    ({"domid": b"0"}, TypeError, "domid must be an int"),   # (a str is a host: drop-in)
    ({"read_min": 2 << 20}, ValueError, "larger than the largest vchan ring"),
    ({"write_min": -1}, ValueError, "write_min must be >= 0"),
    ({"timeout": -1}, ValueError, "timeout must be >= 0"),
])
async def test_bad_connection_arguments(sim_dir: Path, kwargs: dict[str, Any],
                                        error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"domid": 0, "port": 1, "timeout": 1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        await vchan.open_connection(args.pop("domid"), args.pop("port"), **args)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"peers": []}, ValueError, "at least one domain"),
    ({"peers": "everyone"}, TypeError, "peers must be"),
    ({"peers": [1, 2], "raw": True}, ValueError, "raw=True serves one"),
    ({"peers": 1, "read_min": 1 << 21}, ValueError, "largest vchan ring"),
    ({"peers": 1, "accept_timeout": 0}, ValueError, "accept_timeout"),
    ({"peers": 99999}, ValueError, "domain id"),
])
async def test_bad_server_arguments(sim_dir: Path, kwargs: dict[str, Any],
                                    error: type[Exception], match: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        pass

    with pytest.raises(error, match=match):
        await vchan.start_server(handler, "bad", **kwargs)


async def test_write_after_close_and_after_write_eof(sim_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    own = vchan.own_domid()
    async with await vchan.start_server(handler, "misuse", peers=own):
        _, writer = await vchan.open_connection(own, "misuse", timeout=10)
        writer.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            writer.write(b"late")
        writer.close()
        with pytest.raises(vchan.LocalProtocolError, match="after close"):
            writer.transport.write(b"later")
        await writer.wait_closed()


# -- no leaks ---------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_leaks_after_5000_connect_close_cycles(sim_dir: Path) -> None:
    own = vchan.own_domid()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(1))
        w.close()

    async def cycle() -> None:
        reader, writer = await vchan.open_connection(own, "cycles", timeout=10)
        writer.write(b"x")
        assert await reader.read(1) == b"x"
        writer.close()
        await writer.wait_closed()

    from vchan.xenstore import XenStore

    async with await vchan.start_server(handler, "cycles", peers=own) as server:
        for _ in range(20):
            await cycle()
        base = vchan_base = f"/local/domain/{own}/data"
        xs = await XenStore.open()
        try:
            before_nodes = await _count_nodes(xs, base)
            before = (_fds(), _status(sim_dir), Memory.now())
            for _ in range(5000):
                await cycle()
            await asyncio.sleep(0.2)
            after_nodes = await _count_nodes(xs, vchan_base)
            after = (_fds(), _status(sim_dir), Memory.now())
        finally:
            await xs.close()
        assert server.is_serving()
    assert after[0] == before[0], "file descriptors leaked"
    assert after[1] == before[1], "emulator tables grew"
    assert after_nodes == before_nodes, "XenStore nodes leaked"
    print(f"\n5,000 cycles: {assert_nothing_grows(before[2], after[2], 5000)}")


async def _count_nodes(xs: Any, path: str) -> int:
    try:
        children = await xs.directory(path)
    except FileNotFoundError:
        return 0
    return 1 + sum([await _count_nodes(xs, f"{path}/{c}") for c in children])


def _status(sim_dir: Path) -> tuple[int, int, int]:
    st = sim.control({"cmd": "status"}, sim_dir)
    dom = next(d for d in st["domains"] if d["domid"] == vchan.own_domid())
    return st["maps"], dom["granted_pages"], len(dom["ports"])


async def test_grant_limit_exhaustion_names_the_limit(sim_dir: Path) -> None:
    """A server out of grants refuses the client at once, saying why."""
    own = vchan.own_domid()
    hold = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hold.append(w)

    with grant_limit(sim_dir, 40):
        # Ring sizes the server insists on: 33 pages per ring.
        async with await vchan.start_server(handler, "scarce", peers=own, read_min=65536,
                                            write_min=65536) as server:
            _, w1 = await vchan.open_connection(own, "scarce", timeout=10)
            # More connections share the first one's session: no more grants.
            _, w3 = await vchan.open_connection(own, "scarce", timeout=10)
            hold.append(w3)
            # A ring of its own does not fit: refused at once, the limit named.
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError,
                               match=r"grant limit is reached.*vchan sim set grant-limit"):
                await vchan.open_connection(own, "scarce", timeout=10, dedicated=True)
            assert time.monotonic() - started < 1.0
            # Rings that fit in page 0 cost one page per connection.
            _, w2 = await vchan.open_connection(own, "scarce", timeout=10, read_min=1024,
                                                write_min=2048)
            for w in (w1, w2, *hold):
                w.close()
            server.close_clients()


async def test_default_rings_shrink_when_grants_run_short(sim_dir: Path) -> None:
    """Connections that did not ask for a size get smaller rings, not an error."""
    own = vchan.own_domid()
    hold = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hold.append(w)

    with grant_limit(sim_dir, 600):
        async with await vchan.start_server(handler, "shrink", peers=own) as server:
            writers = []
            for _ in range(4):
                _, w = await vchan.open_connection(own, "shrink", timeout=10, dedicated=True)
                writers.append(w)
            sizes = [w.transport.get_extra_info("endpoint").ring.write_size for w in writers]
            # 1 MiB rings take 513 pages: the first fits; 87 left: not 256 KiB
            # (129), but 64 KiB (33) twice, then 16 KiB (9).
            assert sizes == [1 << 20, 64 * 1024, 64 * 1024, 16 * 1024]
            for w in writers + hold:
                w.close()
            server.close_clients()


async def test_peer_domain_vanishing_without_notice_resets(sim_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """``xl destroy`` runs no unmap notification: the hub's liveness probe notices."""
    from vchan import listener

    own = vchan.own_domid()
    server_side: list[asyncio.StreamWriter] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_side.append(w)

    async with await vchan.start_server(handler, "vanish", peers=own) as server:
        reader, writer = await vchan.open_connection(own, "vanish", timeout=10)
        real = listener.domain_exists
        monkeypatch.setattr(listener, "domain_exists",
                            lambda ev, d: False if d == own else real(ev, d))
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError, match=f"domain {own} no longer exists"):
            await asyncio.wait_for(reader.read(), 5)
        assert time.monotonic() - t0 < 1.0
        monkeypatch.undo()
        writer.close()
        server.close_clients()


async def test_peer_domain_losing_its_home_resets(peers: Children) -> None:
    """A destroyed domain may linger as a zombie the hypervisor answers for like a
    live one; its XenStore home is gone at once: dom0 sees that and resets."""
    from vchan.xenstore import XenStore

    own = vchan.own_domid()
    if own != 0:
        pytest.skip("needs the privileged domain 0 to read other domains' homes")
    server = _spawn(peers, 7, "echo-server", "homeless", "--peers", str(own))
    await server.aevent()
    reader, writer = await vchan.open_connection(7, "homeless", timeout=10)
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        xs = await XenStore.open()
        try:
            await xs.rm("/local/domain/7")      # what xl destroy does; the process lives
        finally:
            await xs.close()
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError, match="domain 7 no longer exists"):
            await asyncio.wait_for(reader.read(), 5)
        assert time.monotonic() - t0 < 2.0
    finally:
        writer.close()


async def test_clients_leave_no_request_nodes_behind(sim_dir: Path) -> None:
    """Reaching (and serving) many ports must not fill a domain's XenStore quota."""
    from vchan.xenstore import XenStore

    own = vchan.own_domid()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(1))
        w.close()

    xs = await XenStore.open()
    try:
        base = f"/local/domain/{own}/data/vchan-req/{own}"
        for i in range(30):
            port = f"tidy{i}"
            async with await vchan.start_server(echo, port, peers=own):
                r, w = await vchan.open_connection(own, port, timeout=10)
                w.write(b"x")
                assert await r.read() == b"x"
                w.close()
                await w.wait_closed()
        # Neither the clients' request directories nor the servers' port
        # directories stay behind.
        for where in (base, f"/local/domain/{own}/data/vchan/{own}"):
            try:
                left = await xs.directory(where)
            except FileNotFoundError:
                left = []
            # (Other tests of the session may have left their own.)
            ours = [n for n in left if n.startswith("tidy")]
            assert ours == [], f"directories left behind in {where}: {ours}"
    finally:
        await xs.close()
