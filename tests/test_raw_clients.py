"""Clients of a raw (libxenvchan) server take only a ring that is offered.

A raw server serves one client at a time and publishes its next ring when
that client's connection ends.  Its XenStore entry can therefore name a ring
that is taken (another client is connected) or closed (the server is between
clients).  libxenvchan's client maps whatever the entry names: on a taken
ring it writes over the connected client's state, on a closed one it fails.
vchan's clients (asyncio and the blocking ``Vchan``) look at the ring's live
bytes first and wait for the server's next ring, within their timeout;
an entry that stays broken fails within ``RAW_STALE_GRACE``.

The servers run in real separate processes of their own domains.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from domains import DomainProcess

import vchan
from vchan import listener
from vchan.endpoint import Endpoint, RingNotOfferedError

_domids = itertools.count(360)
KINDS = ["asyncio", "dedicated", "blocking"]    # session pool, a ring of its own, Vchan

# A ring published at a path and closed at once, its entry left behind (what
# a client reads while a raw server is between clients).
STALE = ("from vchan.handshake import publish, run_sync\n"
         "from vchan.xenstore import XenStoreSync\n"
         "from vchan.addresses import vchan_path\n"
         "ep = Endpoint.serve(0)\n"
         "with XenStoreSync() as xs:\n"
         "    run_sync(publish(vchan_path({own}, 0, {port!r}), ep.ring_ref, ep.port, {own}, 0), "
         "xs)\n"
         "ep.close()\n")


@pytest.fixture
def server(sim_dir: Path) -> Iterator[DomainProcess]:
    with DomainProcess(next(_domids)) as proc:
        proc("import vchan\nfrom vchan.endpoint import Endpoint")
        yield proc


async def _client(kind: str, domid: int, port: str, timeout: float) -> vchan.Vchan | tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    if kind == "blocking":
        return await asyncio.to_thread(vchan.Vchan.client, domid, port, timeout=timeout)
    return await vchan.open_connection(domid, port, timeout=timeout,
                                       dedicated=kind == "dedicated")


async def _exchange(client: object, server: DomainProcess, data: bytes) -> None:
    """``data`` from the client reaches the server's ``srv``; then closed."""
    if isinstance(client, vchan.Vchan):
        client.send(data)
        assert server(f"srv.wait_connected(5); srv.recv_exactly({len(data)})") == data.decode()
        client.close()
        return
    assert isinstance(client, tuple)
    _reader, writer = client
    writer.write(data)
    await writer.drain()
    assert server(f"srv.wait_connected(5); srv.recv_exactly({len(data)})") == data.decode()
    writer.close()
    await writer.wait_closed()


async def _waits_until(kind: str, server: DomainProcess, port: str, seconds: float,
                       publish: Callable[[], object]) -> None:
    """A client of ``port`` still waits after ``seconds``; once ``publish()``
    has made the server's next ring, it connects to it and its bytes arrive."""
    client = asyncio.ensure_future(_client(kind, server.domid, port, 30))
    await asyncio.sleep(seconds)
    assert not client.done()            # waiting, not connected to a ring not offered
    publish()
    await _exchange(await asyncio.wait_for(client, 30), server, b"next")
    server("srv.close()")


def test_a_ring_that_is_taken_or_closed_is_not_taken_over(server: DomainProcess) -> None:
    server("srv = vchan.Vchan.server(0, 'taken')")
    with vchan.Vchan.client(server.domid, "taken", timeout=10) as first:
        ref, port = server("srv._ep.ring_ref"), server("srv._ep.port")
        with pytest.raises(RingNotOfferedError, match="serves another client") as err:
            Endpoint.connect(server.domid, ref, port)
        assert err.value.taken
        # The connected client saw nothing of that.
        first.send(b"still mine")
        assert server("srv.recv_exactly(10)") == "still mine"
    server("srv.close()")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_client_of_a_busy_raw_server_waits_for_its_next_ring(
        server: DomainProcess, kind: str) -> None:
    server("srv = vchan.Vchan.server(0, 'busy')")
    first = vchan.Vchan.client(server.domid, "busy", timeout=10)

    def first_leaves() -> None:
        first.send(b"first")
        assert server("srv.wait_connected(5); srv.recv_exactly(5)") == "first"
        first.close()
        server("srv.close()\nsrv = vchan.Vchan.server(0, 'busy')")     # the next ring

    await _waits_until(kind, server, "busy", 0.5, first_leaves)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_that_times_out_on_a_busy_raw_server_says_so(
        server: DomainProcess, kind: str) -> None:
    server("srv = vchan.Vchan.server(0, 'busy-timeout')")
    with vchan.Vchan.client(server.domid, "busy-timeout", timeout=10):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 1(\.0)? s \(.*serves another client\)"):
            await _client(kind, server.domid, "busy-timeout", 1)
        assert time.monotonic() - start < 3
    server("srv.close()")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_entry_of_a_raw_server_between_clients_is_waited_past(
        server: DomainProcess, kind: str) -> None:
    server(STALE.format(own=server.domid, port="between"))
    await _waits_until(kind, server, "between", 0.3,
                       lambda: server("srv = vchan.Vchan.server(0, 'between')"))  # a new entry


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_entry_that_stays_fails_within_the_grace_not_the_timeout(
        server: DomainProcess, kind: str) -> None:
    server(STALE.format(own=server.domid, port="gone"))
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        await _client(kind, server.domid, "gone", 30)
    waited = time.monotonic() - start
    assert listener.RAW_STALE_GRACE <= waited < listener.RAW_STALE_GRACE + 2, waited
    assert not isinstance(err.value, TimeoutError)
    assert f"domain {server.domid}" in str(err.value)
