"""The README's code blocks run as they are written.

* A ``python`` block is a file of ``examples/``: its first line names it
  (``# examples/NAME.py``) and the block is that file, byte for byte.
* A ``sh`` block runs with bash (``-e -o pipefail``) in a directory that has
  the README and ``examples/``, with ``python`` and ``vchan`` the ones under
  test, on a private emulator.  It must exit 0 without a traceback, and every
  ``prints X`` its comments promise must be in its output.
* A block that takes minutes of both cores (the benchmarks) is preceded by
  ``<!-- readme-test: ci: REASON -->``: it runs as written under CI (or with
  ``VCHAN_TEST_BENCH=1``) and is skipped otherwise.
* A block the test does not run is preceded by ``<!-- readme-test: not run:
  REASON -->``; the test pins down which ones those are (and which run under
  CI only), so that a new block runs every time unless someone decides
  otherwise here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import support

from vchan import sim

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(<!-- readme-test: (?P<mode>not run|ci): (?P<why>.*?) -->\n)?"
                   r"```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S)
RUN_BENCH = support.IN_CI or os.environ.get("VCHAN_TEST_BENCH") == "1"

# The first line of each block that is not run, and why (the README says it too).
NOT_RUN = {
    "./scripts/quickstart      # set up (.venv) and run the quick start on the emulator":
        "installs into .venv",
}
# The first line of each block that runs under CI only.
CI_ONLY = {
    "vchan bench --quick      # vchan vs Unix sockets vs TCP loopback, both loops: table "
    "+ targets (about a minute)": "benchmarks",
    ".venv/bin/python benchmarks/ring_throughput.py     # the ring in one process, next to "
    "memcpy": "benchmarks",
}


def _blocks() -> list[tuple[str, str, str | None]]:
    """(language, body, mode) of every fenced block: mode None (run every
    time), "ci" (under CI only) or "not run"."""
    return [(m["lang"], m["body"], m["mode"]) for m in FENCE.finditer(README.read_text())]


def _sh_blocks() -> list[object]:
    return [pytest.param(body, marks=[pytest.mark.skipif(
                not RUN_BENCH, reason="minutes of both cores: CI or VCHAN_TEST_BENCH=1 runs it"),
                pytest.mark.timeout(1800)]) if mode == "ci" else body
            for lang, body, mode in _blocks() if lang == "sh" and mode != "not run"]


def test_every_block_has_a_known_language_and_only_the_listed_ones_are_not_run() -> None:
    blocks = _blocks()
    assert blocks, "no code blocks found"
    assert {lang for lang, _, _ in blocks} <= {"python", "sh", "text"}
    skipped = {body.splitlines()[0] for _, body, mode in blocks if mode == "not run"}
    assert skipped == set(NOT_RUN)
    ci_only = {body.splitlines()[0] for _, body, mode in blocks if mode == "ci"}
    assert ci_only == set(CI_ONLY)


@pytest.mark.parametrize("body", [b for lang, b, _ in _blocks() if lang == "python"],
                         ids=lambda b: b.splitlines()[0].split()[1])
def test_a_python_block_is_its_example_file(body: str) -> None:
    first = body.splitlines()[0]
    match = re.match(r"# (examples/\S+\.py)", first)
    assert match, f"a README python block must name its file: {first!r}"
    assert (ROOT / match[1]).read_text() == body


def _promises(body: str) -> list[str]:
    return [m.strip() for m in re.findall(r"#.*\bprints (.+)$", body, re.M)]


@pytest.mark.parametrize("body", _sh_blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_a_shell_block_runs_as_written(body: str, tmp_path: Path) -> None:
    if "aiohttp" in body:
        support.need(shutil.which("pip") or (Path(sys.executable).parent / "pip").exists(),
                     "pip")
    if "redis_over_vchan" in body:
        for tool in ("redis-server", "redis-benchmark", "redis-cli"):
            support.need(shutil.which(tool), f"{tool} (Debian: redis-server, redis-tools)")
    if "vchan-socket-proxy" in body:
        support.need(Path("/usr/lib/xen-4.17/bin/vchan-socket-proxy").exists(),
                     "Debian's vchan-socket-proxy (apt-get install xen-utils-4.17)")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("README.md", "examples", "benchmarks"):
        (work / name).symlink_to(ROOT / name)
    # `.venv/bin/python` in a block is the Python under test.
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "python").symlink_to(sys.executable)
    script = tmp_path / "block.sh"
    script.write_text(body)
    private = tmp_path / "sim"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCHAN_")}
    env.update(VCHAN_SIM_DIR=str(private), PYTHON=sys.executable,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=work, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    limit = 1700 if body.splitlines()[0] in CI_ONLY else 180
    try:
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            # Say what it had done by then (what it printed, the emulator's
            # view), not just that it did not end.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
            log = private / "hypervisor.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(none)"
            pytest.fail(f"the block did not end within {limit} s; it printed:\n{out}\n"
                        f"the emulator's log ends:\n{tail}")
    finally:
        # Whatever the block left behind (it should leave nothing).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sim.stop(private)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    for promise in _promises(body):
        assert promise in out, f"the README says it prints {promise}:\n{out}"
    if "--out DIR" in body:
        # What the README says the full run writes.
        assert (work / "DIR" / "report.md").is_file(), out
        assert list((work / "DIR").glob("*.json")), out
        assert list((work / "DIR").glob("*.png")), out


@pytest.mark.skipif(not (support.IN_CI or os.environ.get("VCHAN_TEST_DIST") == "1"),
                    reason="sets up a venv in a fresh clone (a minute or two): CI or "
                           "VCHAN_TEST_DIST=1 runs it")
@pytest.mark.timeout(1200)
def test_the_quick_start_runs_as_written_in_a_fresh_clone(tmp_path: Path) -> None:
    """The README's quick start, its first command as printed, in a fresh clone
    of this commit (the block's other command, ``./scripts/test``, is what CI
    runs as ``.ci/run``)."""
    block = next(body for lang, body, mode in _blocks() if mode == "not run"
                 and body.startswith("./scripts/quickstart"))
    command = block.splitlines()[0].split("#")[0].strip()
    assert command == "./scripts/quickstart"
    clone = tmp_path / "vchan"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    private = tmp_path / "sim"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCHAN_", "PYTHON", "VIRTUAL_ENV"))}
    env["VCHAN_SIM_DIR"] = str(private)
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=clone,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=1100)
    finally:
        sim.stop(private)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "(match)" in out, out[-4000:]
    assert (clone / ".venv" / "bin" / "vchan").exists()
