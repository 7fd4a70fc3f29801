"""vchan.testing: a user's own tests get a private emulator and domains.

The user's test file below runs in a pytest of its own (a subprocess, in a
directory without this suite's conftest), where the plugin comes from vchan's
``pytest11`` entry point as it does for any user who installed vchan.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

USER_TESTS = '''
import asyncio
import os
import sys

import vchan
from vchan.testing import Emulator

PEER = """
import asyncio, vchan
async def main():
    r, w = await vchan.open_connection(0, 'svc', timeout=10)
    w.write(b'from domain %d' % vchan.own_domid())
    await w.drain()
    w.close()
    await w.wait_closed()
asyncio.run(main())
"""


def test_the_emulator_is_private_and_this_process_is_domain_0(vchan_emulator):
    assert os.environ["VCHAN_SIM_DIR"] == str(vchan_emulator.directory)
    assert vchan.own_domid() == 0
    assert 0 in vchan_emulator.domains()


def test_a_server_here_and_a_client_in_another_domain(vchan_emulator):
    got = []

    async def handle(reader, writer):
        got.append(await reader.read())
        writer.close()

    async def main():
        server = await vchan.start_server(handle, "svc", peers="any")
        peer = vchan_emulator.popen([sys.executable, "-c", PEER], domid=3)
        try:
            while not got:
                await asyncio.sleep(0.05)
        finally:
            assert await asyncio.to_thread(peer.wait, 30) == 0
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert got == [b"from domain 3"]


def test_vchan_domain_makes_a_domain_exist_for_one_test(vchan_emulator, vchan_domain):
    assert vchan_domain(7) == 7
    assert vchan_emulator.domains()[7]["alive"]


def test_the_domain_of_the_last_test_is_gone(vchan_emulator):
    assert not vchan_emulator.domains().get(7, {}).get("alive")


def test_an_emulator_of_ones_own(tmp_path):
    with Emulator(tmp_path / "s") as emu:
        assert emu.domains()[0]["alive"]
    assert not (tmp_path / "s" / "hypervisor.sock").exists()
'''


def test_a_users_tests_use_the_plugins_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCHAN_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "test_user.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout, done.stdout


def test_the_plugin_is_registered_for_pytest() -> None:
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="pytest11") if e.name == "vchan"] == \
        ["vchan.testing"]
