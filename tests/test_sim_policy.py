"""On the emulator, a domain bound to what the OS vouches for (issue 14, point 5).

Without a policy any process that reaches the emulator may say it is any
domain (``VCHAN_DOMID``): the development default, kept by every other test.
With ``vchan sim start --bind-domains POLICY`` the emulator checks the uid of
each connection (SO_PEERCRED) against the policy.  These tests run a private
emulator with a policy and real separate processes: processes of this user,
and -- when the suite runs as root -- processes of another user (``nobody``),
which meet a process of root's over vchan.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import AgentError, DomainProcess

from vchan import sim
from vchan.sim.policy import Policy, PolicyError

ROOT = Path(__file__).resolve().parent.parent
ME = os.getuid()
STRANGER = 12345            # a uid nobody here runs as


def _vchan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vchan", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@contextlib.contextmanager
def _emulator(policy: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A private emulator started with ``vchan sim start --bind-domains``.

    Its directory is made under /tmp (pytest's own are private to this user;
    other users must be able to reach the sockets)."""
    top = Path(tempfile.mkdtemp(prefix="vchan-policy-", dir="/tmp"))
    os.chmod(top, 0o755)
    directory = top / "sim"
    env = dict(os.environ, VCHAN_SIM_DIR=str(directory), VCHAN_BACKEND="sim")
    env.pop("VCHAN_DOMID", None)
    (top / "policy").write_text(policy)
    try:
        started = _vchan("sim", "start", "--bind-domains", str(top / "policy"), env=env)
        assert started.returncode == 0, started.stderr
        assert "domains bound to users by" in started.stdout
        yield directory, env
    finally:
        sim.stop(directory)
        shutil.rmtree(top, ignore_errors=True)


def _domain(domid: int, env: dict[str, str]) -> DomainProcess:
    return DomainProcess(domid, env={"VCHAN_SIM_DIR": env["VCHAN_SIM_DIR"],
                                     "VCHAN_BACKEND": "sim"})


# -- the policy file ---------------------------------------------------------------------


def test_policy_rules_ranges_default_and_clear_errors() -> None:
    me = pwd.getpwuid(ME).pw_name
    policy = Policy.parse(f"# who may be which domain\n0 {me}\n1-4  {me}, {STRANGER}\n"
                          f"3\t99\n*  {STRANGER}   # the rest\n", "p")
    assert policy.allowed(0) == {ME}
    assert policy.allowed(3) == {ME, STRANGER, 99}          # lines add up
    assert policy.allowed(5) == policy.allowed(32751) == {STRANGER}
    assert policy.why_not(2, ME) is None
    why = policy.why_not(9, ME)
    assert why is not None and "domain 9 is bound to uid 12345" in why and f"uid {ME}" in why
    assert "given to no user" in (Policy.parse("1 0\n", "p").why_not(2, 0) or "")
    for text, complaint in (("0\n", "say which users"), ("x root\n", "not a domain id"),
                            ("4-2 root\n", "first <= last"), ("32752 root\n", "0..32751"),
                            ("1 no-such-user-here\n", "no user named"),
                            ("1 99999999999\n", "out of range")):
        with pytest.raises(PolicyError, match=complaint) as bad:
            Policy.parse("# ok\n" + text, "the-file")
        assert "the-file line 2" in str(bad.value)


def test_a_bad_policy_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = dict(os.environ, VCHAN_SIM_DIR=str(tmp_path / "sim"))
    (tmp_path / "policy").write_text("1 root\n2-x root\n")
    bad = _vchan("sim", "start", "--bind-domains", str(tmp_path / "policy"), env=env)
    assert bad.returncode == 2 and "line 2" in bad.stderr and "Traceback" not in bad.stderr
    assert not sim.is_running(tmp_path / "sim")
    missing = _vchan("sim", "start", "--bind-domains", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2 and "cannot read the policy" in missing.stderr
    # A policy made bad by hand in the state directory stops the daemon from starting.
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "domains.policy").write_text("oops\n")
    failed = _vchan("sim", "start", env=env)
    assert failed.returncode == 1 and "failed to start" in failed.stderr
    assert "line 1" in (tmp_path / "sim" / "hypervisor.log").read_text()


# -- processes of this user --------------------------------------------------------------


def test_a_denied_claim_names_the_domain_and_why() -> None:
    with _emulator(f"5 {STRANGER}\n6 {ME}\n") as (directory, env):
        denied = _domain(5, env)
        try:
            for code in ("EventChannel()", "GrantSharer()",
                         "from vchan.xenstore import XenStoreSync; XenStoreSync()"):
                with pytest.raises(AgentError) as refused:
                    denied(code)
                assert refused.value.type == "PermissionError", refused.value.message
                assert refused.value.errno == errno.EACCES
                message = refused.value.message
                assert "domain 5 is bound to uid 12345" in message, message
                assert f"this process runs as uid {ME}" in message, message
                assert str(directory / "domains.policy") in message
            # The same through vchan's API and its command.
            with pytest.raises(AgentError) as api:
                denied("import asyncio, vchan\n"
                       "asyncio.run(vchan.open_connection(6, 'p', timeout=1))")
            assert api.value.type == "PermissionError" and "domain 5" in api.value.message
        finally:
            denied.close()
        run = _vchan("sim", "run", "--domid", "5", "--", "true", env=env)
        assert run.returncode == 1 and "domain 5 is bound to uid 12345" in run.stderr
        unlisted = _vchan("sim", "run", "--domid", "7", "--", "true", env=env)
        assert unlisted.returncode == 1 and "domain 7 is given to no user" in unlisted.stderr
        # Nothing of domain 5 or 7 came to life.
        status = sim.control({"cmd": "status"}, directory)
        assert {d["domid"] for d in status["domains"] if d["alive"]} <= {0, 6}
        # The domain this user is given works as ever.
        allowed = _domain(6, env)
        try:
            assert allowed("e = EventChannel(); e.bind_unbound(6) > 0")
            assert allowed("from vchan.xenstore import XenStoreSync\n"
                           "xs = XenStoreSync(); xs.write('data/x', 'y'); xs.read('domid')") \
                == "6"
        finally:
            allowed.close()
        # The emulator's own user (this one) still administers it.
        assert _vchan("sim", "set", "grant-limit", "2048", env=env).returncode == 0


def test_a_default_state_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    """Under /tmp another user could make the default directory first and serve
    there: vchan does not use a default directory that is not its user's own."""
    run = tmp_path / "run"
    (run / "vchan-sim").mkdir(parents=True)
    os.chmod(run / "vchan-sim", 0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env.update(XDG_RUNTIME_DIR=str(run), VCHAN_BACKEND="sim")
    code = "import vchan.devices as d; d.EventChannel()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode != 0
    assert "not a directory of yours" in done.stderr and "mode 777" in done.stderr
    assert not (run / "vchan-sim" / "hypervisor.sock").exists()


# -- processes of another user (needs root) ----------------------------------------------


def _python_for(uid: int) -> list[str] | None:
    """A command that runs this vchan as ``uid``, or None if there is none here."""
    if os.getuid() != 0:
        return None
    paths = [str(ROOT)] + [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1",
               HOME="/tmp")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for python in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            done = subprocess.run([python, "-c", "import vchan._native"], user=uid, group=uid,
                                  env=env, capture_output=True, timeout=60, cwd="/tmp")
        except OSError:
            continue
        if done.returncode == 0:
            return [python]
    return None


NOBODY = 65534


def test_domains_bound_to_real_users_meet_each_other_and_nobody_else() -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("needs root and a Python the nobody user can run vchan with")
    paths = [str(ROOT)] + [p for p in sys.path if p.endswith("site-packages")]
    with _emulator(f"6 {ME}\n9 {NOBODY}\n5 {STRANGER}\n") as (directory, env):
        other = dict(env, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1",
                     HOME="/tmp")

        def as_nobody(domid: int, code: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*python, "-c", code], user=NOBODY, group=NOBODY,
                                  env=dict(other, VCHAN_DOMID=str(domid)), cwd="/tmp",
                                  capture_output=True, text=True, timeout=60)

        # nobody's process serves a port of domain 9 for domain 6, root's.
        client = _domain(6, env)
        try:
            client("import vchan\nalive = EventChannel()")     # domain 6 exists from now
            server = subprocess.Popen(
                [*python, "-c", "import vchan\n"
                                "srv = vchan.Vchan.server(6, 'cross-user'); print('ready')\n"
                                "srv.wait_connected(20); srv.write(srv.recv_exactly(9).upper())\n"
                                "assert srv.read() == b''; srv.close(); print('done')"],
                user=NOBODY, group=NOBODY, env=dict(other, VCHAN_DOMID="9"), cwd="/tmp",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            try:
                assert server.stdout is not None and server.stderr is not None
                assert server.stdout.readline().strip() == "ready", server.stderr.read()
                assert client("c = vchan.Vchan.client(9, 'cross-user', timeout=20)\n"
                              "c.write(b'from root'); answer = c.recv_exactly(9); c.close(); "
                              "answer") == "FROM ROOT"
                out, err = server.communicate(timeout=30)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
            assert server.returncode == 0 and out.strip() == "done", err
        finally:
            client.close()

        # nobody may be domain 9 only, and may not run the emulator.
        probe = ("import errno, vchan.devices as d\n"
                 "try:\n    d.EventChannel(); print('allowed')\n"
                 "except PermissionError as e:\n    print(e)\n")
        assert as_nobody(9, probe).stdout.strip() == "allowed"
        denied = as_nobody(6, probe).stdout
        assert "domain 6 is bound to uid 0 (root)" in denied, denied
        assert f"this process runs as uid {NOBODY} (nobody)" in denied
        admin = as_nobody(9, "from vchan import sim\n"
                             "for cmd in ({'cmd': 'stop'}, {'cmd': 'set', 'key': 'grant-limit',"
                             " 'value': 1}):\n"
                             "    try:\n        sim.control(cmd)\n"
                             "    except PermissionError as e:\n        print(e)\n")
        assert admin.stdout.count("is for uid 0 (root), who runs the emulator") == 2, admin
        assert sim.is_running(directory)
        # Around the control commands, straight to domain 6's XenStore socket:
        # the connection is closed before any request is served.
        sock_path = directory / "xenstore" / "6.sock"
        sim.control({"cmd": "xenstore-socket", "domid": 6}, directory)
        bypass = as_nobody(9, f"""
import socket, struct
s = socket.socket(socket.AF_UNIX)
s.connect({str(sock_path)!r})
s.settimeout(10)
try:
    s.sendall(struct.pack('=IIII', 2, 1, 0, 7) + b'domid\\0')
    print('answer', s.recv(100))
except OSError as e:
    print('refused', e)
""")
        assert "answer b''" in bypass.stdout or "refused" in bypass.stdout, bypass
        # And this user may not be nobody's domain either.
        mine = _domain(9, env)
        try:
            with pytest.raises(AgentError) as refused:
                mine("EventChannel()")
            assert f"domain 9 is bound to uid {NOBODY} (nobody)" in refused.value.message
        finally:
            mine.close()
