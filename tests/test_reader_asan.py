"""vchan/_reader.c under AddressSanitizer and UndefinedBehaviorSanitizer.

The reader's C handles references to Python objects: a missing or an extra
one is a crash or a leak some time later, not a failing assertion.  This
builds ``vchan/_reader.c`` with ``-fsanitize=address,undefined`` into a copy
of the vchan package, and runs the reader's tests against that copy (the
differential test against asyncio's reader, the reader on session streams
between processes, and the writer's drain), in a child Python with the
sanitizers' runtimes preloaded; with ``--soak``, the streams conformance suite too.
Every object comes from malloc (``PYTHONMALLOC=malloc``), where ASan sees
it.  Any report fails the run (``halt_on_error``).  Leak detection is off:
CPython itself keeps memory until exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import need

import vchan

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["test_stream_reader.py", "test_stream_reader_session.py", "test_stream_writer.py"]
SOAK_TESTS = ["test_conformance_streams.py"]


def _runtime(cc: str, name: str) -> str | None:
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.timeout(900)
def test_the_reader_c_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    _run_under_sanitizers(tmp_path, TESTS)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_the_streams_conformance_suite_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    _run_under_sanitizers(tmp_path, SOAK_TESTS)


def _run_under_sanitizers(tmp_path: Path, tests: list[str]) -> None:
    cc = shutil.which("gcc")
    need(cc, "gcc (the sanitizers' runtimes are gcc's)")
    assert cc is not None
    runtimes = [_runtime(cc, "libasan.so"), _runtime(cc, "libubsan.so")]
    need(all(runtimes), "gcc's libasan and libubsan (Debian: libgcc-12-dev)")
    package = tmp_path / "vchan"
    shutil.copytree(Path(vchan.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "_reader*.so"))
    include = sysconfig.get_paths()["include"]
    built = package / "_reader.abi3.so"
    cmd = [cc, "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=undefined", "-std=gnu11", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Werror", "-fPIC", "-shared", f"-I{include}",
           str(ROOT / "vchan" / "_reader.c"), "-o", str(built)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stderr}"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "tests")]),
               LD_PRELOAD=" ".join(r for r in runtimes if r),
               PYTHONMALLOC="malloc",          # (pymalloc's arenas hide objects from ASan)
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    # (from tmp_path: sys.path[0] is the working directory, ahead of PYTHONPATH)
    probe = subprocess.run([sys.executable, "-c", "import vchan._reader as r; print(r.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                           timeout=60)
    assert probe.stdout.strip() == str(built), probe.stdout + probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *(str(ROOT / "tests" / t) for t in tests), "--timeout", "240"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                         timeout=1700)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, tail
