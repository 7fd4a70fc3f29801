"""Drop-in by address (vchan.dropin) across processes in separate emulated domains.

Servers, clients and a lying third domain are ``tests/dropin_peer.py``
processes in emulated domains 1, 2 and 3, on the same loop kind as the
test; a few cases run a server or a client in the test process (domain 0).
On the emulator every domain shares the host's network, so the TCP address
of every server is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import Children, Proc
from support import grant_limit
from test_streams import _loop_kind

import vchan
from vchan import dropin, upgrade
from vchan.dropin.client import _Negotiation

DROPIN_PEER = Path(__file__).with_name("dropin_peer.py")
HOST = "127.0.0.1"


@pytest.fixture
def domains(sim_dir: Path, children: Children) -> Iterator[Children]:
    """The test's ``dropin_peer.py`` processes, reaped at its end; no hints
    of an earlier test remembered."""
    dropin.forget_hints()
    yield children
    children.close()
    dropin.forget_hints()


def _spawn(domains: Children, domid: int, *args: str) -> Proc:
    """``dropin_peer.py ARGS`` in emulated domain ``domid``, on the test's loop kind."""
    return domains.start([sys.executable, DROPIN_PEER, *args], domid=domid,
                         env={"VCHAN_TEST_LOOP": _loop_kind()},
                         name=f"{' '.join(args[:2])} (domain {domid})")


async def _server(domains: Children, *args: str, domid: int = 1) -> tuple[Proc,
                                                                                  int]:
    server = _spawn(domains, domid, "serve", *args)
    ready = await server.aevent()
    assert ready.get("vchan_error") is None, ready
    return server, int(ready["ready"])


async def _client(domains: Children, port: int, *args: str,
                  domid: int = 2) -> dict[str, Any]:
    client = _spawn(domains, domid, "connect", HOST, str(port), *args)
    line = await client.aevent(120)
    assert "result" in line, line
    result: dict[str, Any] = line["result"]
    return result


async def _advertiser(domains: Children, port: int, *args: str, domid: int = 3) -> Proc:
    """A process of domain ``domid`` that advertises ``port`` as its own."""
    third = _spawn(domains, domid, "advertise", str(port), HOST, *args)
    assert (await third.aevent())["ready"] == domid
    return third


# -- the vchan path ------------------------------------------------------------------


async def test_two_domains_by_address_go_over_vchan_and_move_10_mib_each_way(
        domains: Children) -> None:
    nbytes = 10 << 20
    server, port = await _server(domains)
    got = await _client(domains, port, "--nbytes", str(nbytes))
    conn = (await server.aevent())["conn"]
    # Both sides say vchan, through get_extra_info and through via().
    assert got["via"] == got["extra_via"] == "vchan"
    assert conn["via"] == conn["extra_via"] == "vchan"
    # The data moved intact both ways.
    assert conn["received"] == got["received"] == nbytes
    assert got["sent_sha256"] == conn["received_sha256"] == got["received_sha256"]
    # Addresses look like the TCP connection's; the vchan peer is the real domain.
    assert got["peername"] == [HOST, port]
    assert conn["peername"] == got["sockname"]
    assert got["vchan_peer"] == [1, upgrade.dropin_port(port)]
    assert conn["vchan_peer"][0] == 2


async def test_later_connections_reuse_the_session_and_the_hints(
        domains: Children, sim_dir: Path) -> None:
    _, port = await _server(domains)
    client = _spawn(domains, 2, "connect", HOST, str(port), "--count", "20", "--nbytes", "100")
    results = [(await client.aevent())["result"] for _ in range(20)]
    assert {r["via"] for r in results} == {"vchan"}
    later = sorted(r["connect_seconds"] for r in results[1:])
    # Hints are cached, the session is the loop's: a later connection costs
    # a TCP round trip and a stream's open, no XenStore meeting.
    assert later[len(later) // 2] < 0.05, later


async def test_a_hundred_connections_at_once_all_upgrade_and_stay_apart(
        domains: Children) -> None:
    """A client's first connections, all at once: they share one session set-up
    (and the server its one new peer), and each carries its own bytes.

    (The server waits a second for each HELLO, not its default 50 ms: a
    hundred connects at once on two loaded cores can take longer than that
    to send theirs, and a connection whose HELLO is late is served as plain
    TCP -- correctly, but not what this test is about.)"""
    server, port = await _server(domains, "--grace", "1.0")
    got = await _client(domains, port, "--count", "100", "--parallel", "--nbytes", "20000")
    assert got["vias"] == ["vchan"] * 100
    assert got["intact"] == 100
    conns = [(await server.aevent())["conn"] for _ in range(100)]
    assert {c["via"] for c in conns} == {"vchan"}
    assert len({tuple(c["peername"]) for c in conns}) == 100


# -- TCP paths ---------------------------------------------------------------------------


async def test_a_plain_asyncio_server_gets_plain_tcp_and_no_added_byte(
        domains: Children) -> None:
    server, port = await _server(domains, "--kind", "plain")
    got = await _client(domains, port, "--nbytes", "5000")
    conn = (await server.aevent())["conn"]
    assert got["via"] == "tcp"
    assert got["extra_via"] in ("tcp", None)      # (uvloop's TCP transports carry no key)
    assert conn["received"] == got["received"] == 5000
    assert got["sent_sha256"] == conn["received_sha256"]
    assert not conn["first"].startswith(upgrade.MAGIC_HELLO.decode("latin-1")[:1])


async def test_an_advertised_plain_server_falls_back_to_tcp_and_is_remembered(
        domains: Children) -> None:
    """A domain claims a plain server's address: the client's HELLO reaches the
    plain server, whose answer is no drop-in answer; the client goes on over a
    fresh TCP connection, and its later connections send no HELLO."""
    server, port = await _server(domains, "--kind", "plain")
    await _advertiser(domains, port)
    client = _spawn(domains, 2, "connect", HOST, str(port), "--count", "2", "--nbytes", "3000")
    first, second = [(await client.aevent())["result"] for _ in range(2)]
    assert first["via"] == second["via"] == "tcp"
    assert first["received"] == second["received"] == 3000
    conns = [(await server.aevent())["conn"] for _ in range(3)]
    firsts = sorted(c["first"].encode("latin-1") for c in conns)
    # One connection saw only the HELLO (echoed back, not an answer), the
    # two connections of the application saw its bytes.
    assert sum(f.startswith(upgrade.MAGIC_HELLO) for f in firsts) == 1
    assert first["connect_seconds"] < dropin.ANSWER_TIMEOUT
    assert second["connect_seconds"] < 0.1


async def test_an_advertised_silent_server_falls_back_after_the_answer_timeout(
        sim_dir: Path, domains: Children) -> None:
    """A server that says nothing to a HELLO (it waits for more): the client
    goes back to TCP after ANSWER_TIMEOUT, not its own timeout."""
    conns: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            line = await reader.readuntil(b"END\n")
            conns.append(line)
            writer.write(line)
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        # (The test process is domain 0: the third domain serves it.)
        await _advertiser(domains, port, "--peers", "0")
        t0 = time.monotonic()
        reader, writer = await vchan.open_connection(HOST, port)
        elapsed = time.monotonic() - t0
        assert dropin.via(writer) == "tcp"
        writer.write(b"hello END\n")
        assert await reader.readline() == b"hello END\n"
        writer.close()
        await writer.wait_closed()
        assert dropin.ANSWER_TIMEOUT <= elapsed < dropin.ANSWER_TIMEOUT + 1.0
    assert conns == [b"hello END\n"]


async def test_an_advertisement_with_nothing_listening_is_tcps_refusal(
        domains: Children) -> None:
    server, port = await _server(domains, "--kind", "plain")
    server.close()                  # the port is free again
    await _advertiser(domains, port, domid=3)
    client = _spawn(domains, 2, "connect", HOST, str(port))
    line = await client.aevent()
    assert line["error"].startswith("ConnectionRefusedError"), line


async def test_a_server_short_of_grants_falls_back_to_tcp_at_once(
        domains: Children, sim_dir: Path) -> None:
    """The server cannot grant a ring (its domain's grant limit is reached): it
    refuses the vchan request, and the client goes on over TCP at once."""
    server, port = await _server(domains)
    with grant_limit(sim_dir, 0):
        got = await _client(domains, port, "--nbytes", "20000")
    conn = (await server.aevent())["conn"]
    assert got["via"] == conn["via"] == "tcp"
    assert got["received"] == conn["received"] == 20000
    assert got["sent_sha256"] == conn["received_sha256"] == got["received_sha256"]
    assert got["connect_seconds"] < 1.0


# -- trust ---------------------------------------------------------------------------------


async def test_a_third_domain_claiming_the_address_is_never_contacted(
        domains: Children) -> None:
    server, port = await _server(domains)
    third = await _advertiser(domains, port)
    got = await _client(domains, port, "--nbytes", "100000")
    conn = (await server.aevent())["conn"]
    assert got["via"] == conn["via"] == "vchan"
    assert got["vchan_peer"][0] == 1            # the domain that owns the address
    assert conn["received_sha256"] == got["sent_sha256"]
    third.close_stdin()             # it reports what it has left and exits
    third.wait(10)
    assert not any("contacted" in line for line in third.rest())


async def test_a_stream_sent_to_a_lying_domain_carries_nothing_but_the_claim(
        domains: Children) -> None:
    """The owner of the TCP address names a domain that is not who the client
    meets over vchan (a server on another host whose domid a local domain
    has): the local domain cannot return the client's nonce, the client
    goes back to TCP, and the domain got only a claim."""
    seen: list[bytes] = []

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            first = await reader.read(upgrade.HELLO_SIZE)
            seen.append(first)
            if first.startswith(upgrade.MAGIC_HELLO):
                # An honest drop-in server's answer, but its domain id is domain 3's here.
                writer.write(upgrade.Offer(3, os.urandom(16),
                                           upgrade.dropin_port(port)).encode())
                await writer.drain()
                await reader.read()
            else:
                writer.write(first + await reader.read())
        writer.close()

    server = await asyncio.start_server(owner, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        third = await _advertiser(domains, port, "--peers", "0")
        await _echoed_over_tcp(port, b"secret")
        contacted = (await third.aevent())["contacted"]
        assert contacted == {"peer": 0, "bytes": upgrade.CLAIM_SIZE}
    assert seen[0].startswith(upgrade.MAGIC_HELLO) and seen[1] == b"secret"


async def _echoed_over_tcp(port: int, message: bytes) -> None:
    """A drop-in connection to the echo server at ``port`` goes over TCP and
    gets ``message`` back."""
    reader, writer = await vchan.open_connection(HOST, port)
    assert dropin.via(writer) == "tcp"
    writer.write(message)
    writer.write_eof()
    assert await reader.read() == message
    writer.close()
    await writer.wait_closed()


# -- plain clients of a drop-in server -------------------------------------------------------


async def test_a_plain_client_first_client_is_served_at_once(
        domains: Children) -> None:
    server, port = await _server(domains, "--grace", "2")
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    writer.write_eof()
    assert await reader.read() == b"GET / HTTP/1.0\r\n\r\n"
    # Not after the (long) grace: the first byte decided.
    assert time.monotonic() - t0 < 1.0
    writer.close()
    conn = (await server.aevent())["conn"]
    assert conn["via"] == "tcp" and conn["first"].startswith("GET /")


async def test_a_plain_server_first_client_is_served_after_the_grace(
        domains: Children) -> None:
    grace = 0.3
    server, port = await _server(domains, "--app", "greet", "--grace", str(grace))
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await reader.readline() == b"220 hello\r\n"
    waited = time.monotonic() - t0
    writer.write(b"HELO me\r\n")
    assert await reader.readline() == b"250 HELO me\r\n"
    writer.close()
    assert grace * 0.9 <= waited < grace + 1.0
    conn = (await server.aevent())["conn"]
    assert conn["via"] == "tcp" and conn["first"] == "HELO me\r\n"


async def test_a_hello_later_than_the_grace_spoils_one_connection_and_no_data(
        domains: Children, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HELLO that comes after the grace (a stalled client) reaches the server's
    application; the client sees its greeting, not an answer, and goes on over
    a fresh TCP connection that carries all of its own bytes."""
    server, port = await _server(domains, "--app", "greet", "--grace", "0.05")
    made = _Negotiation.connection_made

    def stalled(self: Any, transport: Any) -> None:
        self.transport = transport

        def late() -> None:
            if not transport.is_closing():
                transport.write(self.hello)

        asyncio.get_running_loop().call_later(0.3, late)

    monkeypatch.setattr(_Negotiation, "connection_made", stalled)
    try:
        reader, writer = await vchan.open_connection(HOST, port)
    finally:
        monkeypatch.setattr(_Negotiation, "connection_made", made)
    assert dropin.via(writer) == "tcp"
    assert await reader.readline() == b"220 hello\r\n"
    writer.write(b"HELO mine\r\n")
    assert await reader.readline() == b"250 HELO mine\r\n"
    writer.close()
    await writer.wait_closed()
    conns = [(await server.aevent())["conn"] for _ in range(2)]
    # The spoiled connection went to the application as TCP; the other one
    # carried the client's bytes, and only them.
    assert {c["via"] for c in conns} == {"tcp"}
    assert "HELO mine\r\n" in [c.get("first") for c in conns]


async def test_a_server_first_protocol_over_vchan(domains: Children) -> None:
    server, port = await _server(domains, "--app", "greet")
    got = await _client(domains, port, "--app", "greet")
    assert got["via"] == "vchan"
    assert got["greeting"] == "220 hello\r\n" and got["answer"] == "250 HELO client\r\n"
    assert (await server.aevent())["conn"]["via"] == "vchan"


async def test_a_server_that_cannot_serve_vchan_declines_and_the_connection_goes_on(
        domains: Children, monkeypatch: pytest.MonkeyPatch) -> None:
    """No vchan here (XenStore refusing, say): the HELLO is declined and the
    same TCP connection carries the application, for both sides."""
    async def refuse(self: Any) -> None:
        raise PermissionError("xenstore says no")

    monkeypatch.setattr(dropin.DropinServer, "_start_vchan", refuse)
    accepted: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(dropin.via(writer))
        with contextlib.suppress(ConnectionError):
            writer.write(await reader.read())
        writer.close()

    server = await vchan.start_server(handle, HOST, 0)
    assert isinstance(server.vchan_error, PermissionError)
    port = server.port
    assert port is not None
    async with server:
        await _advertiser(domains, port, "--peers", "0")
        await _echoed_over_tcp(port, b"on the same connection")
    assert accepted == ["tcp"]          # one connection: no second one was made


# -- the in-process forms and bad inputs ----------------------------------------------------------


async def test_create_server_and_create_connection_in_one_domain(sim_dir: Path) -> None:
    """The protocol-level forms, server and client in this process (domain 0):
    loopback is ours, so the connection upgrades; a BufferedProtocol gets
    its bytes; the old (port, peers=) form still serves vchan."""
    got = bytearray()
    done = asyncio.get_running_loop().create_future()

    class Sink(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(1000)

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.buf)

        def buffer_updated(self, n: int) -> None:
            got.extend(self.buf[:n])

        def eof_received(self) -> bool:
            done.set_result(dropin.via(self.transport))
            return False

    dropin.forget_hints()
    server = await vchan.create_server(Sink, HOST, 0)
    assert isinstance(server, dropin.DropinServer)
    assert server.port is not None
    async with server:
        transport, _ = await vchan.create_connection(asyncio.Protocol, HOST, server.port)
        assert transport.get_extra_info("vchan_via") == "vchan"
        transport.write(b"x" * 5000)
        transport.write_eof()
        assert await asyncio.wait_for(done, 10) == "vchan"
        transport.close()
    assert bytes(got) == b"x" * 5000
    old = await vchan.create_server(asyncio.Protocol, "old-form", peers=vchan.own_domid())
    assert isinstance(old, vchan.Server)
    old.close()
    await old.wait_closed()


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    (("", 80), {}, ValueError, "host must not be empty"),
    (("localhost", "80"), {}, TypeError, "TCP port must be an int"),
    (("localhost", 70000), {}, ValueError, r"TCP port 70000 is out of range 1\.\.65535"),
    (("localhost", True), {}, TypeError, "TCP port must be an int"),
    ((1.5, 80), {}, TypeError, "domid must be an int"),
])
async def test_bad_connection_addresses(sim_dir: Path, args: tuple[Any, ...],
                                        kwargs: dict[str, Any], error: type[Exception],
                                        match: str) -> None:
    with pytest.raises(error, match=match):
        await vchan.open_connection(*args, **kwargs)


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((HOST, -1), {}, ValueError, r"TCP port -1 is out of range"),
    ((HOST, "80"), {}, TypeError, "TCP port must be an int"),
    ((5, 80), {}, TypeError, "host must be a str"),
    ((8080,), {}, TypeError, r"create_server\(factory, port, peers=\.\.\.\) serves vchan"),
    ((HOST, 0), {"grace": -1}, ValueError, "grace must be"),
    ((HOST, 0), {"ssl": ssl.create_default_context()}, vchan.LocalProtocolError,
     "does not do TLS"),
])
async def test_bad_server_addresses(sim_dir: Path, args: tuple[Any, ...],
                                    kwargs: dict[str, Any], error: type[Exception],
                                    match: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    with pytest.raises(error, match=match):
        await vchan.start_server(handler, *args, **kwargs)


async def test_without_an_emulator_no_hint_is_looked_for_and_none_is_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vchan import backend, sim

    monkeypatch.setenv("VCHAN_SIM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("VCHAN_BACKEND", "sim")
    backend._reset_for_tests()
    dropin.forget_hints()
    try:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(5))
            w.close()

        server = await asyncio.start_server(handle, HOST, 0)
        async with server:
            reader, writer = await vchan.open_connection(HOST, server.sockets[0].getsockname()[1])
            writer.write(b"hello")
            assert await reader.read() == b"hello"
            assert dropin.via(writer) == "tcp"
            writer.close()
        await asyncio.sleep(0.3)        # (nothing started later either: no index watch)
        assert not sim.is_running(tmp_path / "nowhere")
    finally:
        monkeypatch.undo()
        backend._reset_for_tests()
        dropin.forget_hints()
        with contextlib.suppress(Exception):
            sim.stop(tmp_path / "nowhere")


async def test_a_token_presented_by_another_domain_than_the_hellos_is_refused(
        domains: Children) -> None:
    """The token goes to whoever holds the TCP connection, for the domain its
    HELLO named; a vchan stream from any other domain that presents it is
    refused, and the token stays unused for its own domain."""
    from domains import DomainProcess

    server, port = await _server(domains)

    async def hello(domid: int, nonce: bytes = b"n" * 16,
                    ) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(upgrade.Hello(domid, nonce).encode())
        answer = upgrade.AnswerReader()
        got = None
        while got is None:
            got = answer.feed(await reader.read(100))
        return got, reader, writer

    async def claim(token: bytes) -> bytes:
        """Present ``token`` on a new vchan stream (we are domain 0); what comes back."""
        stream_reader, stream_writer = await vchan.open_connection(1, upgrade.dropin_port(port),
                                                                   timeout=10)
        stream_writer.write(upgrade.Claim(token).encode())
        try:
            return await asyncio.wait_for(stream_reader.readexactly(upgrade.ACCEPT_SIZE), 10)
        except (ConnectionError, asyncio.IncompleteReadError):
            return b""
        finally:
            stream_writer.close()

    # A domain that does not exist is declined (serving it would cost a watch).
    declined, _, writer = await hello(42)
    assert declined == upgrade.Decline("no domain 42 on this host")
    writer.close()
    # An offer to us (domain 0), and one to domain 2, which we ask for too.
    ours, _, our_tcp = await hello(0, b"0" * 16)
    vm = DomainProcess(2)
    try:
        vm("_presence = GrantMapper()")
        theirs, reader, writer = await hello(2)
    finally:
        vm.close()
    assert isinstance(ours, upgrade.Offer) and isinstance(theirs, upgrade.Offer)
    assert ours.domid == theirs.domid == 1
    # Domain 2's token, presented by domain 0: refused, no ACCEPT.
    assert await claim(theirs.token) == b""
    assert not reader.at_eof()      # (its TCP connection still waits for domain 2)
    # Our own token: ACCEPT with our nonce, and the TCP connection is closed.
    assert await claim(ours.token) == upgrade.Accept(b"0" * 16).encode()
    writer.close()
    our_tcp.close()
    await writer.wait_closed()
    server.close_stdin()
    server.wait(10)
    # The declined connection and ours went to the application; nothing else did.
    conns = [json.loads(line)["conn"] for line in server.rest()]
    assert sorted(c["via"] for c in conns) == ["tcp", "vchan"]


async def test_the_advertisement_goes_when_the_server_closes(sim_dir: Path) -> None:
    from vchan.xenstore import XenStore

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    own = vchan.own_domid()
    server = await vchan.start_server(handle, None, 0)
    port = server.port
    assert "127.0.0.1" in server.advertised
    claim = f"/local/domain/{own}/data/vchan-dropin/{port}"
    entry = f"{dropin.INDEX}/{own}-{port}"
    xs = await XenStore.open()
    try:
        assert set((await xs.read(claim)).decode().split()) == set(server.advertised)
        assert f"{own}-{port}" in await xs.directory(dropin.INDEX)
        # Readable by every domain, writable by none but its own.
        assert [str(p) for p in await xs.get_perms(claim)] == [f"r{own}"]
        assert [str(p) for p in await xs.get_perms(entry)] == [f"r{own}"]
        server.close()                  # (no wait_closed(): it goes anyway)
        for _ in range(100):
            if f"{own}-{port}" not in await xs.directory(dropin.INDEX):
                break
            await asyncio.sleep(0.02)
        with pytest.raises(FileNotFoundError):
            await xs.read(claim)
        with pytest.raises(FileNotFoundError):
            await xs.read(entry)
        await server.wait_closed()
    finally:
        await xs.close()


async def test_a_server_that_starts_right_after_a_lookup_is_found_at_once(sim_dir: Path) -> None:
    """A lookup that found nothing is not believed for HINT_TTL: the client's
    watch on the index sees the new server, and the next connection upgrades."""
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100))
        w.close()

    dropin.forget_hints()
    plain = await asyncio.start_server(echo, HOST, 0)
    async with plain:
        t0 = time.monotonic()
        _, w = await vchan.open_connection(HOST, plain.sockets[0].getsockname()[1])
        assert dropin.via(w) == "tcp"   # the index was read: nothing there
        w.close()
        await asyncio.sleep(0.1)        # (the watch is set up)
        server = await vchan.start_server(echo, HOST, 0)
        async with server:
            assert server.port is not None
            await asyncio.sleep(0.05)   # (its index entry's watch event comes)
            r, w = await vchan.open_connection(HOST, server.port)
            assert time.monotonic() - t0 < dropin.HINT_TTL
            assert dropin.via(w) == "vchan"
            w.write(b"ping")
            assert await r.read(100) == b"ping"
            w.close()


async def test_cancelling_serve_forever_closes_either_kind_of_server(sim_dir: Path) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    dropin.forget_hints()
    for server in (await vchan.start_server(handle, HOST, 0),
                   await vchan.start_server(handle, "forever", peers=vchan.own_domid())):
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.05)
        assert server.is_serving()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
