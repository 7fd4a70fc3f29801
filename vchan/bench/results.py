"""Reading a benchmark's results dict, and writing its values as table cells.

The results come from ``results.json`` files of any age: every reader here
takes what it finds and gives None (or an empty list) for what is missing
or malformed, and every formatter renders None as "-".  Units: MB/s are
decimal (1e6 bytes/s); latencies are in microseconds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .common import LOOPS, TRANSPORTS, Json

SWEEP_RECEIVERS = ("streams", "buffered")
DIRECTION_TEXT = {
    "one": "one direction (client -> server)",
    "both": "both directions at once (sum of both)",
}


# ---------------------------------------------------------------------------
# Reading the results defensively.
# ---------------------------------------------------------------------------


def rows_of(results: Json, key: str) -> list[Json]:
    rows = results.get(key)
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict)]


def ping_rows(results: Json, *, polled: bool = False) -> list[Json]:
    """Back-to-back ping-pong rows at the default settings, or (``polled``)
    with vchan's ``busy_poll=`` given (0: never polls)."""
    return [r for r in rows_of(results, "pingpong")
            if (r.get("busy_poll") is not None) == polled and not r.get("gap_us")]


def sparse_ping_rows(results: Json) -> list[Json]:
    """Ping-pong rows with a pause between requests (``gap_us``)."""
    return [r for r in rows_of(results, "pingpong") if r.get("gap_us")]


def bulk_rows(results: Json) -> list[Json]:
    """Bulk rows; one without a ``direction`` is a one-direction run (older results)."""
    return [{"direction": "one", **r} for r in rows_of(results, "bulk")]


def settings_of(results: Json) -> Json:
    s = results.get("settings")
    return s if isinstance(s, dict) else {}


def num(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def ordered(preferred: Any, seen: Iterable[Any]) -> list[Any]:
    """``preferred`` (a settings list) first, then anything else in ``seen``."""
    out: list[Any] = list(preferred) if isinstance(preferred, list | tuple) else []
    extra = [x for x in dict.fromkeys(seen) if x is not None and x not in out]
    with contextlib.suppress(TypeError):
        extra.sort()
    return out + extra


def loops_of(results: Json) -> list[str]:
    seen = [r.get("loop") for key in ("bulk", "pingpong", "connections", "setup")
            for r in rows_of(results, key)]
    loops = ordered(settings_of(results).get("loops"), seen)
    return loops or list(LOOPS)


def transports_of(results: Json) -> list[str]:
    seen = [r.get("transport") for key in ("bulk", "pingpong", "connections", "setup")
            for r in rows_of(results, key)]
    # Always the three columns, in the canonical order, then any others.
    return ordered(list(TRANSPORTS), seen)


def default_ring_size(results: Json) -> int | None:
    """The vchan ring size of the main tables: ``settings.default_ring_size``.

    Falls back to ``settings.vchan_ring_bytes``, then to the ring size most
    vchan bulk rows have (None when no row says).
    """
    s = settings_of(results)
    for key in ("default_ring_size", "vchan_ring_bytes"):
        value = s.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    counts: dict[int, int] = {}
    for row in bulk_rows(results):
        rs = row.get("ring_size")
        if row.get("transport") == "vchan" and isinstance(rs, int):
            counts[rs] = counts.get(rs, 0) + 1
    if not counts:
        return None
    return max(sorted(counts), key=lambda k: counts[k])


def main_bulk(results: Json) -> list[Json]:
    """Bulk rows of the main tables: unix/tcp, and vchan at the default ring size."""
    default = default_ring_size(results)
    out = []
    for row in bulk_rows(results):
        rs = row.get("ring_size")
        if row.get("transport") != "vchan" or rs is None or rs == default:
            out.append(row)
    return out


def bulk_ratios(results: Json) -> list[Json]:
    """vchan/unix and vchan/tcp of bulk ``bytes_per_s``, vchan at the default ring.

    One entry per (direction, receiver, write_size, loop) that has vchan and
    at least one other transport: ``{"direction", "receiver", "write_size",
    "loop", "vchan_vs_unix"?, "vchan_vs_tcp"?}``.  Above 1: vchan is faster.
    """
    keys = ("direction", "receiver", "write_size", "loop")
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    for row in main_bulk(results):
        rate = num(row.get("bytes_per_s"))
        if rate is None:
            continue
        groups.setdefault(tuple(row.get(k) for k in keys), {})[str(row.get("transport"))] = rate
    out: list[Json] = []
    for group, by in groups.items():
        vchan = by.get("vchan")
        if vchan is None:
            continue
        entry: Json = dict(zip(keys, group, strict=True))
        for other in ("unix", "tcp"):
            if by.get(other):
                entry[f"vchan_vs_{other}"] = vchan / by[other]
        if len(entry) > len(keys):
            out.append(entry)
    return out


def find_row(rows: Iterable[Json], **match: Any) -> Json | None:
    """The last row whose fields equal ``match`` (a later repeat wins)."""
    found = None
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            found = row
    return found


def per_transport(rows: Iterable[Json], **match: Any) -> dict[str, Json | None]:
    """The row of each of vchan, unix and tcp that matches (:func:`find_row`), or None."""
    rows = list(rows)
    return {t: find_row(rows, transport=t, **match) for t in TRANSPORTS}


def get_num(row: Json | None, key: str) -> float | None:
    return None if row is None else num(row.get(key))

# ---------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------


def fmt_mbps(bps: float | None) -> str:
    """Bytes/s as MB/s (1e6): "1,234" from 100 MB/s up, "12.3" below, "-" if None."""
    if bps is None:
        return "-"
    mbps = bps / 1e6
    return f"{mbps:,.0f}" if mbps >= 100 else f"{mbps:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    """``a / b`` to two decimals, "-" when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_us(x: float | None) -> str:
    """Microseconds: one decimal below 100, whole numbers above."""
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def fmt_count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else md_cell(x)


def fmt_kib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:,.1f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s"


def md_table(headers: Sequence[str], right: Sequence[bool], rows: Iterable[Sequence[str]]
           ) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def md_cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, list | tuple):
        return ",".join(md_cell(v) for v in x) if x else "-"
    return str(x).replace("|", "\\|")



def sweep_rows(results: Json) -> list[Json]:
    """vchan bulk rows that say their ring size (the ring-size sweep)."""
    return [r for r in bulk_rows(results)
            if r.get("transport") == "vchan" and isinstance(r.get("ring_size"), int)]
