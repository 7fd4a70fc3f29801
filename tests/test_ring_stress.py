"""Two threads hammer one ring under ThreadSanitizer.

``tests/c/ring_stress.c`` is compiled with ``-fsanitize=thread`` together
with ``vchan/ring.c``: a writer thread and a reader thread, server on one side
and client on the other, move 1 GiB per run through a small ring in random
chunks (write / writev / send on one side, read / recv on the other, with
buffer_space / data_ready probes), every byte checked.  Sleeping uses the
ring's notify protocol over an emulated, coalescing event channel, so a lost
wake-up hangs both threads and the program's watchdog exits 2; a data race
makes TSan exit 66; a wrong byte or a ring error exits 1.

Each in-page order (10, 11), the smallest separate ring (12) and two larger
ones are run, the stream going server -> client or client -> server.

Environment:
    VCHAN_STRESS_BYTES  bytes per run (default 1G; suffixes K, M, G)
    VCHAN_STRESS_SEED   base PRNG seed (default 1; each case adds its index)
    CC                  compiler to try first (else clang, then gcc)
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from support import build_c, compiler_candidates, soak_seconds

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "c" / "ring_stress.c"
RING_C = ROOT / "vchan" / "ring.c"

STRESS_BYTES = os.environ.get("VCHAN_STRESS_BYTES", "1G")
BASE_SEED = int(os.environ.get("VCHAN_STRESS_SEED", "1"), 0)
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
RUN_TIMEOUT = 270  # seconds; pytest-timeout (300 s) is the backstop

# (order of the ring carrying the stream, which side writes)
CASES = [
    (10, "server"),
    (11, "client"),
    (12, "server"),
    (16, "client"),
    (20, "server"),
]

PROBE = r"""
#include <pthread.h>
static int x;
static void *f(void *a) { __atomic_fetch_add(&x, 1, __ATOMIC_SEQ_CST); return a; }
int main(void)
{
    pthread_t t;
    if (pthread_create(&t, 0, f, 0)) return 1;
    f(0);
    pthread_join(t, 0);
    return x == 2 ? 0 : 1;
}
"""


def _tsan_compiler(workdir: Path) -> tuple[str | None, str]:
    """The first compiler whose -fsanitize=thread builds and runs a program."""
    src = workdir / "tsan_probe.c"
    src.write_text(PROBE, encoding="utf-8")
    log = ""
    for cc in compiler_candidates(gcc=True):
        exe = workdir / "tsan_probe"
        cmd = [cc, "-fsanitize=thread", "-O1", "-g", "-pthread", str(src), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            log += f"{cc}: cannot build with -fsanitize=thread: {proc.stderr.strip()[-300:]}\n"
            continue
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                             check=False, env={**os.environ, **TSAN_ENV})
        if run.returncode != 0:
            log += f"{cc}: TSan program fails to run: {run.stderr.strip()[-300:]}\n"
            continue
        return cc, log
    return None, log or "no C compiler (clang, gcc or $CC) found"


@pytest.fixture(scope="module")
def stress_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory.mktemp("ring_stress"), "ring_stress", _tsan_compiler,
                   "no compiler with a working ThreadSanitizer",
                   ["-fsanitize=thread", "-O1", "-g", "-pthread", "-I", str(ROOT / "vchan")],
                   [SOURCE, RING_C])


@pytest.mark.parametrize(("order", "writer"), CASES, ids=[f"order{o}-{w}" for o, w in CASES])
def test_ring_stress_tsan(stress_exe: Path, order: int, writer: str) -> None:
    seed = BASE_SEED + CASES.index((order, writer))
    _stress(stress_exe, order, writer, STRESS_BYTES, seed, RUN_TIMEOUT)


@pytest.mark.soak
@pytest.mark.timeout(int(soak_seconds() * 4) + 600)
def test_ring_stress_tsan_soak(stress_exe: Path) -> None:
    """Past the u32 index wrap: about 150 MB/s under TSan for VCHAN_SOAK_SECONDS."""
    seconds = soak_seconds()
    nbytes = max(5 << 30, min(16 << 30, int(seconds * 150e6)))
    _stress(stress_exe, 12, "client", str(nbytes), BASE_SEED + 99, seconds * 4 + 300)


def _stress(stress_exe: Path, order: int, writer: str, nbytes: str, seed: int,
            timeout: float) -> None:
    cmd = [str(stress_exe), "--order", str(order), "--writer", writer,
           "--bytes", nbytes, "--seed", str(seed)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, env={**os.environ, **TSAN_ENV})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s\n{exc.stdout!r}")
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    print(f"\n$ {' '.join(cmd)}  ({elapsed:.1f} s)\n{output.strip()}")

    what = {66: "ThreadSanitizer report", 2: "watchdog: suspected lost wake-up",
            1: "data mismatch or ring error"}.get(proc.returncode, "unexpected exit")
    assert proc.returncode == 0, f"exit status {proc.returncode} ({what}):\n{output[-6000:]}"
    assert "ThreadSanitizer" not in output, output[-6000:]
    assert "ring_stress: OK" in proc.stdout, output[-2000:]
