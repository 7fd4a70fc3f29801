"""The Xen rig's stream roles (``tests/peer_roles.py``) on the emulator.

The rig runs these roles between domUs and dom0 (``tests/xen/roles.py``
imports them); here the same code runs between emulated domains 1 and 2, with
the command lines the rig's tests use, so a role broken for the rig fails the
suite first.  (``test_streams.py`` and ``test_sessions.py`` use the duplex,
echo and many-connection roles too.)
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from procs import Children, Proc
from test_streams import _loop_kind

PEER = Path(__file__).with_name("peer_roles.py")


def _role(children: Children, domid: int, *args: str) -> Proc:
    return children.start([sys.executable, PEER, "--deadline", "60", *args], domid=domid,
                          env={"VCHAN_TEST_LOOP": _loop_kind()},
                          name=f"{args[0]} (domain {domid})", grace=2)


def _port() -> str:
    return "r" + uuid.uuid4().hex[:10]


async def test_echo_server_and_client(sim_dir: Path, children: Children) -> None:
    port = _port()
    server = _role(children, 1, "echo-server", port, "--peers", "2", "--connections", "2")
    await server.await_event("listening")
    for seed in (1, 2):
        client = _role(children, 2, "echo-client", "1", port, "--bytes", "300000",
                       "--seed", str(seed))
        await client.await_event("connected")
        echoed = await client.aevent()
        assert echoed["result"] == "echoed" and echoed["match"] and not echoed["extra"]
        assert client.wait(30) == 0
    served = await server.aevent()
    assert served["result"] == "served"
    assert [c["received"] for c in served["connections"]] == [300000, 300000]
    assert server.wait(30) == 0


async def test_hold_client_sees_its_server_go(sim_dir: Path, children: Children) -> None:
    port = _port()
    server = _role(children, 1, "hold-server", port, "--peers", "2")
    await server.await_event("listening")
    client = _role(children, 2, "hold-client", "1", port)
    assert (await client.await_event("connected"))["line"] == "hello"
    assert (await server.await_event("connected"))["line"] == "hello"
    server.kill()
    gone = await client.aevent(20)
    assert gone["result"] == "peer-gone" and gone["outcome"] in ("reset", "eof"), gone


async def test_many_client_against_an_echo_server(sim_dir: Path, children: Children) -> None:
    port = _port()
    server = _role(children, 1, "echo-server", port, "--peers", "2", "--connections", "50",
                   "--summary")
    await server.await_event("listening")
    client = _role(children, 2, "many-client", "1", port, "--connections", "50")
    await client.await_event("opened")
    many = await client.aevent()
    assert many["result"] == "many", many
    assert many["opened"] == many["echoed"] == many["closed"] == 50 and not many["errors"]
    served = await server.aevent()
    assert served["connections"] == 50 and served["errors"] == 0, served


async def test_setup_client_against_the_bench_server(sim_dir: Path,
                                                    children: Children) -> None:
    port = _port()
    server = _role(children, 1, "bench-server", "vchan", port, "--peers", "2")
    await server.await_event("listening")
    client = _role(children, 2, "setup-client", "1", port, "--count", "20")
    setup = await client.aevent()
    while "event" in setup:         # "retry" while the server comes up
        setup = await client.aevent()
    assert setup["result"] == "setup" and setup["count"] == 20, setup
    assert client.wait(30) == 0
