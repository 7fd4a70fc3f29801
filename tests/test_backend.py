"""Backend selection, the emulator's life cycle and the `vchan sim` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vchan._native import ffi, lib

from vchan import backend, sim


def test_unknown_backend_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCHAN_BACKEND", "kvm")
    with pytest.raises(backend.BackendError, match="unknown vchan backend 'kvm'"):
        backend.select_backend()


@pytest.mark.skipif(os.path.exists("/dev/xen/gntalloc"), reason="this is a Xen domain")
def test_xen_backend_without_xen_says_why() -> None:
    with pytest.raises(backend.BackendError, match=r"needs /dev/xen/gntalloc.*VCHAN_BACKEND=sim"):
        backend.select_backend("xen")


def test_autodetect_picks_sim_without_xen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VCHAN_BACKEND", raising=False)
    expected = "xen" if os.path.exists("/dev/xen/gntalloc") else "sim"
    assert backend.default_backend_name() == expected


@pytest.mark.parametrize("value", ["abc", "-1", "40000"])
def test_bad_domid_is_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VCHAN_DOMID", value)
    with pytest.raises(backend.BackendError, match="VCHAN_DOMID"):
        backend.select_backend("sim")


@pytest.mark.skipif(os.path.exists("/dev/xen/gntalloc"), reason="this is a Xen domain")
@pytest.mark.parametrize("kind", ["VK_GNTSHR", "VK_GNTTAB", "VK_EVTCHN"])
def test_xen_devices_are_built_in_and_fail_cleanly_without_xen(kind: str) -> None:
    """kernel/xen.c is compiled into every install; without /dev/xen it says ENOENT."""
    ops = lib.vk_backend(b"xen")
    assert ops != ffi.NULL
    dev = ffi.new("struct vk_dev *")
    assert lib.vk_open(dev, ops, getattr(lib, kind), 0) == -2       # -ENOENT
    assert dev.fd == -1


def test_operations_on_a_closed_handle_are_refused(sim_dir: Path) -> None:
    from vchan.devices import EventChannel, GrantSharer

    ev = EventChannel()
    ev.close()
    with pytest.raises(ValueError, match="evtchn handle is closed"):
        ev.notify(1)
    shr = GrantSharer()
    shr.close()
    with pytest.raises(ValueError, match="gntalloc handle is closed"):
        shr.share(0, 1)


def test_bad_page_counts_are_refused(sim_dir: Path) -> None:
    from vchan.devices import GrantSharer

    with GrantSharer() as shr:
        for count in (0, -1):
            with pytest.raises(ValueError, match="page count must be a positive int"):
                shr.share(0, count)


def test_leaked_handles_warn(sim_dir: Path) -> None:
    import gc

    from vchan.devices import EventChannel

    ev = EventChannel()
    with pytest.warns(ResourceWarning, match="unclosed <EventChannel"):
        del ev
        gc.collect()


def test_a_program_that_exits_closes_its_device_handles(sim_dir: Path) -> None:
    # The process's shared gntalloc/gntdev handles (vchan.endpoint.devices)
    # live until it exits: closed then, not left to the collector's warning.
    code = """if True:
        import asyncio, atexit, sys

        def after_vchan():          # registered first: runs after vchan's own
            from vchan import endpoint
            handles = (endpoint._devices._sharer, endpoint._devices._mapper)
            print("closed at exit:", [h.closed for h in handles])

        atexit.register(after_vchan)
        import vchan

        async def main():
            async def echo(reader, writer):
                writer.write(await reader.read(5))
                writer.close()

            own = vchan.own_domid()
            async with await vchan.start_server(echo, "exit", peers=own):
                reader, writer = await vchan.open_connection(own, "exit", timeout=10)
                writer.write(b"hello")
                print((await reader.read()).decode())
                writer.close()
                await writer.wait_closed()

        asyncio.run(main())
    """
    done = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "hello\nclosed at exit: [True, True]\n"


def test_concurrent_first_use_starts_exactly_one_emulator(tmp_path: Path) -> None:
    directory = tmp_path / "sim"
    code = ("from vchan import sim; sim.ensure_running(); "
            "print(sim.control({'cmd': 'status'})['pid'])")
    env = dict(os.environ, VCHAN_SIM_DIR=str(directory))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    try:
        pids = {p.communicate(timeout=30)[0].strip() for p in procs}
        assert len(pids) == 1, pids
        # A second daemon started by hand refuses to run beside it.
        second = subprocess.run([sys.executable, "-m", "vchan.sim.hypervisor", "--dir",
                                 str(directory)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "another daemon already runs" in second.stderr
    finally:
        assert sim.stop(directory)
    assert not sim.is_running(directory)


def _vchan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vchan", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_sim_command_start_status_set_stop(tmp_path: Path) -> None:
    env = dict(os.environ, VCHAN_SIM_DIR=str(tmp_path / "sim"))
    assert "started" in _vchan("sim", "start", env=env).stdout
    assert "already running" in _vchan("sim", "start", env=env).stdout
    out = _vchan("sim", "set", "grant-limit", "77", env=env)
    assert out.returncode == 0 and "grant-limit = 77" in out.stdout
    assert (tmp_path / "sim" / "grant-limit").read_text().strip() == "77"
    status = _vchan("sim", "status", env=env)
    assert "grant limit 77 pages" in status.stdout
    # The XenStore tree, as xenstore-ls prints it (dom0's view).
    tree = _vchan("sim", "ls", "/local/domain", env=env)
    assert tree.returncode == 0, tree.stderr
    assert tree.stdout.splitlines()[:2] == ['0 = ""', '  data = ""']
    assert '  name = "Domain-0"' in tree.stdout
    for path in ("/nowhere", "relative"):
        missing = _vchan("sim", "ls", path, env=env)
        assert missing.returncode == 2 and missing.stderr.startswith("vchan: sim ls: ")
    bad = _vchan("sim", "set", "grant-limit", "lots", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("vchan: ") and "Traceback" not in \
        bad.stderr
    assert "stopped" in _vchan("sim", "stop", env=env).stdout
    gone = _vchan("sim", "status", env=env)
    assert gone.returncode == 1 and "no emulator running" in gone.stderr
