"""libFuzzer runs of the ring and of the session framing against a hostile
peer (tests/fuzz/ring_fuzz.c, tests/fuzz/mux_fuzz.c).

Each harness is built with ``clang -fsanitize=fuzzer,address,undefined``
together with the C it drives (``vchan/ring.c`` and ``vchan/splice.c``;
``vchan/mux.c`` over ``vchan/ring.c``) and run for a bounded time from a
seed corpus (the ring's: tests/fuzz/corpus/ plus the seeds
tests/fuzz/make_corpus.py generates; the framing's: a few inputs written
here, see ``_mux_seeds``).  Any invariant violation, sanitizer
report, hang longer than 5 s (``-timeout=5``) or leak makes libFuzzer exit
non-zero and the test fail; the crashing input is left in the test's
temporary directory and its path printed.

Environment:
    VCHAN_FUZZ_SECONDS  fuzzing time (default 10: the default suite's smoke run;
                        the soak runs fuzz for VCHAN_SOAK_SECONDS)
    VCHAN_FUZZ_REPORT   write the run's statistics (executions, exec/s, ...)
                        as JSON to this path
    CC                  compiler to try first (else clang, clang-NN)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from support import build_c, compiler_candidates, soak_seconds

ROOT = Path(__file__).resolve().parent.parent
FUZZ_DIR = ROOT / "tests" / "fuzz"
SOURCE = FUZZ_DIR / "ring_fuzz.c"
MUX_SOURCE = FUZZ_DIR / "mux_fuzz.c"
CORPUS = FUZZ_DIR / "corpus"
MUX_C = ROOT / "vchan" / "mux.c"
RING_C = ROOT / "vchan" / "ring.c"
SPLICE_C = ROOT / "vchan" / "splice.c"

FUZZ_SECONDS = int(float(os.environ.get("VCHAN_FUZZ_SECONDS", "10")))
FLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all"]
SAN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1:allocator_may_return_null=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}

PROBE = r"""
#include <stddef.h>
#include <stdint.h>
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    (void)data;
    (void)size;
    return 0;
}
"""


def _fuzz_compiler(workdir: Path) -> tuple[str | None, str]:
    """The first compiler that builds and runs a libFuzzer + ASan + UBSan target."""
    src = workdir / "probe.c"
    src.write_text(PROBE, encoding="utf-8")
    log = ""
    for cc in compiler_candidates():
        exe = workdir / "probe"
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(exe)], capture_output=True,
                              text=True, timeout=120, check=False)
        if proc.returncode != 0:
            log += f"{cc}: cannot build with -fsanitize=fuzzer: {proc.stderr.strip()[-300:]}\n"
            continue
        run = subprocess.run([str(exe), "-runs=1"], capture_output=True, text=True,
                             timeout=60, check=False, env={**os.environ, **SAN_ENV})
        if run.returncode != 0:
            log += f"{cc}: libFuzzer program fails to run: {run.stderr.strip()[-300:]}\n"
            continue
        return cc, log
    return None, log or "no clang (libFuzzer needs clang) found"


def _load_corpus_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vchan_fuzz_make_corpus",
                                                  FUZZ_DIR / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(output: str) -> dict[str, int | float]:
    """libFuzzer's -print_final_stats=1 lines, with the '#N DONE' line as fallback."""
    stats: dict[str, int | float] = {}
    for key, value in re.findall(r"^stat::(\w+):\s+([0-9.]+)\s*$", output, re.MULTILINE):
        stats[key] = float(value) if "." in value else int(value)
    if "number_of_executed_units" not in stats:
        done = re.findall(r"^#(\d+)\s+DONE", output, re.MULTILINE)
        if done:
            stats["number_of_executed_units"] = int(done[-1])
    return stats


@pytest.fixture(scope="module")
def fuzz_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory.mktemp("ring_fuzz"), "ring_fuzz", _fuzz_compiler,
                   "no compiler with libFuzzer + ASan + UBSan", [*FLAGS, "-I", str(ROOT / "vchan")],
                   [SOURCE, RING_C, SPLICE_C])


@pytest.fixture(scope="module")
def mux_fuzz_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory.mktemp("mux_fuzz"), "mux_fuzz", _fuzz_compiler,
                   "no compiler with libFuzzer + ASan + UBSan", [*FLAGS, "-I", str(ROOT / "vchan")],
                   [MUX_SOURCE, MUX_C, RING_C])


def _ring_seeds(corpus: Path) -> None:
    if CORPUS.is_dir():
        shutil.copytree(CORPUS, corpus, dirs_exist_ok=True)
    _load_corpus_generator().write_seeds(corpus)


# mux_fuzz.c's input: two order bytes (10 + b % 7), then operations (op % 16).
_PRODUCE, _CONSUME, _PEEK, _TAKE, _TAKE_RUN, _RUN_LENGTH, _WRITE_DATA = 0, 5, 7, 9, 10, 12, 14
_UNLIMITED, _TWICE_THE_RING = 5, 4       # pick_limit / pick_len choices


def _mux_frame(length: int, seed: int) -> bytes:
    """The peer produces a DATA frame of stream 1 (mode 0: a u16 length, a u32 arg)."""
    return bytes([_PRODUCE, 0]) + struct.pack("<HI", length, seed) + bytes(
        (seed + i) % 256 for i in range(min(length, 512)))


def _mux_seeds(corpus: Path) -> None:
    """A few deep, valid starts for mux_fuzz.c: runs of small frames read
    with run_length and take_run, frames that wrap a small ring, our own
    DATA frames filling the write ring and the peer consuming them."""
    corpus.mkdir(parents=True, exist_ok=True)
    run = bytes([2, 0])         # read ring 4 KiB (separate), write ring 1 KiB (in page)
    for i in range(6):
        run += _mux_frame(20 + i, i)
    run += bytes([_PEEK, _UNLIMITED, _RUN_LENGTH, _TWICE_THE_RING,
                  _TAKE_RUN, _TWICE_THE_RING, _TWICE_THE_RING, _PEEK, _UNLIMITED, _TAKE])
    wrap = bytes([0, 1])        # read ring 1 KiB (in page), write ring 2 KiB (in page)
    for i in range(12):
        wrap += _mux_frame(300 + 7 * i, i) + bytes([_PEEK, _UNLIMITED, _TAKE])
    writes = bytes([3, 2])      # read ring 8 KiB, write ring 4 KiB
    for i in range(8):
        writes += bytes([_WRITE_DATA, 1, 0, 0, 0, 0, 0, _UNLIMITED, i, _CONSUME, 0])
    for name, data in (("seed_run", run), ("seed_wrap", wrap), ("seed_writes", writes)):
        (corpus / name).write_bytes(data)


@pytest.mark.timeout(FUZZ_SECONDS + 240)
def test_ring_fuzz(fuzz_exe: Path, tmp_path: Path) -> None:
    _fuzz(fuzz_exe, tmp_path, FUZZ_SECONDS, _ring_seeds)


@pytest.mark.soak
@pytest.mark.timeout(int(soak_seconds()) + 240)
def test_ring_fuzz_soak(fuzz_exe: Path, tmp_path: Path) -> None:
    """The same, for VCHAN_SOAK_SECONDS (run with --soak)."""
    _fuzz(fuzz_exe, tmp_path, int(soak_seconds()), _ring_seeds)


@pytest.mark.timeout(FUZZ_SECONDS + 240)
def test_mux_fuzz(mux_fuzz_exe: Path, tmp_path: Path) -> None:
    """The session framing (vchan/mux.c) against a peer writing anything."""
    _fuzz(mux_fuzz_exe, tmp_path, max(FUZZ_SECONDS // 2, 1), _mux_seeds)


@pytest.mark.soak
@pytest.mark.timeout(int(soak_seconds()) + 240)
def test_mux_fuzz_soak(mux_fuzz_exe: Path, tmp_path: Path) -> None:
    """The same, for half of VCHAN_SOAK_SECONDS (run with --soak): its code is
    a tenth of the ring's, and CI's time is shared."""
    _fuzz(mux_fuzz_exe, tmp_path, max(int(soak_seconds()) // 2, 1), _mux_seeds)


def _fuzz(fuzz_exe: Path, tmp_path: Path, seconds: int,
          write_seeds: Callable[[Path], None]) -> None:
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    write_seeds(corpus)
    seeds = len(list(corpus.iterdir()))

    cmd = [str(fuzz_exe), f"-max_total_time={seconds}", "-timeout=5",
           "-print_final_stats=1", "-rss_limit_mb=2048", "-max_len=4096",
           f"-artifact_prefix={artifacts}/", str(corpus)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=seconds + 180, check=False,
                              env={**os.environ, **SAN_ENV})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"libFuzzer still running {seconds + 180} s after start: {exc}")
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    stats = _stats(output)
    crashes = sorted(str(p) for p in artifacts.iterdir())
    execs = stats.get("number_of_executed_units")
    rate = stats.get("average_exec_per_sec")
    report = {
        "ok": proc.returncode == 0,
        "exit_status": proc.returncode,
        "seconds": round(elapsed, 3),
        "max_total_time": seconds,
        "executions": execs,
        "exec_per_sec": rate,
        "new_units": stats.get("new_units_added"),
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "seed_inputs": seeds,
        "corpus_inputs": len(list(corpus.iterdir())),
        "artifacts": crashes,
    }
    report_path = os.environ.get("VCHAN_FUZZ_REPORT")
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n$ {' '.join(cmd)}\n{fuzz_exe.name}: {execs} executions in {elapsed:.1f} s "
          f"({rate} exec/s), {report['new_units']} new units, corpus "
          f"{seeds} -> {report['corpus_inputs']} inputs, exit status {proc.returncode}")

    assert proc.returncode == 0, (
        f"libFuzzer exit status {proc.returncode}; crash inputs: {crashes or 'none'}\n"
        f"(replay: VCHAN_FUZZ_TRACE=1 {fuzz_exe} <input>)\n{output[-8000:]}")
    assert execs, f"no execution count in libFuzzer's output:\n{output[-3000:]}"
