"""vchan.Vchan: the blocking / non-blocking API for code without asyncio."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from domains import DomainProcess

import vchan
from vchan.ring import NOTIFY_HELLO, OFFSET_CLI_LIVE, OFFSET_SRV_LIVE

# Page 0 of libxenvchan: the two live bytes, then the two notify bytes in the
# same order; each side's notify byte carries the extension bits its peer set.
CLI_NOTIFY, SRV_NOTIFY = OFFSET_CLI_LIVE + 2, OFFSET_SRV_LIVE + 2


def test_blocking_exchange_between_two_domains(sim_dir: Path) -> None:
    with DomainProcess(1) as d1, DomainProcess(2) as d2:
        d2("import vchan; _presence = GrantMapper()")
        d1("import vchan; srv = vchan.Vchan.server(2, 'sync', read_min=4096, write_min=4096)")
        assert d1("srv.is_open() and not srv.connected")        # waiting for the client
        d2("cli = vchan.Vchan.client(1, 'sync', timeout=10)")
        d1("srv.wait_connected(5)")
        assert d1("srv.connected")
        # Larger than the 4 KiB rings: blocking write waits for the reader.
        d2("import threading\n"
           "data = bytes(range(256)) * 1000\n"
           "t = threading.Thread(target=cli.write, args=(data,)); t.start()")
        got = d1("buf = bytearray()\n"
                 "while len(buf) < 256000: buf += srv.read(65536)\n"
                 "len(buf), bytes(buf) == bytes(range(256)) * 1000")
        assert got == [256000, True]
        d2("t.join()")
        d1("srv.send(b'12345678')")
        assert d2("cli.recv_exactly(8)") == "12345678"
        d2("cli.close()")
        assert d1("srv.read()") == ""                           # end of stream
        with pytest.raises(Exception, match="BrokenPipeError"):
            d1("srv.write(b'x')")
        d1("srv.close()")


def test_non_blocking_calls_raise_blocking_io_error(sim_dir: Path) -> None:
    own = vchan.own_domid()
    with vchan.Vchan.server(own, "nb", read_min=1024, write_min=2048, blocking=False) as srv, \
            vchan.Vchan.client(own, "nb", timeout=10, blocking=False) as cli:
        with pytest.raises(BlockingIOError, match="read would block"):
            srv.read()
        with pytest.raises(BlockingIOError, match="recv_exactly would block"):
            srv.recv_exactly(4)
        assert cli.write(b"a" * 5000) == 1024                   # partial: what fits
        with pytest.raises(BlockingIOError, match="ring is full"):
            cli.write(b"b")
        with pytest.raises(BlockingIOError):
            cli.send(b"c")
        assert srv.data_ready() == 1024
        assert srv.read(5000) == b"a" * 1024
        assert cli.wait(1.0)                                    # the reader woke us
        assert cli.buffer_space() == 1024
        assert srv.fileno() >= 0


def test_half_close_and_misuse(sim_dir: Path) -> None:
    own = vchan.own_domid()
    srv = vchan.Vchan.server(own, "misuse-sync")
    cli = vchan.Vchan.client(own, "misuse-sync", timeout=10)
    cli.write(b"last")
    cli.write_eof()
    assert srv.read() == b"last"
    assert srv.read() == b""                                    # EOF after the data
    srv.write(b"still ok")                                      # the other way still works
    assert cli.read() == b"still ok"
    cli.close()
    srv.close()
    with pytest.raises(ValueError, match="closed Vchan"):
        srv.read()
    with pytest.raises(ValueError, match="closed Vchan"):
        cli.write(b"x")


def _as_if_the_peer_were_plain(endpoint: vchan.endpoint.Endpoint) -> None:
    """Clear the HELLO its vchan peer set: what a plain libxenvchan peer leaves."""
    offset = SRV_NOTIFY if endpoint.is_server else CLI_NOTIFY
    with memoryview(endpoint.pages[0].buffer()) as page0:
        page0[offset] &= ~NOTIFY_HELLO & 0xFF


async def test_write_eof_to_a_plain_peer_is_one_error_from_vchan_and_the_transport(
        sim_dir: Path) -> None:
    """Vchan and the asyncio transport refuse a half-close the peer cannot see
    with the same error: HalfCloseUnsupportedError, a LocalProtocolError and
    the NotImplementedError asyncio's transports raise when can_write_eof()
    is False."""
    own = vchan.own_domid()
    with vchan.Vchan.server(own, "plain-eof") as srv:
        transport, _ = await vchan.create_connection(asyncio.Protocol, own, "plain-eof",
                                                     timeout=10)
        try:
            await asyncio.to_thread(srv.wait_connected, 10)
            assert srv.can_write_eof() and transport.can_write_eof()
            _as_if_the_peer_were_plain(srv._ep)
            _as_if_the_peer_were_plain(transport.get_extra_info("endpoint"))
            assert not srv.can_write_eof() and not transport.can_write_eof()
            errors = []
            for half_close in (srv.write_eof, transport.write_eof):
                with pytest.raises(vchan.HalfCloseUnsupportedError) as info:
                    half_close()
                errors.append(info.value)
            assert [type(e) for e in errors] == [vchan.HalfCloseUnsupportedError] * 2
            assert str(errors[0]) == str(errors[1])
            assert all(isinstance(e, NotImplementedError)
                       and isinstance(e, vchan.LocalProtocolError) for e in errors)
            srv.write(b"still open")                            # a refusal, not a failure
            assert not transport.is_closing()
        finally:
            transport.close()


def test_recv_is_a_deprecated_alias_of_recv_exactly(sim_dir: Path) -> None:
    own = vchan.own_domid()
    with vchan.Vchan.server(own, "old-recv") as srv, \
            vchan.Vchan.client(own, "old-recv", timeout=10) as cli:
        cli.send(b"exactly8")
        with pytest.warns(DeprecationWarning, match=r"recv_exactly\(n\)"):
            assert srv.recv(8) == b"exactly8"
        with pytest.warns(DeprecationWarning), \
                pytest.raises(BlockingIOError, match="recv_exactly would block"):
            srv.blocking = False
            srv.recv(1)


def test_vchan_vchan_is_a_deprecated_alias_of_vchan_blocking(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "vchan.vchan", raising=False)
    with pytest.warns(DeprecationWarning, match="vchan.blocking"):
        old = importlib.import_module("vchan.vchan")
    assert old.Vchan is vchan.Vchan and old.own_domid is vchan.own_domid


def test_bad_arguments(sim_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"port -1 is out of range 0\.\.2147483647"):
        vchan.Vchan.server(0, -1)
    with pytest.raises(ValueError, match="largest vchan ring"):
        vchan.Vchan.server(0, 1, read_min=1 << 21)
    with pytest.raises(vchan.NoSuchDomainError):
        vchan.Vchan.client(4321, 1, timeout=1)
    with pytest.raises(TimeoutError):
        vchan.Vchan.client(0, "nobody-home", timeout=0.2)


def test_quick_start_demo_runs(sim_dir: Path) -> None:
    """The README's first command ends in `vchan demo`: keep it working."""
    proc = subprocess.run([sys.executable, "-m", "vchan", "demo", "--mib", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(match)") == 2
    assert "vchan / unix" in proc.stdout
