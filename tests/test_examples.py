"""The programs in examples/ run as a user runs them: subprocesses in domains 1 and 2.

* ``aiohttp_over_vchan.py``: an unmodified aiohttp application served in
  domain 1 through ``vchan.create_server`` and fetched from domain 2 by an
  aiohttp client whose connector opens vchan connections.
* ``redis_over_vchan.sh``: Debian's redis-server (domain 1) and
  redis-benchmark (domain 2) joined only by two ``vchan proxy`` processes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import support

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _env(domid: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if domid is None:
        env.pop("VCHAN_DOMID", None)
    else:
        env["VCHAN_DOMID"] = str(domid)
    return env


def test_aiohttp_over_vchan(sim_dir: Path, tmp_path: Path) -> None:
    support.need(importlib.util.find_spec("aiohttp"), "aiohttp is not installed")
    script = str(EXAMPLES / "aiohttp_over_vchan.py")
    port = "t" + uuid.uuid4().hex[:12]
    out_path = tmp_path / "serve.out"
    with open(out_path, "wb") as out:
        server = subprocess.Popen([sys.executable, script, "serve", "--port", port,
                                   "--peers", "2"], env=_env(1), cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "serving on vchan port" not in out_path.read_text():
            assert server.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        fetch = subprocess.run([sys.executable, script, "fetch", "--domid", "1", "--port", port],
                               env=_env(2), cwd=ROOT, capture_output=True, text=True,
                               timeout=20)
        assert fetch.returncode == 0, fetch.stdout + fetch.stderr
        lines = fetch.stdout.splitlines()
        assert "GET /hello -> 200 Hello, world!" in lines
        assert "GET /hello?name=domain+2 -> 200 Hello, domain 2!" in lines
        assert "POST /echo (100000 bytes) -> 200 length=100000" in lines
        assert 'POST /echo -> 200 {"length": 4, "body": "ping"}' in lines
        assert "GET /missing -> 404" in lines
        assert lines[-1] == "all responses as expected"
        assert "Traceback" not in fetch.stderr, fetch.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0, out_path.read_text()
        assert "Traceback" not in out_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_redis_over_vchan(sim_dir: Path) -> None:
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        support.need(shutil.which(tool), f"{tool} is not installed (Debian: redis-server, "
                                         "redis-tools)")
    proc = subprocess.Popen(
        ["bash", str(EXAMPLES / "redis_over_vchan.sh"), "-n", "2000", "-c", "10",
         "-t", "set,get,incr", "-q"],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:     # timed out: the script and all it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    output = stdout + stderr
    assert proc.returncode == 0, output
    for test in ("SET", "GET", "INCR"):
        assert re.search(rf"^{test}: [\d.]+ requests per second", stdout, re.M), output
    assert "PONG" in stdout
    assert not re.search(r"\berror\b", output, re.I), output     # as redis-benchmark says it
    assert stdout.rstrip().endswith("benchmark over vchan completed without errors")
