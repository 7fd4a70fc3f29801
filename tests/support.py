"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import shutil

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
