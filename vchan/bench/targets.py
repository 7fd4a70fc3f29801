"""The targets a benchmark run is checked against (recorded, never asserted).

Issue #8's (bulk against Unix sockets and memcpy, ping-pong, 1,000
connections), #13's (connection setup, many connections), #15's (ping-pong
with busy_poll; the streams matrix, :mod:`~vchan.bench.matrix_report`) and
#16's (a drop-in connection that falls back to TCP).
"""

from __future__ import annotations

from .common import Json, human_size
from .matrix_report import check_matrix_targets
from .results import (
    default_ring_size,
    find_row,
    fmt,
    fmt_kib,
    fmt_mbps,
    fmt_us,
    get_num,
    loops_of,
    main_bulk,
    num,
    ping_rows,
    rows_of,
)

TARGET_WRITE_SIZE = 64 << 10
TARGET_PING_SIZE = 64
TARGET_CONNECTIONS = 1000
TARGET_VS_UNIX = 2.0
TARGET_VS_MEMCPY = 0.5
TARGET_PING_FACTOR = 0.8



def _target(target: str, value: str, met: bool | None, detail: str) -> Json:
    return {"target": target, "value": value, "met": met, "detail": detail}


def _unmeasured(target: str, detail: str, **figures: float | None) -> Json:
    """The target undecided, naming what was not measured (a figure that is
    None or 0)."""
    missing = " and ".join(what.replace("_", " ") for what, x in figures.items() if not x)
    return _target(target, "-", None, f"{detail}: no {missing} measurement")


def _at_least(target: str, detail: str, need: float, **bytes_per_s: float | None) -> Json:
    """Bytes/s of the first figure >= ``need`` times the second's."""
    (_, ours), (theirs_name, theirs) = bytes_per_s.items()
    if not ours or not theirs:
        return _unmeasured(target, detail, **bytes_per_s)
    ratio = ours / theirs
    return _target(target, f"{ratio:.2f}x ({fmt_mbps(ours)} vs {theirs_name.replace('_', ' ')} "
                           f"{fmt_mbps(theirs)} MB/s)", ratio >= need,
                   f"{detail}; the ratio of bytes/s, needs >= {need:g}")


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
    loops = loops_of(results)
    bulk = main_bulk(results)
    ping = ping_rows(results)
    conns = rows_of(results, "connections")
    memcpy = results.get("memcpy")
    memcpy_bps = num(memcpy.get("bytes_per_s")) if isinstance(memcpy, dict) else None
    ring = default_ring_size(results)
    ring_text = f"vchan ring {human_size(ring)}" if ring is not None else "vchan default ring"
    out: list[Json] = []

    for loop in loops:
        where = dict(direction="one", receiver="streams", write_size=TARGET_WRITE_SIZE,
                     loop=loop)
        v = get_num(find_row(bulk, transport="vchan", **where), "bytes_per_s")
        u = get_num(find_row(bulk, transport="unix", **where), "bytes_per_s")
        out.append(_at_least(
            f"Bulk 64 KiB streams ({loop}): vchan >= {TARGET_VS_UNIX:g}x Unix sockets",
            f"bulk, one direction, 64 KiB writes, streams API (StreamReader), {loop}, "
            f"{ring_text}", TARGET_VS_UNIX, vchan=v, unix=u))
        out.append(_at_least(
            f"Bulk 64 KiB streams ({loop}): vchan >= {TARGET_VS_MEMCPY:g}x memcpy",
            "single-core memcpy of large blocks, measured in the same run",
            TARGET_VS_MEMCPY, vchan_bulk=v, memcpy=memcpy_bps))

    for loop in loops:
        vp = get_num(find_row(ping, transport="vchan", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        up = get_num(find_row(ping, transport="unix", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        name = (f"Ping-pong 64 B ({loop}): vchan p50 no worse than "
                f"{TARGET_PING_FACTOR:g}x Unix sockets")
        base = (f"read as: vchan p50 round trip <= unix p50 / {TARGET_PING_FACTOR:g}, "
                f"i.e. vchan at least {TARGET_PING_FACTOR:.0%} as fast "
                f"(unix p50 / vchan p50 >= {TARGET_PING_FACTOR:g})")
        if not vp or up is None:
            out.append(_unmeasured(name, base, vchan=vp, unix=up))
        else:
            speed = up / vp
            out.append(_target(
                name, f"{speed:.2f}x (p50 vchan {fmt_us(vp)} us, unix {fmt_us(up)} us)",
                speed >= TARGET_PING_FACTOR - 1e-12,
                f"{base}; limit for vchan p50: {fmt_us(up / TARGET_PING_FACTOR)} us"))

    polled = ping_rows(results, polled=True)
    for loop in loops:
        # Issue 15's stricter reading: vchan faster, p50 at most 0.8x Unix's;
        # by default, and (recorded next to it) with each busy_poll= setting.
        up = get_num(find_row(ping, transport="unix", message_size=TARGET_PING_SIZE, loop=loop),
                  "p50_us")
        default = find_row(ping, transport="vchan", message_size=TARGET_PING_SIZE, loop=loop)
        settings = {get_num(r, "busy_poll"): r for r in polled
                    if r.get("transport") == "vchan" and r.get("loop") == loop
                    and r.get("message_size") == TARGET_PING_SIZE}
        for poll, row in [(None, default), *sorted(settings.items(), key=lambda kv: kv[0] or 0)]:
            vp = get_num(row, "p50_us")
            what = "by default" if poll is None else \
                "with busy_poll=0 (never polls)" if poll == 0 else \
                f"with busy_poll {poll * 1e6:g} us"
            name = (f"Ping-pong 64 B ({loop}), {what}: vchan p50 <= "
                    f"{TARGET_PING_FACTOR:g}x Unix p50")
            base = "issue 15: vchan faster than Unix sockets, p50 round trip at most " \
                f"{TARGET_PING_FACTOR:g}x Unix's"
            if not vp or up is None:
                out.append(_unmeasured(name, base, vchan=vp, unix=up))
                continue
            out.append(_target(
                name, f"{vp / up:.2f}x (p50 vchan {fmt_us(vp)} us, unix {fmt_us(up)} us)",
                vp <= TARGET_PING_FACTOR * up + 1e-12,
                f"{base}; limit for vchan p50: {fmt_us(TARGET_PING_FACTOR * up)} us"))

    for loop in loops:
        row = find_row(conns, transport="vchan", connections=TARGET_CONNECTIONS, loop=loop)
        name = f"{TARGET_CONNECTIONS:,} concurrent vchan connections work ({loop})"
        base = "memory per idle connection = RSS growth / connections, server + client"
        if row is None:
            out.append(_target(name, "-", None, f"no {TARGET_CONNECTIONS:,}-connection "
                                                f"vchan measurement"))
            continue
        server = get_num(row, "server_rss_per_conn")
        client = get_num(row, "client_rss_per_conn")
        total = None if server is None or client is None else server + client
        memory = (f"{fmt_kib(total)} KiB/connection (server {fmt_kib(server)} + "
                  f"client {fmt_kib(client)} KiB)")
        ok = row.get("ok")
        if ok is True:
            out.append(_target(name, f"ok; {memory}", True,
                               f"{base}; all opened in "
                               f"{fmt(get_num(row, 'connect_seconds'), '.2f')} s"))
        elif ok is False:
            out.append(_target(name, f"failed; {memory}", False,
                               f"{base}; error: {row.get('error') or 'unknown'}"))
        else:
            out.append(_target(name, memory, None, f"{base}; the row has no ok flag"))

    # Issue #13: connection setup and many connections.
    setup = rows_of(results, "setup")
    for loop in loops:
        vrow = find_row(setup, transport="vchan", loop=loop)
        trow = find_row(setup, transport="tcp", loop=loop)
        vr, tr = get_num(vrow, "connections_per_s"), get_num(trow, "connections_per_s")
        p50 = get_num(vrow, "p50_us")
        name = f"Setup ({loop}): vchan connections/s >= TCP loopback, p50 < 150 us"
        if vr is None or tr is None or p50 is None:
            out.append(_target(name, "-", None, "no vchan and TCP setup measurements"))
        else:
            out.append(_target(
                name, f"{vr / tr:.2f}x ({vr:,.0f} vs {tr:,.0f} /s), p50 {fmt_us(p50)} us",
                vr >= tr and p50 < 150,
                "connect + 1 byte echoed + close, one after another"))
    for loop in loops:
        row = find_row(conns, transport="vchan", connections=TARGET_CONNECTIONS, loop=loop)
        seconds = get_num(row, "connect_seconds") if row is not None else None
        name = f"{TARGET_CONNECTIONS:,} vchan connections opened at once in < 1 s ({loop})"
        if seconds is None:
            out.append(_target(name, "-", None, "no measurement"))
        else:
            out.append(_target(name, f"{fmt(seconds, '.3f')} s", seconds < 1.0,
                               "all opened concurrently by one client process"))
    counts: set[int] = {r["connections"] for r in conns
                        if isinstance(r.get("connections"), int) and r["connections"] >= 10}
    for n in sorted(counts):
        for loop in loops:
            v = get_num(find_row(conns, transport="vchan", connections=n, loop=loop), "bytes_per_s")
            u = get_num(find_row(conns, transport="unix", connections=n, loop=loop), "bytes_per_s")
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
    dropin = [r for r in rows_of(results, "dropin") if r.get("what") == "setup"]
    for loop in (loops if dropin else []):
        fall = get_num(find_row(dropin, transport="dropin-tcp", loop=loop), "p50_us")
        tcp = get_num(find_row(dropin, transport="tcp", loop=loop), "p50_us")
        name = f"Drop-in ({loop}): a connection that falls back to TCP <= 1.2x a TCP connect"
        if fall is None or tcp is None:
            out.append(_target(name, "-", None, "no drop-in and TCP setup measurements"))
        else:
            out.append(_target(name, f"{fall / tcp:.2f}x (p50 {fmt_us(fall)} vs {fmt_us(tcp)} us)",
                               fall <= 1.2 * tcp,
                               "connect + 1 byte echoed + close: vchan.open_connection(host, "
                               "port) to a plain asyncio TCP server, against "
                               "asyncio.open_connection"))
    # Issue #15: the streams matrix (only when the run has one).
    out += check_matrix_targets(results)
    return out
