"""Helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))


def need(condition: object, reason: str) -> None:
    """Skip the test when a prerequisite is missing -- but fail under CI.

    CI installs every prerequisite (``.ci/run``), so there a missing tool is a
    broken set-up, not a reason to pass quietly.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


def c_compiler() -> str | None:
    """The system C compiler, if any."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def soak_seconds(default: float = 600.0) -> float:
    """How long one soak test may run (VCHAN_SOAK_SECONDS, CI shortens it)."""
    return float(os.environ.get("VCHAN_SOAK_SECONDS", default))


def compiler_candidates(*, gcc: bool = False) -> list[str]:
    """C compilers to try, best first: $CC, clang, clang-NN (and gcc)."""
    names = [os.environ.get("CC", ""), "clang", *(f"clang-{v}" for v in range(20, 13, -1))]
    if gcc:
        names.append("gcc")
    found: list[str] = []
    for name in names:
        path = shutil.which(name) if name else None
        if path and path not in found:
            found.append(path)
    return found


def build_c(workdir: Path, name: str, compiler: Callable[[Path], tuple[str | None, str]],
            missing: str, flags: Sequence[str], sources: Sequence[Path]) -> Path:
    """``workdir/name`` compiled from ``sources`` with warnings as errors, by the
    first C compiler that ``compiler(workdir)`` finds able to (it answers the
    compiler, or None, and its log); ``need`` decides when there is none."""
    cc, log = compiler(workdir)
    need(cc, f"{missing}: {log.strip()}")
    assert cc is not None
    exe = workdir / name
    cmd = [cc, *flags, "-std=gnu11", "-Wall", "-Wextra", "-Werror", *map(str, sources),
           "-o", str(exe)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    print(f"\nbuilt {exe.name} with {cc} in {time.monotonic() - started:.1f} s")
    return exe


@contextlib.contextmanager
def grant_limit(sim_dir: Path, pages: int) -> Iterator[None]:
    """The emulator's grant limit per domain set to ``pages`` for a ``with``
    block, then put back as it was."""
    from vchan import sim

    old = sim.control({"cmd": "status"}, sim_dir)["grant_limit"]
    sim.control({"cmd": "set", "key": "grant-limit", "value": pages}, sim_dir)
    try:
        yield
    finally:
        sim.control({"cmd": "set", "key": "grant-limit", "value": old}, sim_dir)


def attributes_inline(obj: object, attribute: str) -> bool:
    """Whether ``obj`` keeps its attributes inline, as CPython (3.11 on) does
    for an object of up to 29 attributes that nothing asked for its
    ``__dict__`` (``vars()`` makes one): each lookup is then cheapest, and a
    transport or reader looks several up on every call.  ``attribute`` is one
    of the object's own, to tell its dict from attributes that are dicts.
    Skips the test where even a plain object has a dict of its own."""
    import gc

    class Plain:
        def __init__(self) -> None:
            self.a = 1

    if any(type(x) is dict for x in gc.get_referents(Plain())):
        pytest.skip("this Python keeps no attributes inline")
    assert hasattr(obj, attribute)
    return not any(type(x) is dict and attribute in x for x in gc.get_referents(obj))


def wait_for_domain(sim_dir: Path, domid: int, why: Callable[[], str] = lambda: "",
                    timeout: float = 30.0) -> None:
    """Until emulated domain ``domid`` exists (a process of it is connected);
    ``why()`` is the failure's message (a process's stderr, say)."""
    from vchan import sim

    deadline = time.monotonic() + timeout
    while not (sim.is_running(sim_dir) and any(
            d["domid"] == domid and d["alive"]
            for d in sim.control({"cmd": "status"}, sim_dir)["domains"])):
        assert time.monotonic() < deadline, why() or f"no domain {domid} in {timeout} s"
        time.sleep(0.05)
