"""The sections of ``report.md``, one function each: Markdown lines.

The header (machine, settings), the targets, bulk (per direction and
receiver), the vchan ring-size sweep, ping-pong (and vchan with
``busy_poll``), many connections, connection setup and drop-in by address.
The streams matrix's section is :mod:`~vchan.bench.matrix_report`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .common import DIRECTIONS, RECEIVERS, TRANSPORTS, Json, human_size
from .results import (
    DIRECTION_TEXT,
    SWEEP_RECEIVERS,
    default_ring_size,
    find_row,
    fmt,
    fmt_count,
    fmt_duration,
    fmt_kib,
    fmt_mbps,
    fmt_ratio,
    fmt_us,
    get_num,
    loops_of,
    main_bulk,
    md_cell,
    md_table,
    num,
    ordered,
    per_transport,
    ping_rows,
    rows_of,
    settings_of,
    sparse_ping_rows,
    sweep_rows,
)
from .targets import check_targets

RECEIVER_TEXT = {
    "streams": "streams API (StreamReader.read)",
    "protocol": "asyncio.Protocol (data_received)",
    "buffered": "asyncio.BufferedProtocol (get_buffer)",
}
DIRECTION_SHORT = {"one": "one direction", "both": "both directions"}


def _met(met: Any) -> str:
    return {True: "yes", False: "**no**"}.get(met, "-") if isinstance(met, bool) else "-"


def header(results: Json) -> list[str]:
    m = results.get("machine")
    m = m if isinstance(m, dict) else {}
    s = settings_of(results)

    def g(d: Json, key: str) -> str:
        return md_cell(d.get(key))

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
    if isinstance(memcpy, dict) and num(memcpy.get("bytes_per_s")) is not None:
        lines.append(f"- single-core memcpy: {fmt_mbps(num(memcpy['bytes_per_s']))} MB/s "
                     f"({human_size(memcpy.get('block_bytes'))} blocks)")
    if s:
        settings = [
            "--quick" if s.get("quick") else "full run",
            f"cases={md_cell(s.get('cases'))}",
            f"loops={md_cell(s.get('loops'))}",
            f"transports={md_cell(s.get('transports'))}",
            f"receivers={md_cell(s.get('receivers'))}",
            f"bytes={human_size(s.get('bytes'))}",
            f"sizes={','.join(human_size(x) for x in s.get('sizes') or []) or '-'}",
            f"ping-sizes={','.join(human_size(x) for x in s.get('ping_sizes') or []) or '-'}",
            f"rounds={md_cell(s.get('rounds'))}",
            f"warmup={md_cell(s.get('warmup'))}",
            f"ring-sizes={','.join(human_size(x) for x in s.get('ring_sizes') or []) or '-'}",
            f"default-ring={human_size(s.get('default_ring_size'))}",
            f"connections={md_cell(s.get('connection_counts'))}",
        ]
        lines.append(f"- settings: `{' '.join(settings)}`")
        lines.append(f"- started {g(s, 'started')}, took "
                     f"{fmt_duration(num(s.get('duration_seconds')))}")
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


def _heading(title: str, rows: Sequence[Any], intro: str) -> list[str]:
    """A section's heading and its ``intro`` paragraph; "Not measured in this
    run." instead of the paragraph without rows."""
    return ["", f"## {title}", "", intro if rows else "Not measured in this run."]


def _per_loop(results: Json, rows: Sequence[Json],
              **match: Any) -> Iterator[tuple[str, dict[str, Json | None]]]:
    """Each event loop of the run with the row of each transport that matches
    (:func:`per_transport`), leaving out loops without any."""
    for loop in loops_of(results):
        by = per_transport(rows, loop=loop, **match)
        if any(r is not None for r in by.values()):
            yield loop, by


def targets_section(results: Json) -> list[str]:
    lines = ["", "## Targets", "",
             "Recorded by the benchmark, not asserted.", ""]
    lines += md_table(["target", "value", "met", "detail"], [False, False, False, False],
                    ([md_cell(t["target"]), md_cell(t["value"]), _met(t["met"]),
                      md_cell(t["detail"])] for t in check_targets(results)))
    return lines


def bulk_sections(results: Json, plots: dict[str, str]) -> list[str]:
    s = settings_of(results)
    rows = main_bulk(results)
    loops = loops_of(results)
    lines: list[str] = []
    for direction in ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
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
        receivers = ordered(s.get("receivers") or list(RECEIVERS),
                             (r.get("receiver") for r in drows))
        for receiver in receivers:
            rrows = [r for r in drows if r.get("receiver") == receiver]
            if not rrows:
                continue
            sizes = ordered(None, (r.get("write_size") for r in rrows))
            table = []
            for size in sizes:
                for loop in loops:
                    found = per_transport(rrows, write_size=size, loop=loop)
                    by = {t: get_num(found[t], "bytes_per_s") for t in TRANSPORTS}
                    v, u, t = by["vchan"], by["unix"], by["tcp"]
                    table.append([human_size(size), md_cell(loop), fmt_mbps(v), fmt_mbps(u),
                                  fmt_mbps(t), fmt_ratio(v, u), fmt_ratio(v, t),
                                  " / ".join(_cpu_per_byte(found[x]) for x in TRANSPORTS)])
            lines += ["", f"### {RECEIVER_TEXT.get(receiver, receiver)}, "
                      f"{DIRECTION_SHORT.get(direction, direction)}", ""]
            lines += md_table(["write size", "loop", "vchan MB/s", "unix MB/s", "tcp MB/s",
                             "vchan/unix", "vchan/tcp", "CPU ns/B vchan / unix / tcp"],
                            [True, False, True, True, True, True, True, True], table)
            _image(lines, plots, f"bulk_{receiver}_{direction}",
                   f"bulk throughput, {receiver}, {direction}")
    return lines


def _cpu_per_byte(row: Json | None) -> str:
    """Both processes' CPU ns per byte (client + server), "-" if not recorded."""
    c, s = get_num(row, "client_cpu_ns_per_byte"), get_num(row, "server_cpu_ns_per_byte")
    return "-" if c is None or s is None else f"{c + s:.2f}"


def sweep_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = settings_of(results)
    default = default_ring_size(results)
    rows = sweep_rows(results)
    rings = ordered(None, (r.get("ring_size") for r in rows))
    lines = ["", "## vchan ring size", ""]
    if len(rings) < 2:
        lines.append("Not measured in this run (needs more than one ring size).")
        return lines
    lines.append("vchan MB/s by ring size (each way) and write size; the default ring size "
                 "is marked *.")
    receivers = ordered(list(SWEEP_RECEIVERS), ())
    receivers += [x for x in ordered(s.get("receivers"), (r.get("receiver") for r in rows))
                  if x not in receivers]
    loops = loops_of(results)
    for direction in ordered(list(DIRECTIONS), (r.get("direction") for r in rows)):
        for receiver in receivers:
            rrows = [r for r in rows
                     if r.get("receiver") == receiver and r.get("direction") == direction]
            rr = ordered(None, (r.get("ring_size") for r in rrows))
            if len(rr) < 2:
                continue
            headers = ["write size", "loop"] + [
                f"{human_size(x)}{' *' if x == default else ''}" for x in rr]
            table = []
            for size in ordered(None, (r.get("write_size") for r in rrows)):
                for loop in loops:
                    cells = [fmt_mbps(get_num(find_row(rrows, write_size=size, loop=loop,
                                                 ring_size=x), "bytes_per_s")) for x in rr]
                    if any(c != "-" for c in cells):
                        table.append([human_size(size), md_cell(loop), *cells])
            lines += ["", f"### {RECEIVER_TEXT.get(receiver, receiver)}, "
                      f"{DIRECTION_SHORT.get(direction, direction)}", ""]
            lines += md_table(headers, [True, False] + [True] * len(rr), table)
    _image(lines, plots, "ring_sizes", "vchan throughput by ring size")
    return lines


def pingpong_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = settings_of(results)
    rows = ping_rows(results)
    lines = _heading("Ping-pong", rows,
                     f"Request/response echo, {fmt_count(s.get('rounds'))} timed round trips "
                     f"after {fmt_count(s.get('warmup'))} warm-up; latency per round trip at "
                     f"the client (us), given as vchan / unix / tcp.  p50 ratios are "
                     f"other/vchan (above 1: vchan is faster).")
    if not rows:
        return lines
    table = []
    for size in ordered(s.get("ping_sizes"), (r.get("message_size") for r in rows)):
        for loop, by in _per_loop(results, rows, message_size=size):
            rts = [fmt(get_num(by[t], "round_trips_per_s"), ",.0f") for t in TRANSPORTS]
            lat = [" / ".join(fmt_us(get_num(by[t], p)) for t in TRANSPORTS)
                   for p in ("p50_us", "p99_us", "p99.9_us")]
            v50 = get_num(by["vchan"], "p50_us")
            table.append([human_size(size), md_cell(loop), *rts, *lat,
                          fmt_ratio(get_num(by["unix"], "p50_us"), v50),
                          fmt_ratio(get_num(by["tcp"], "p50_us"), v50)])
    lines += [""]
    lines += md_table(["message", "loop", "vchan rt/s", "unix rt/s", "tcp rt/s",
                     "p50 us", "p99 us", "p99.9 us", "p50 unix/vchan", "p50 tcp/vchan"],
                    [True, False, True, True, True, True, True, True, True, True], table)
    _image(lines, plots, "pingpong_cdf", "ping-pong latency distribution")
    lines += _busy_poll_lines(results)
    return lines


def _cpu_cell(row: Json | None) -> str:
    """CPU per round trip, client + server (us)."""
    c, s = get_num(row, "client_cpu_us_per_rt"), get_num(row, "server_cpu_us_per_rt")
    return "-" if c is None or s is None else f"{c:.1f} + {s:.1f}"


def _poll_label(row: Json) -> str:
    poll = get_num(row, "busy_poll")
    if poll is None:
        return "default (adaptive)"
    return "0 (never polls)" if poll == 0 else f"{poll * 1e6:g} us"


def _busy_poll_lines(results: Json) -> list[str]:
    """vchan's busy_poll= settings next to its default and Unix sockets."""
    polled = ping_rows(results, polled=True)
    lines: list[str] = []
    if polled:
        rows = ping_rows(results)
        lines += ["", "### vchan's busy_poll= settings", "",
                  "The same echo with ``busy_poll=`` on both ends: 0 never polls (each "
                  "session sleeps until the peer's event); a number of microseconds polls "
                  "the ring every loop iteration for that long after each read or write; "
                  "the default (the table above) polls after each write until the answer "
                  "comes, for a window of 50 us that grows up to 200 us while answers come "
                  "just after it, and backs off when they do not.  CPU is user + "
                  "sys time of each process per round trip (getrusage).", ""]
        table = []
        for r in polled:
            where = dict(message_size=r.get("message_size"), loop=r.get("loop"))
            plain = find_row(rows, transport="vchan", **where)
            unix = find_row(rows, transport="unix", **where)
            table.append([human_size(r.get("message_size") or 0), md_cell(r.get("loop")),
                          _poll_label(r),
                          " / ".join(fmt_us(get_num(x, "p50_us")) for x in (r, plain, unix)),
                          " / ".join(fmt_us(get_num(x, "p99_us")) for x in (r, plain, unix)),
                          fmt_ratio(get_num(unix, "p50_us"), get_num(r, "p50_us")),
                          _cpu_cell(r), _cpu_cell(plain), _cpu_cell(unix)])
        lines += md_table(["message", "loop", "busy_poll", "p50 us (this / default / unix)",
                         "p99 us (this / default / unix)", "p50 unix/this",
                         "CPU us/rt this (client + server)", "default", "unix"],
                        [True, False, True, True, True, True, True, True, True], table)
    lines += _sparse_lines(results)
    return lines


def _sparse_lines(results: Json) -> list[str]:
    """Requests with a pause between them: what polling costs where it does not pay."""
    rows = sparse_ping_rows(results)
    if not rows:
        return []
    lines = ["", "### Sparse requests", "",
             "The same echo with a pause (``asyncio.sleep``) before each request, "
             "untimed: the peers are idle between requests, so a poll window after an "
             "answer finds nothing.  vchan by default and with ``busy_poll=0`` against "
             "Unix sockets; CPU per round trip includes the pause's own loop work.", ""]
    table = []
    for gap in sorted({get_num(r, "gap_us") or 0 for r in rows}):
        for loop in loops_of(results):
            where = dict(gap_us=gap, loop=loop)
            adaptive = find_row(rows, transport="vchan", busy_poll=None, **where)
            never = find_row(rows, transport="vchan", busy_poll=0.0, **where)
            unix = find_row(rows, transport="unix", **where)
            if adaptive is None and never is None and unix is None:
                continue
            size = next(r for r in (adaptive, never, unix) if r is not None)
            table.append([human_size(size.get("message_size") or 0), md_cell(loop),
                          f"{gap:,g} us",
                          " / ".join(fmt_us(get_num(x, "p50_us"))
                                     for x in (adaptive, never, unix)),
                          " / ".join(fmt_us(get_num(x, "p99_us"))
                                     for x in (adaptive, never, unix)),
                          _cpu_cell(adaptive), _cpu_cell(never), _cpu_cell(unix)])
    lines += md_table(["message", "loop", "pause", "p50 us (default / busy_poll=0 / unix)",
                     "p99 us (default / busy_poll=0 / unix)",
                     "CPU us/rt default (client + server)", "busy_poll=0", "unix"],
                    [True, False, True, True, True, True, True, True], table)
    return lines


CONNECTIONS_INTRO = ("Aggregate MB/s over all connections at once; memory per connection = "
                     "RSS growth / connections, in KiB, server / client.")


def connections_section(results: Json, plots: dict[str, str]) -> list[str]:
    s = settings_of(results)
    rows = rows_of(results, "connections")
    lines = _heading("Many connections", rows, CONNECTIONS_INTRO)
    if not rows:
        return lines
    table = []
    errors = []
    for count in ordered(s.get("connection_counts"), (r.get("connections") for r in rows)):
        for loop, by in _per_loop(results, rows, connections=count):
            rate: dict[str, float | None] = {}
            cells = []
            for t in TRANSPORTS:
                row = by[t]
                rate[t] = get_num(row, "bytes_per_s")
                if row is not None and row.get("ok") is False:
                    cells.append("failed")
                    errors.append(f"- {t}, {loop}, {fmt_count(count)} connections: "
                                  f"{md_cell(row.get('error') or 'unknown error')}")
                else:
                    cells.append(fmt_mbps(rate[t]))
            mem = [f"{fmt_kib(get_num(by[t], 'server_rss_per_conn'))} / "
                   f"{fmt_kib(get_num(by[t], 'client_rss_per_conn'))}" for t in TRANSPORTS]
            connect = " / ".join(fmt(get_num(by[t], "connect_seconds"), ".3g")
                                 for t in TRANSPORTS)
            table.append([fmt(num(count), ",.0f"), md_cell(loop), *cells,
                          fmt_ratio(rate["vchan"], rate["unix"]),
                          fmt_ratio(rate["vchan"], rate["tcp"]), *mem, connect])
    lines += [""]
    lines += md_table(["connections", "loop", "vchan MB/s", "unix MB/s", "tcp MB/s",
                     "vchan/unix", "vchan/tcp", "vchan KiB/conn", "unix KiB/conn",
                     "tcp KiB/conn", "connect s (vchan / unix / tcp)"],
                    [True, False] + [True] * 9, table)
    if errors:
        lines += ["", "Failures:", "", *errors]
    _image(lines, plots, "connections", "throughput and memory by number of connections")
    return lines


SETUP_INTRO = ("Connect + first byte echoed + close, one after another; latency per "
               "connection in us, vchan / unix / tcp.")


def setup_section(results: Json) -> list[str]:
    rows = rows_of(results, "setup")
    lines = _heading("Connection setup", rows, SETUP_INTRO)
    if not rows:
        return lines
    table = []
    for loop, by in _per_loop(results, rows):
        rate = [get_num(by[t], "connections_per_s") for t in TRANSPORTS]
        table.append([md_cell(loop), *(fmt(x, ",.0f") for x in rate),
                      fmt_ratio(rate[0], rate[1]), fmt_ratio(rate[0], rate[2]),
                      *(" / ".join(fmt_us(get_num(by[t], p)) for t in TRANSPORTS)
                        for p in ("p50_us", "p99_us"))])
    lines += [""]
    lines += md_table(["loop", "vchan conn/s", "unix conn/s", "tcp conn/s", "vchan/unix",
                     "vchan/tcp", "p50 us", "p99 us"],
                    [False] + [True] * 7, table)
    return lines


DROPIN_TEXT = {"tcp": "TCP (asyncio)", "dropin-tcp": "drop-in to a TCP server (falls back)",
               "dropin": "drop-in to a drop-in server (upgraded to vchan)",
               "vchan": "vchan by (domid, port)"}


DROPIN_INTRO = ("`vchan.open_connection(host, port)`: to a plain TCP server it falls back to "
                "TCP; to a drop-in server (`vchan.start_server(cb, host, port)`) in another "
                "domain it upgrades to vchan; next to plain asyncio TCP and vchan by "
                "`(domid, port)`.  Setup: connect + 1 byte echoed + close, one after another "
                "(rate, p50 and p99 per connection; x TCP: p50 against plain TCP's).  Bulk: "
                "one connection, 64 KiB writes, streams at both ends.")


def dropin_section(results: Json) -> list[str]:
    rows = rows_of(results, "dropin")
    lines = _heading("Drop-in by address", rows, DROPIN_INTRO)
    if not rows:
        return lines
    table = []
    for loop in loops_of(results):
        tcp50 = get_num(find_row(rows, transport="tcp", loop=loop, what="setup"), "p50_us")
        for path, text in DROPIN_TEXT.items():
            setup = find_row(rows, transport=path, loop=loop, what="setup")
            bulk = find_row(rows, transport=path, loop=loop, what="bulk")
            if setup is None and bulk is None:
                continue
            p50 = get_num(setup, "p50_us")
            table.append([md_cell(loop), text, fmt(get_num(setup, "connections_per_s"), ",.0f"),
                          fmt_us(p50), fmt_us(get_num(setup, "p99_us")), fmt_ratio(p50, tcp50),
                          fmt_mbps(get_num(bulk, "bytes_per_s"))])
    lines += [""]
    lines += md_table(["loop", "path", "conn/s", "p50 us", "p99 us", "p50 x TCP", "bulk MB/s"],
                    [False, False] + [True] * 5, table)
    return lines
