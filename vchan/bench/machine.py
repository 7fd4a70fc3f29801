"""What machine a benchmark ran on, recorded with every result, and its memcpy bandwidth."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

from .common import BenchError


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, kernel, Python and library versions, load; plus ``extra``."""
    cpu = "unknown"
    cache = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if cpu == "unknown" and key in ("model name", "Hardware", "cpu model", "Model"):
                cpu = value.strip()
            if cache is None and key == "cache size":
                cache = value.strip()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cache": cache,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cffi": _version("cffi"),
        "uvloop": _version("uvloop"),
        "vchan": _version("vchan"),
        # A string: a load of 0.00 is not a measurement.
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in load) if load else None,
    }
    info.update(extra)
    return info


def memcpy_bandwidth(block: int = 64 << 20, rounds: int = 8) -> float:
    """Single-core memcpy bandwidth (bytes/s), best of ``rounds`` block copies."""
    src = bytearray(os.urandom(1 << 20) * (block >> 20))
    dst = bytearray(block)
    s_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    d_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    ctypes.memmove(d_addr, s_addr, block)       # fault the pages in
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        ctypes.memmove(d_addr, s_addr, block)
        best = min(best, time.perf_counter() - t)
    if dst != src:
        raise BenchError("memmove produced wrong data")
    return block / best
