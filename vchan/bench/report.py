"""Reports of a benchmark run: Markdown tables, target checks, PNG plots.

Everything here is a pure function of the results dict that the measuring
side (:mod:`vchan.bench.streams`) produces and writes as ``results.json``:

* :func:`render_markdown` -- the whole report as Markdown (machine, settings,
  targets, bulk, ring-size sweep, ping-pong, connections, setup rate, and
  the streams matrix of :mod:`vchan.bench.matrix`);
* :func:`check_targets` -- the targets of issues #8, #13 and #15, recorded,
  never asserted;
* :func:`write_plots` -- PNG plots (needs matplotlib, the ``bench`` extra;
  without it, returns ``[]`` and raises nothing: see :data:`PLOTS_HINT`);
* :func:`write_report` -- ``results.json``, ``report.md`` (embedding the
  PNGs by relative links) and the PNGs, in one directory.

Units: MB/s are decimal (1e6 bytes/s); latencies are in microseconds.  Every
ratio is oriented so that above 1 means vchan is better: throughput ratios
are vchan/other, latency ratios other/vchan.  Missing data renders as "-".
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .matrix import check_matrix_targets, matrix_section, write_matrix_plot

Json = dict[str, Any]

TRANSPORTS = ("vchan", "unix", "tcp")
LOOPS = ("asyncio", "uvloop")
RECEIVERS = ("streams", "protocol", "buffered")
DIRECTIONS = ("one", "both")
SWEEP_RECEIVERS = ("streams", "buffered")

#: What to tell the user when :func:`write_plots` returned nothing because
#: matplotlib is missing.
PLOTS_HINT = "PNG plots need matplotlib: pip install 'vchan[bench]'"

RECEIVER_TEXT = {
    "streams": "streams API (StreamReader.read)",
    "protocol": "asyncio.Protocol (data_received)",
    "buffered": "asyncio.BufferedProtocol (get_buffer)",
}
DIRECTION_SHORT = {"one": "one direction", "both": "both directions"}
DIRECTION_TEXT = {
    "one": "one direction (client -> server)",
    "both": "both directions at once (sum of both)",
}

TARGET_WRITE_SIZE = 64 << 10
TARGET_PING_SIZE = 64
TARGET_CONNECTIONS = 1000
TARGET_VS_UNIX = 2.0
TARGET_VS_MEMCPY = 0.5
TARGET_PING_FACTOR = 0.8

_COLORS = {"vchan": "tab:blue", "unix": "tab:orange", "tcp": "tab:green"}
_STYLES = {"asyncio": ("-", "o"), "uvloop": ("--", "s")}
_DPI = 110


# ---------------------------------------------------------------------------
# Reading the results defensively.
# ---------------------------------------------------------------------------


def _rows(results: Json, key: str) -> list[Json]:
    rows = results.get(key)
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict)]


def _ping_rows(results: Json, *, polled: bool = False) -> list[Json]:
    """Ping-pong rows at the default settings, or (``polled``) with vchan's busy_poll."""
    return [r for r in _rows(results, "pingpong") if bool(r.get("busy_poll")) == polled]


def _bulk_rows(results: Json) -> list[Json]:
    """Bulk rows; one without a ``direction`` is a one-direction run (older results)."""
    return [{"direction": "one", **r} for r in _rows(results, "bulk")]


def _settings(results: Json) -> Json:
    s = results.get("settings")
    return s if isinstance(s, dict) else {}


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _ordered(preferred: Any, seen: Iterable[Any]) -> list[Any]:
    """``preferred`` (a settings list) first, then anything else in ``seen``."""
    out: list[Any] = list(preferred) if isinstance(preferred, list | tuple) else []
    extra = [x for x in dict.fromkeys(seen) if x is not None and x not in out]
    with contextlib.suppress(TypeError):
        extra.sort()
    return out + extra


def _loops(results: Json) -> list[str]:
    seen = [r.get("loop") for key in ("bulk", "pingpong", "connections", "setup")
            for r in _rows(results, key)]
    loops = _ordered(_settings(results).get("loops"), seen)
    return loops or list(LOOPS)


def _transports(results: Json) -> list[str]:
    seen = [r.get("transport") for key in ("bulk", "pingpong", "connections", "setup")
            for r in _rows(results, key)]
    # Always the three columns, in the canonical order, then any others.
    return _ordered(list(TRANSPORTS), seen)


def default_ring_size(results: Json) -> int | None:
    """The vchan ring size of the main tables: ``settings.default_ring_size``.

    Falls back to ``settings.vchan_ring_bytes``, then to the ring size most
    vchan bulk rows have (None when no row says).
    """
    s = _settings(results)
    for key in ("default_ring_size", "vchan_ring_bytes"):
        value = s.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    counts: dict[int, int] = {}
    for row in _bulk_rows(results):
        rs = row.get("ring_size")
        if row.get("transport") == "vchan" and isinstance(rs, int):
            counts[rs] = counts.get(rs, 0) + 1
    if not counts:
        return None
    return max(sorted(counts), key=lambda k: counts[k])


def _main_bulk(results: Json) -> list[Json]:
    """Bulk rows of the main tables: unix/tcp, and vchan at the default ring size."""
    default = default_ring_size(results)
    out = []
    for row in _bulk_rows(results):
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
    for row in _main_bulk(results):
        rate = _num(row.get("bytes_per_s"))
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


def _find(rows: Iterable[Json], **match: Any) -> Json | None:
    """The last row whose fields equal ``match`` (a later repeat wins)."""
    found = None
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            found = row
    return found


def _get(row: Json | None, key: str) -> float | None:
    return None if row is None else _num(row.get(key))


# ---------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------


def human_size(n: Any) -> str:
    """64 B, 4 KiB, 1 MiB; "-" for a non-number."""
    if isinstance(n, bool) or not isinstance(n, int):
        return "-" if n is None else str(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


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


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _us(x: float | None) -> str:
    """Microseconds: one decimal below 100, whole numbers above."""
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else _cell(x)


def _kib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:,.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s"


def _table(headers: Sequence[str], right: Sequence[bool], rows: Iterable[Sequence[str]]
           ) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, list | tuple):
        return ",".join(_cell(v) for v in x) if x else "-"
    return str(x).replace("|", "\\|")


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------


def _target(target: str, value: str, met: bool | None, detail: str) -> Json:
    return {"target": target, "value": value, "met": met, "detail": detail}


def check_targets(results: Json) -> list[Json]:
    """The targets of issue #8, checked against ``results`` (recorded, not asserted).

    Returns ``[{"target", "value", "met", "detail"}]``: ``met`` is True or
    False, or None when the data to decide is missing.  Per event loop:

    1. bulk 64 KiB writes, streams API, one direction: vchan >= 2x Unix;
    2. the same vchan figure >= half of ``memcpy.bytes_per_s``;
    3. ping-pong 64 B: vchan p50 <= Unix p50 / 0.8 (vchan at least 80% as
       fast as Unix sockets);
    4. 1,000 concurrent vchan connections work (``ok``), with the memory per
       idle connection (server + client) in the value.
    """
    loops = _loops(results)
    bulk = _main_bulk(results)
    ping = _ping_rows(results)
    conns = _rows(results, "connections")
    memcpy = results.get("memcpy")
    memcpy_bps = _num(memcpy.get("bytes_per_s")) if isinstance(memcpy, dict) else None
    ring = default_ring_size(results)
    ring_text = f"vchan ring {human_size(ring)}" if ring is not None else "vchan default ring"
    out: list[Json] = []

    for loop in loops:
        where = dict(direction="one", receiver="streams", write_size=TARGET_WRITE_SIZE,
                     loop=loop)
        v = _get(_find(bulk, transport="vchan", **where), "bytes_per_s")
        u = _get(_find(bulk, transport="unix", **where), "bytes_per_s")
        base = (f"bulk, one direction, 64 KiB writes, streams API (StreamReader), "
                f"{loop}, {ring_text}")
        name = f"Bulk 64 KiB streams ({loop}): vchan >= {TARGET_VS_UNIX:g}x Unix sockets"
        if v is None or not u:
            missing = " and ".join(t for t, x in (("vchan", v), ("unix", u)) if not x)
            out.append(_target(name, "-", None, f"{base}: no {missing} measurement"))
        else:
            ratio = v / u
            out.append(_target(
                name, f"{ratio:.2f}x ({fmt_mbps(v)} vs {fmt_mbps(u)} MB/s)",
                ratio >= TARGET_VS_UNIX,
                f"{base}; vchan/unix of bytes/s, needs >= {TARGET_VS_UNIX:g}"))

    for loop in loops:
        where = dict(direction="one", receiver="streams", write_size=TARGET_WRITE_SIZE,
                     loop=loop)
        v = _get(_find(bulk, transport="vchan", **where), "bytes_per_s")
        name = f"Bulk 64 KiB streams ({loop}): vchan >= {TARGET_VS_MEMCPY:g}x memcpy"
        base = "single-core memcpy of large blocks, measured in the same run"
        if v is None or not memcpy_bps:
            missing = " and ".join(t for t, x in (("vchan bulk", v), ("memcpy", memcpy_bps))
                                   if not x)
            out.append(_target(name, "-", None, f"{base}: no {missing} measurement"))
        else:
            ratio = v / memcpy_bps
            out.append(_target(
                name, f"{ratio:.2f}x ({fmt_mbps(v)} vs memcpy {fmt_mbps(memcpy_bps)} MB/s)",
                ratio >= TARGET_VS_MEMCPY,
                f"{base}; vchan/memcpy of bytes/s, needs >= {TARGET_VS_MEMCPY:g}"))

    for loop in loops:
        vp = _get(_find(ping, transport="vchan", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        up = _get(_find(ping, transport="unix", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        name = (f"Ping-pong 64 B ({loop}): vchan p50 no worse than "
                f"{TARGET_PING_FACTOR:g}x Unix sockets")
        base = (f"read as: vchan p50 round trip <= unix p50 / {TARGET_PING_FACTOR:g}, "
                f"i.e. vchan at least {TARGET_PING_FACTOR:.0%} as fast "
                f"(unix p50 / vchan p50 >= {TARGET_PING_FACTOR:g})")
        if not vp or up is None:
            missing = " and ".join(t for t, x in (("vchan", vp), ("unix", up)) if not x)
            out.append(_target(name, "-", None, f"{base}; no {missing} measurement"))
        else:
            speed = up / vp
            out.append(_target(
                name, f"{speed:.2f}x (p50 vchan {_us(vp)} us, unix {_us(up)} us)",
                speed >= TARGET_PING_FACTOR - 1e-12,
                f"{base}; limit for vchan p50: {_us(up / TARGET_PING_FACTOR)} us"))

    polled = _ping_rows(results, polled=True)
    for loop in loops:
        # Issue 15's stricter reading: vchan faster, p50 at most 0.8x Unix's;
        # by default, and (recorded next to it) with busy_poll.
        up = _get(_find(ping, transport="unix", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        for label, rows in (("default", ping), ("busy_poll", polled)):
            row = _find(rows, transport="vchan", message_size=TARGET_PING_SIZE, loop=loop)
            if label == "busy_poll" and row is None:
                continue
            vp = _get(row, "p50_us")
            what = "by default" if label == "default" else \
                f"with busy_poll {(_get(row, 'busy_poll') or 0) * 1e6:g} us"
            name = (f"Ping-pong 64 B ({loop}), {what}: vchan p50 <= "
                    f"{TARGET_PING_FACTOR:g}x Unix p50")
            base = "issue 15: vchan faster than Unix sockets, p50 round trip at most " \
                f"{TARGET_PING_FACTOR:g}x Unix's"
            if not vp or up is None:
                missing = " and ".join(t for t, x in (("vchan", vp), ("unix", up)) if not x)
                out.append(_target(name, "-", None, f"{base}; no {missing} measurement"))
                continue
            out.append(_target(
                name, f"{vp / up:.2f}x (p50 vchan {_us(vp)} us, unix {_us(up)} us)",
                vp <= TARGET_PING_FACTOR * up + 1e-12,
                f"{base}; limit for vchan p50: {_us(TARGET_PING_FACTOR * up)} us"))

    for loop in loops:
        row = _find(conns, transport="vchan", connections=TARGET_CONNECTIONS, loop=loop)
        name = f"{TARGET_CONNECTIONS:,} concurrent vchan connections work ({loop})"
        base = "memory per idle connection = RSS growth / connections, server + client"
        if row is None:
            out.append(_target(name, "-", None, f"no {TARGET_CONNECTIONS:,}-connection "
                                                f"vchan measurement"))
            continue
        server = _get(row, "server_rss_per_conn")
        client = _get(row, "client_rss_per_conn")
        total = None if server is None or client is None else server + client
        memory = (f"{_kib(total)} KiB/connection (server {_kib(server)} + "
                  f"client {_kib(client)} KiB)")
        ok = row.get("ok")
        if ok is True:
            out.append(_target(name, f"ok; {memory}", True,
                               f"{base}; all opened in "
                               f"{_fmt(_get(row, 'connect_seconds'), '.2f')} s"))
        elif ok is False:
            out.append(_target(name, f"failed; {memory}", False,
                               f"{base}; error: {row.get('error') or 'unknown'}"))
        else:
            out.append(_target(name, memory, None, f"{base}; the row has no ok flag"))

    # Issue #13: connection setup and many connections.
    setup = _rows(results, "setup")
    for loop in loops:
        vrow = _find(setup, transport="vchan", loop=loop)
        trow = _find(setup, transport="tcp", loop=loop)
        vr, tr = _get(vrow, "connections_per_s"), _get(trow, "connections_per_s")
        p50 = _get(vrow, "p50_us")
        name = f"Setup ({loop}): vchan connections/s >= TCP loopback, p50 < 150 us"
        if vr is None or tr is None or p50 is None:
            out.append(_target(name, "-", None, "no vchan and TCP setup measurements"))
        else:
            out.append(_target(
                name, f"{vr / tr:.2f}x ({vr:,.0f} vs {tr:,.0f} /s), p50 {_us(p50)} us",
                vr >= tr and p50 < 150,
                "connect + 1 byte echoed + close, one after another"))
    for loop in loops:
        row = _find(conns, transport="vchan", connections=TARGET_CONNECTIONS, loop=loop)
        seconds = _get(row, "connect_seconds") if row is not None else None
        name = f"{TARGET_CONNECTIONS:,} vchan connections opened at once in < 1 s ({loop})"
        if seconds is None:
            out.append(_target(name, "-", None, "no measurement"))
        else:
            out.append(_target(name, f"{_fmt(seconds, '.3f')} s", seconds < 1.0,
                               "all opened concurrently by one client process"))
    counts: set[int] = {r["connections"] for r in conns
                        if isinstance(r.get("connections"), int) and r["connections"] >= 10}
    for n in sorted(counts):
        for loop in loops:
            v = _get(_find(conns, transport="vchan", connections=n, loop=loop), "bytes_per_s")
            u = _get(_find(conns, transport="unix", connections=n, loop=loop), "bytes_per_s")
            name = f"{n:,} connections ({loop}): vchan aggregate >= Unix sockets"
            if v is None:
                out.append(_target(name, "-", None, "no vchan measurement"))
            elif u is None:
                out.append(_target(name, f"{fmt_mbps(v)} MB/s; Unix sockets failed or not run",
                                   None, "nothing to compare with"))
            else:
                out.append(_target(name, f"{v / u:.2f}x ({fmt_mbps(v)} vs {fmt_mbps(u)} MB/s)",
                                   v >= u, "aggregate MB/s of all connections at once"))
    # Issue #16: a drop-in connection to a peer without vchan costs about a TCP connect.
    dropin = [r for r in _rows(results, "dropin") if r.get("what") == "setup"]
    for loop in (loops if dropin else []):
        fall = _get(_find(dropin, transport="dropin-tcp", loop=loop), "p50_us")
        tcp = _get(_find(dropin, transport="tcp", loop=loop), "p50_us")
        name = f"Drop-in ({loop}): a connection that falls back to TCP <= 1.2x a TCP connect"
        if fall is None or tcp is None:
            out.append(_target(name, "-", None, "no drop-in and TCP setup measurements"))
        else:
            out.append(_target(name, f"{fall / tcp:.2f}x (p50 {_us(fall)} vs {_us(tcp)} us)",
                               fall <= 1.2 * tcp,
                               "connect + 1 byte echoed + close: vchan.open_connection(host, "
                               "port) to a plain asyncio TCP server, against "
                               "asyncio.open_connection"))
    # Issue #15: the streams matrix (only when the run has one).
    out += check_matrix_targets(results)
    return out


# ---------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------


def _met(met: Any) -> str:
    return {True: "yes", False: "**no**"}.get(met, "-") if isinstance(met, bool) else "-"


def _header(results: Json) -> list[str]:
    m = results.get("machine")
    m = m if isinstance(m, dict) else {}
    s = _settings(results)

    def g(d: Json, key: str) -> str:
        return _cell(d.get(key))

    lines = [
        "# vchan vs Unix sockets vs TCP loopback",
        "",
        f"- CPU: {g(m, 'cpu')} (cache {g(m, 'cache')}); cores: {g(m, 'cores')} "
        f"({g(m, 'usable_cores')} usable); kernel: {g(m, 'kernel')} {g(m, 'machine')}",
        f"- Python: {g(m, 'python')}; cffi {g(m, 'cffi')}; uvloop {g(m, 'uvloop')}; "
        f"vchan {g(m, 'vchan')}; backend: {g(m, 'backend')}",
        f"- load average at start: {g(m, 'loadavg_at_start')}",
    ]
    memcpy = results.get("memcpy")
    if isinstance(memcpy, dict) and _num(memcpy.get("bytes_per_s")) is not None:
        lines.append(f"- single-core memcpy: {fmt_mbps(_num(memcpy['bytes_per_s']))} MB/s "
                     f"({human_size(memcpy.get('block_bytes'))} blocks)")
    if s:
        settings = [
            "--quick" if s.get("quick") else "full run",
            f"cases={_cell(s.get('cases'))}",
            f"loops={_cell(s.get('loops'))}",
            f"transports={_cell(s.get('transports'))}",
            f"receivers={_cell(s.get('receivers'))}",
            f"bytes={human_size(s.get('bytes'))}",
            f"sizes={','.join(human_size(x) for x in s.get('sizes') or []) or '-'}",
            f"ping-sizes={','.join(human_size(x) for x in s.get('ping_sizes') or []) or '-'}",
            f"rounds={_cell(s.get('rounds'))}",
            f"warmup={_cell(s.get('warmup'))}",
            f"ring-sizes={','.join(human_size(x) for x in s.get('ring_sizes') or []) or '-'}",
            f"default-ring={human_size(s.get('default_ring_size'))}",
            f"connections={_cell(s.get('connection_counts'))}",
        ]
        lines.append(f"- settings: `{' '.join(settings)}`")
        lines.append(f"- started {g(s, 'started')}, took "
                     f"{_duration(_num(s.get('duration_seconds')))}")
    lines += ["",
              "MB/s = 1e6 bytes/s; latencies in microseconds.  Ratios compare transports on "
              "the same event loop and are oriented so that **above 1 means vchan is "
              "better** (throughput vchan/other, latency other/vchan).  \"-\" = not "
              "measured."]
    return lines


def _image(lines: list[str], plots: dict[str, str], name: str, alt: str) -> None:
    link = plots.pop(name, None)
    if link is not None:
        lines += ["", f"![{alt}]({link})"]


def _heading(title: str, rows: Sequence[Any]) -> list[str]:
    """A section's heading, and "Not measured in this run." under it without rows."""
    lines = ["", f"## {title}", ""]
    if not rows:
        lines.append("Not measured in this run.")
    return lines


def _targets_section(results: Json) -> list[str]:
    lines = ["", "## Targets", "",
             "Recorded by the benchmark, not asserted.", ""]
    lines += _table(["target", "value", "met", "detail"], [False, False, False, False],
                    ([_cell(t["target"]), _cell(t["value"]), _met(t["met"]), _cell(t["detail"])]
                     for t in check_targets(results)))
    return lines


def _bulk_sections(results: Json, plots: dict[str, str]) -> list[str]:
    s = _settings(results)
    rows = _main_bulk(results)
    loops = _loops(results)
    lines: list[str] = []
    for direction in _ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
        title = DIRECTION_TEXT.get(direction, str(direction))
        lines += ["", f"## Bulk, {title}", ""]
        drows = [r for r in rows if r.get("direction") == direction]
        if not drows:
            lines.append("Not measured in this run.")
            continue
        per_run = human_size(s.get("bytes"))
        lines.append(f"{per_run} per run; MB/s measured at the receiver; vchan at its "
                     f"default ring size ({human_size(default_ring_size(results))}).  CPU "
                     f"ns/B: CPU time (user + sys) of both processes together per byte "
                     f"moved.")
        receivers = _ordered(s.get("receivers") or list(RECEIVERS),
                             (r.get("receiver") for r in drows))
        for receiver in receivers:
            rrows = [r for r in drows if r.get("receiver") == receiver]
            if not rrows:
                continue
            sizes = _ordered(None, (r.get("write_size") for r in rrows))
            table = []
            for size in sizes:
                for loop in loops:
                    found = {t: _find(rrows, write_size=size, loop=loop, transport=t)
                             for t in TRANSPORTS}
                    by = {t: _get(found[t], "bytes_per_s") for t in TRANSPORTS}
                    v, u, t = by["vchan"], by["unix"], by["tcp"]
                    table.append([human_size(size), _cell(loop), fmt_mbps(v), fmt_mbps(u),
                                  fmt_mbps(t), fmt_ratio(v, u), fmt_ratio(v, t),
                                  " / ".join(_cpu_per_byte(found[x]) for x in TRANSPORTS)])
            lines += ["", f"### {RECEIVER_TEXT.get(receiver, receiver)}, "
                      f"{DIRECTION_SHORT.get(direction, direction)}", ""]
            lines += _table(["write size", "loop", "vchan MB/s", "unix MB/s", "tcp MB/s",
                             "vchan/unix", "vchan/tcp", "CPU ns/B vchan / unix / tcp"],
                            [True, False, True, True, True, True, True, True], table)
            _image(lines, plots, f"bulk_{receiver}_{direction}",
                   f"bulk throughput, {receiver}, {direction}")
    return lines


def _cpu_per_byte(row: Json | None) -> str:
    """Both processes' CPU ns per byte (client + server), "-" if not recorded."""
    c, s = _get(row, "client_cpu_ns_per_byte"), _get(row, "server_cpu_ns_per_byte")
    return "-" if c is None or s is None else f"{c + s:.2f}"


def _sweep_rows(results: Json) -> list[Json]:
    return [r for r in _bulk_rows(results)
            if r.get("transport") == "vchan" and isinstance(r.get("ring_size"), int)]


def _sweep_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = _settings(results)
    default = default_ring_size(results)
    rows = _sweep_rows(results)
    rings = _ordered(None, (r.get("ring_size") for r in rows))
    lines = ["", "## vchan ring size", ""]
    if len(rings) < 2:
        lines.append("Not measured in this run (needs more than one ring size).")
        return lines
    lines.append("vchan MB/s by ring size (each way) and write size; the default ring size "
                 "is marked *.")
    receivers = _ordered(list(SWEEP_RECEIVERS), ())
    receivers += [x for x in _ordered(s.get("receivers"), (r.get("receiver") for r in rows))
                  if x not in receivers]
    loops = _loops(results)
    for direction in _ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
        for receiver in receivers:
            rrows = [r for r in rows
                     if r.get("receiver") == receiver and r.get("direction") == direction]
            rr = _ordered(None, (r.get("ring_size") for r in rrows))
            if len(rr) < 2:
                continue
            headers = ["write size", "loop"] + [
                f"{human_size(x)}{' *' if x == default else ''}" for x in rr]
            table = []
            for size in _ordered(None, (r.get("write_size") for r in rrows)):
                for loop in loops:
                    cells = [fmt_mbps(_get(_find(rrows, write_size=size, loop=loop,
                                                 ring_size=x), "bytes_per_s")) for x in rr]
                    if any(c != "-" for c in cells):
                        table.append([human_size(size), _cell(loop), *cells])
            lines += ["", f"### {RECEIVER_TEXT.get(receiver, receiver)}, "
                      f"{DIRECTION_SHORT.get(direction, direction)}", ""]
            lines += _table(headers, [True, False] + [True] * len(rr), table)
    _image(lines, plots, "ring_sizes", "vchan throughput by ring size")
    return lines


def _pingpong_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = _settings(results)
    rows = _ping_rows(results)
    lines = _heading("Ping-pong", rows)
    if not rows:
        return lines
    lines.append(f"Request/response echo, {_count(s.get('rounds'))} timed round trips after "
                 f"{_count(s.get('warmup'))} warm-up; latency per round trip at the client "
                 f"(us), given as vchan / unix / tcp.  p50 ratios are other/vchan "
                 f"(above 1: vchan is faster).")
    table = []
    for size in _ordered(s.get("ping_sizes"), (r.get("message_size") for r in rows)):
        for loop in _loops(results):
            by = {t: _find(rows, message_size=size, loop=loop, transport=t)
                  for t in TRANSPORTS}
            if all(r is None for r in by.values()):
                continue
            rts = [_fmt(_get(by[t], "round_trips_per_s"), ",.0f") for t in TRANSPORTS]
            lat = [" / ".join(_us(_get(by[t], p)) for t in TRANSPORTS)
                   for p in ("p50_us", "p99_us", "p99.9_us")]
            v50 = _get(by["vchan"], "p50_us")
            table.append([human_size(size), _cell(loop), *rts, *lat,
                          fmt_ratio(_get(by["unix"], "p50_us"), v50),
                          fmt_ratio(_get(by["tcp"], "p50_us"), v50)])
    lines += [""]
    lines += _table(["message", "loop", "vchan rt/s", "unix rt/s", "tcp rt/s",
                     "p50 us", "p99 us", "p99.9 us", "p50 unix/vchan", "p50 tcp/vchan"],
                    [True, False, True, True, True, True, True, True, True, True], table)
    _image(lines, plots, "pingpong_cdf", "ping-pong latency distribution")
    lines += _busy_poll_lines(results)
    return lines


def _busy_poll_lines(results: Json) -> list[str]:
    """vchan's opt-in busy polling next to its default and Unix sockets."""
    polled = _ping_rows(results, polled=True)
    if not polled:
        return []
    rows = _ping_rows(results)
    lines = ["", "### vchan with busy_poll (opt-in)", "",
             "The same echo with ``busy_poll=`` on both ends: each session looks at "
             "its ring every loop iteration for that long after it last read or wrote "
             "instead of sleeping until the peer's event.  CPU is user + sys time of "
             "each process per round trip (getrusage).", ""]
    table = []
    for r in polled:
        where = dict(message_size=r.get("message_size"), loop=r.get("loop"))
        plain = _find(rows, transport="vchan", **where)
        unix = _find(rows, transport="unix", **where)

        def cpu(row: Json | None) -> str:
            c, s = _get(row, "client_cpu_us_per_rt"), _get(row, "server_cpu_us_per_rt")
            return "-" if c is None or s is None else f"{c:.1f} + {s:.1f}"

        table.append([human_size(r.get("message_size") or 0), _cell(r.get("loop")),
                      f"{(_get(r, 'busy_poll') or 0) * 1e6:g} us",
                      " / ".join(_us(_get(x, "p50_us")) for x in (r, plain, unix)),
                      " / ".join(_us(_get(x, "p99_us")) for x in (r, plain, unix)),
                      fmt_ratio(_get(unix, "p50_us"), _get(r, "p50_us")),
                      cpu(r), cpu(plain), cpu(unix)])
    lines += _table(["message", "loop", "busy_poll", "p50 us (polled / default / unix)",
                     "p99 us (polled / default / unix)", "p50 unix/polled",
                     "CPU us/rt polled (client + server)", "default", "unix"],
                    [True, False, True, True, True, True, True, True, True], table)
    return lines


def _connections_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = _settings(results)
    rows = _rows(results, "connections")
    lines = _heading("Many connections", rows)
    if not rows:
        return lines
    lines.append("Aggregate MB/s over all connections at once; memory per connection = "
                 "RSS growth / connections, in KiB, server / client.")
    table = []
    errors = []
    for count in _ordered(s.get("connection_counts"), (r.get("connections") for r in rows)):
        for loop in _loops(results):
            by = {t: _find(rows, connections=count, loop=loop, transport=t)
                  for t in TRANSPORTS}
            if all(r is None for r in by.values()):
                continue
            rate: dict[str, float | None] = {}
            cells = []
            for t in TRANSPORTS:
                row = by[t]
                rate[t] = _get(row, "bytes_per_s")
                if row is not None and row.get("ok") is False:
                    cells.append("failed")
                    errors.append(f"- {t}, {loop}, {_count(count)} connections: "
                                  f"{_cell(row.get('error') or 'unknown error')}")
                else:
                    cells.append(fmt_mbps(rate[t]))
            mem = [f"{_kib(_get(by[t], 'server_rss_per_conn'))} / "
                   f"{_kib(_get(by[t], 'client_rss_per_conn'))}" for t in TRANSPORTS]
            connect = " / ".join(_fmt(_get(by[t], "connect_seconds"), ".3g")
                                 for t in TRANSPORTS)
            table.append([_fmt(_num(count), ",.0f"), _cell(loop), *cells,
                          fmt_ratio(rate["vchan"], rate["unix"]),
                          fmt_ratio(rate["vchan"], rate["tcp"]), *mem, connect])
    lines += [""]
    lines += _table(["connections", "loop", "vchan MB/s", "unix MB/s", "tcp MB/s",
                     "vchan/unix", "vchan/tcp", "vchan KiB/conn", "unix KiB/conn",
                     "tcp KiB/conn", "connect s (vchan / unix / tcp)"],
                    [True, False] + [True] * 9, table)
    if errors:
        lines += ["", "Failures:", "", *errors]
    _image(lines, plots, "connections", "throughput and memory by number of connections")
    return lines


def _setup_section(results: Json) -> list[str]:
    rows = _rows(results, "setup")
    lines = _heading("Connection setup", rows)
    if not rows:
        return lines
    lines.append("Connect + first byte echoed + close, one after another; latency per "
                 "connection in us, vchan / unix / tcp.")
    table = []
    for loop in _loops(results):
        by = {t: _find(rows, loop=loop, transport=t) for t in TRANSPORTS}
        if all(r is None for r in by.values()):
            continue
        rate = [_get(by[t], "connections_per_s") for t in TRANSPORTS]
        table.append([_cell(loop), *(_fmt(x, ",.0f") for x in rate),
                      fmt_ratio(rate[0], rate[1]), fmt_ratio(rate[0], rate[2]),
                      *(" / ".join(_us(_get(by[t], p)) for t in TRANSPORTS)
                        for p in ("p50_us", "p99_us"))])
    lines += [""]
    lines += _table(["loop", "vchan conn/s", "unix conn/s", "tcp conn/s", "vchan/unix",
                     "vchan/tcp", "p50 us", "p99 us"],
                    [False] + [True] * 7, table)
    return lines


DROPIN_TEXT = {"tcp": "TCP (asyncio)", "dropin-tcp": "drop-in to a TCP server (falls back)",
               "dropin": "drop-in to a drop-in server (upgraded to vchan)",
               "vchan": "vchan by (domid, port)"}


def _dropin_section(results: Json) -> list[str]:
    rows = _rows(results, "dropin")
    lines = _heading("Drop-in by address", rows)
    if not rows:
        return lines
    lines.append("`vchan.open_connection(host, port)`: to a plain TCP server it falls back to "
                 "TCP; to a drop-in server (`vchan.start_server(cb, host, port)`) in another "
                 "domain it upgrades to vchan; next to plain asyncio TCP and vchan by "
                 "`(domid, port)`.  Setup: connect + 1 byte echoed + close, one after another "
                 "(rate, p50 and p99 per connection; x TCP: p50 against plain TCP's).  Bulk: "
                 "one connection, 64 KiB writes, streams at both ends.")
    table = []
    for loop in _loops(results):
        tcp50 = _get(_find(rows, transport="tcp", loop=loop, what="setup"), "p50_us")
        for path, text in DROPIN_TEXT.items():
            setup = _find(rows, transport=path, loop=loop, what="setup")
            bulk = _find(rows, transport=path, loop=loop, what="bulk")
            if setup is None and bulk is None:
                continue
            p50 = _get(setup, "p50_us")
            table.append([_cell(loop), text, _fmt(_get(setup, "connections_per_s"), ",.0f"),
                          _us(p50), _us(_get(setup, "p99_us")), fmt_ratio(p50, tcp50),
                          fmt_mbps(_get(bulk, "bytes_per_s"))])
    lines += [""]
    lines += _table(["loop", "path", "conn/s", "p50 us", "p99 us", "p50 x TCP", "bulk MB/s"],
                    [False, False] + [True] * 5, table)
    return lines


def render_markdown(results: Json, plots: Iterable[Path | str] = ()) -> str:
    """The whole report of one run as Markdown.

    A header (machine, settings), then Targets, bulk one direction and both
    directions (per receiver), the vchan ring-size sweep, ping-pong, many
    connections, connection setup, drop-in by address and the streams
    matrix.  ``plots`` are image files (as :func:`write_plots` names them)
    to embed by relative link -- each under its section, by file name;
    images of unknown names go at the end.
    """
    links = {Path(p).stem: Path(p).name for p in plots}
    lines = _header(results)
    lines += _targets_section(results)
    lines += _bulk_sections(results, links)
    lines += _sweep_section(results, links)
    lines += _pingpong_section(results, links)
    lines += _connections_section(results, links)
    lines += _setup_section(results)
    lines += _dropin_section(results)
    lines += matrix_section(results, links)
    if links:
        lines += ["", "## More plots"]
        for stem, link in links.items():
            lines += ["", f"![{stem}]({link})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------


def _size_axis(ax: Any, sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(list(sizes))
        ax.set_xticklabels([human_size(x).replace(" ", "\u2009") for x in sizes],
                           rotation=45, fontsize=8)
        ax.minorticks_off()


def write_plots(results: Json, outdir: Path) -> list[Path]:
    """PNG plots of ``results`` in ``outdir``; the files written.

    ``bulk_<receiver>_<direction>.png`` (MB/s by write size, a line per
    transport, a panel per loop), ``ring_sizes.png`` (vchan MB/s by write size
    per ring size), ``pingpong_cdf.png`` (latency CDFs per transport, a panel
    per loop and message size), ``matrix.png`` (vchan/unix per cell of the
    streams matrix, a heat map per loop) and ``connections.png`` (aggregate MB/s and
    memory per connection by number of connections) -- each only when there
    is data for it.  Returns ``[]`` without error when matplotlib is not
    installed (tell the user :data:`PLOTS_HINT`).
    """
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = outdir / f"{name}.png"
        fig.savefig(path, dpi=_DPI)
        written.append(path)

    loops = _loops(results)
    rows = _main_bulk(results)
    for direction in _ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
        for receiver in _ordered(list(RECEIVERS), (r.get("receiver") for r in rows)):
            rrows = [r for r in rows if r.get("direction") == direction
                     and r.get("receiver") == receiver
                     and _num(r.get("bytes_per_s")) and isinstance(r.get("write_size"), int)]
            plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in rrows)]
            if not plot_loops:
                continue
            fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 4.2), layout="constrained")
            axes = fig.subplots(1, len(plot_loops), sharey=True, squeeze=False)[0]
            sizes = _ordered(None, (r["write_size"] for r in rrows))
            for ax, loop in zip(axes, plot_loops, strict=True):
                for t in _transports(results):
                    pts = sorted((r["write_size"], r["bytes_per_s"] / 1e6) for r in rrows
                                 if r.get("loop") == loop and r.get("transport") == t)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=t,
                                color=_COLORS.get(t))
                _size_axis(ax, sizes)
                ax.set_yscale("log")
                ax.set_title(loop)
                ax.set_xlabel("write size")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            axes[0].set_ylabel("MB/s (log scale)")
            fig.suptitle(f"Bulk throughput, {DIRECTION_TEXT.get(direction, direction)}, "
                         f"receiver: {receiver}")
            save(fig, f"bulk_{receiver}_{direction}")

    sweep = [r for r in _sweep_rows(results) if r.get("direction", "one") == "one"
             and _num(r.get("bytes_per_s")) and isinstance(r.get("write_size"), int)]
    if len(_ordered(None, (r["ring_size"] for r in sweep))) >= 2:
        receivers = [x for x in _ordered(list(SWEEP_RECEIVERS), (r.get("receiver") for r in sweep))
                     if len({r["ring_size"] for r in sweep if r.get("receiver") == x}) >= 2]
        plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in sweep)]
        fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 3.6 * len(receivers) + 0.6),
                     layout="constrained")
        grid = fig.subplots(len(receivers), len(plot_loops), sharey=True, squeeze=False)
        default = default_ring_size(results)
        for i, receiver in enumerate(receivers):
            for j, loop in enumerate(plot_loops):
                ax = grid[i][j]
                sel = [r for r in sweep if r.get("receiver") == receiver
                       and r.get("loop") == loop]
                for ring in _ordered(None, (r["ring_size"] for r in sel)):
                    pts = sorted((r["write_size"], r["bytes_per_s"] / 1e6) for r in sel
                                 if r["ring_size"] == ring)
                    label = f"ring {human_size(ring)}" + (" (default)" if ring == default
                                                         else "")
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
                _size_axis(ax, _ordered(None, (r["write_size"] for r in sel)))
                ax.set_yscale("log")
                ax.set_title(f"{receiver}, {loop}")
                ax.set_xlabel("write size")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            grid[i][0].set_ylabel("vchan MB/s (log scale)")
        fig.suptitle("vchan bulk throughput by ring size (one direction)")
        save(fig, "ring_sizes")

    ping = [r for r in _ping_rows(results)
            if isinstance(r.get("cdf_us"), list) and len(r["cdf_us"]) >= 2]
    if ping:
        msizes = _ordered(_settings(results).get("ping_sizes"),
                          (r.get("message_size") for r in ping))
        msizes = [m for m in msizes if any(r.get("message_size") == m for r in ping)]
        plot_loops = [lp for lp in loops if any(r.get("loop") == lp for r in ping)]
        fig = Figure(figsize=(4.2 * len(plot_loops) + 0.8, 3.4 * len(msizes) + 0.6),
                     layout="constrained")
        grid = fig.subplots(len(msizes), len(plot_loops), sharex=True, squeeze=False)
        for i, size in enumerate(msizes):
            for j, loop in enumerate(plot_loops):
                ax = grid[i][j]
                for t in _transports(results):
                    row = _find(ping, message_size=size, loop=loop, transport=t)
                    if row is None:
                        continue
                    vals = [_num(x) for x in row["cdf_us"]]
                    xs = [x for x in vals if x is not None and x > 0]
                    if len(xs) != len(vals):
                        continue
                    n = len(xs) - 1
                    ax.plot(xs, [k / n for k in range(n + 1)], label=t, color=_COLORS.get(t))
                ax.set_xscale("log")
                ax.set_ylim(0, 1)
                ax.set_title(f"{human_size(size)} messages, {loop}")
                ax.set_xlabel("round trip (us, log scale)")
                ax.set_ylabel("fraction of round trips")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(loc="lower right")
        fig.suptitle("Ping-pong latency distribution (CDF)")
        save(fig, "pingpong_cdf")

    conns = [r for r in _rows(results, "connections")
             if isinstance(r.get("connections"), int) and r.get("ok") is not False]
    if conns:
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        ax_rate, ax_mem = fig.subplots(1, 2)
        counts = _ordered(None, (r["connections"] for r in conns))
        for t in _transports(results):
            for loop in loops:
                sel = [r for r in conns if r.get("transport") == t and r.get("loop") == loop]
                line, marker = _STYLES.get(loop, (":", "^"))
                style = dict(color=_COLORS.get(t), linestyle=line, marker=marker,
                             label=f"{t}, {loop}")
                pts = sorted((r["connections"], r["bytes_per_s"] / 1e6) for r in sel
                             if _num(r.get("bytes_per_s")))
                if pts:
                    ax_rate.plot(*zip(*pts, strict=True), **style)
                mem = sorted((r["connections"],
                              (r["server_rss_per_conn"] + r["client_rss_per_conn"]) / 1024)
                             for r in sel if _num(r.get("server_rss_per_conn")) is not None
                             and _num(r.get("client_rss_per_conn")) is not None)
                if mem:
                    ax_mem.plot(*zip(*mem, strict=True), **style)
        for ax in (ax_rate, ax_mem):
            ax.set_xscale("log")
            ax.set_xticks(counts)
            ax.set_xticklabels([f"{c:,}" for c in counts])
            ax.minorticks_off()
            ax.set_xlabel("concurrent connections")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
        ax_rate.set_ylabel("aggregate MB/s")
        ax_rate.set_title("Aggregate throughput")
        ax_mem.set_ylabel("KiB per connection (server + client RSS)")
        ax_mem.set_title("Memory per connection")
        fig.suptitle("Many concurrent connections")
        save(fig, "connections")
    matrix = write_matrix_plot(results, outdir)
    if matrix is not None:
        written.append(matrix)
    return written


# ---------------------------------------------------------------------------
# All of it.
# ---------------------------------------------------------------------------


def write_report(results: Json, outdir: Path) -> dict[str, Path]:
    """Write ``results.json``, the PNG plots and ``report.md`` into ``outdir``.

    Returns the paths by name: ``"json"``, ``"markdown"`` and one per plot
    under its file stem (e.g. ``"bulk_streams_one"``, ``"pingpong_cdf"``).
    ``report.md`` embeds the plots by relative links; without matplotlib
    there are no plots and the report says how to get them.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    json_path = outdir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    paths["json"] = json_path
    plots = write_plots(results, outdir)
    text = render_markdown(results, plots)
    if not plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            text += f"\n_No plots: {PLOTS_HINT}._\n"
    md_path = outdir / "report.md"
    md_path.write_text(text, encoding="utf-8")
    paths["markdown"] = md_path
    for p in plots:
        paths[p.stem] = p
    return paths
