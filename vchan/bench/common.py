"""What every part of the benchmark suite shares.

The names of what is compared (transports, loops, receivers, directions),
the result type and the error of a failed measurement, sizes and lists as
the command line writes them and the report prints them, and the readings a
child process takes of itself (CPU time, memory, latency percentiles).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

TRANSPORTS = ("vchan", "unix", "tcp")
LOOPS = ("asyncio", "uvloop")
RECEIVERS = ("streams", "protocol", "buffered")
DIRECTIONS = ("one", "both")
READ_SIZE = 1 << 20                 # reader.read() size and the BufferedProtocol's buffer
BACKLOG = 4096                      # listen backlog (Linux's somaxconn): many arrive at once

#: A results row, a command to a child, a child's answer: JSON objects.
Json = dict[str, Any]


class BenchError(RuntimeError):
    """A measurement failed (in this process or in a child)."""


def planned(case: str, transport: str, loop: str, estimate: float, **params: Any) -> Json:
    """One measurement of a plan: what the children are told, and a guess of its length (s)."""
    return {"case": case, "transport": transport, "loop": loop, "estimate": estimate,
            **params}


def plan_fields(m: Json) -> Json:
    """What a result row keeps of its measurement: all but the plan's bookkeeping."""
    return {k: v for k, v in m.items() if k not in ("estimate", "case")}


# ---------------------------------------------------------------------------
# Sizes and lists: the command line's and the report's.
# ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """An argparse type: a size such as 64, 4K, 1M or 1GiB, in bytes."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    value = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated sizes (see :func:`parse_size`)."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from ``allowed``."""
    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def _numbers(text: str, kind: type[float] | type[int], what: str) -> list[Any]:
    """The comma-separated numbers of ``text``, or the argparse error naming ``what``."""
    try:
        return [kind(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def parse_us_list(text: str) -> list[float]:
    """An argparse type: comma-separated microseconds, 0 to 1,000,000."""
    values = _numbers(text, float, "microseconds")
    if any(not 0 <= v <= 1e6 for v in values):
        raise argparse.ArgumentTypeError(f"microseconds from 0 to 1,000,000: {text!r}")
    return values


def parse_counts(text: str) -> list[int]:
    """An argparse type: comma-separated counts, each at least 1."""
    counts = _numbers(text, int, "a list of numbers")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return counts


def human_size(n: Any) -> str:
    """64 B, 4 KiB, 1 MiB; "-" for a non-number."""
    if isinstance(n, bool) or not isinstance(n, int):
        return "-" if n is None else str(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------
# What a process measures of itself.
# ---------------------------------------------------------------------------


def percentiles_us(samples_ns: list[int]) -> Json:
    """p50, p99, p99.9, mean and min in us of samples in ns, and the whole distribution."""
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1e3

    return {"p50_us": pct(50), "p99_us": pct(99), "p99.9_us": pct(99.9),
            "mean_us": statistics.fmean(s) / 1e3, "min_us": s[0] / 1e3, "n": len(s),
            # The distribution, for plots: the latency at each 0.1 % quantile.
            "cdf_us": [s[min(len(s) - 1, i * len(s) // 1000)] / 1e3 for i in range(1001)]}


def rss() -> tuple[int, int]:
    """(resident bytes, of which shared memory such as ring pages) of this process."""
    fields: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssShmem", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("RssShmem", 0) + fields.get("RssFile", 0)


def cpu_seconds() -> float:
    """CPU time of this process so far, user + sys (``getrusage(RUSAGE_SELF)``)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_on(loop_kind: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a fresh event loop of the given kind."""
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
