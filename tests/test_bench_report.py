"""vchan.bench.report: Markdown tables, target checks and plots from a results dict.

The results here are synthetic, with a few figures chosen so that the
ratios and target verdicts can be checked by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from vchan.bench import plots, report
from vchan.bench.results import bulk_ratios
from vchan.bench.targets import check_targets

Json = dict[str, Any]

LOOPS = ["asyncio", "uvloop"]
TRANSPORTS = ["vchan", "unix", "tcp"]
RECEIVERS = ["streams", "protocol", "buffered"]
SIZES = [64, 4096, 65536, 1 << 20]
RINGS = [65536, 262144, 1 << 20]
COUNTS = [1, 10, 100, 1000]
KIB64 = 65536


def _bulk_row(direction: str, receiver: str, size: int, loop: str, transport: str,
              rate: float, ring: int | None) -> Json:
    return {"direction": direction, "receiver": receiver, "write_size": size, "loop": loop,
            "transport": transport, "ring_size": ring, "bytes_per_s": rate,
            "bytes": 64 << 20, "seconds": (64 << 20) / rate}


def _cdf(p50: float) -> list[float]:
    # Latency at quantile i/1000: from p50/2 up to 3 * p50, median at p50.
    return [p50 * (0.5 + i / 1000) if i <= 500 else p50 * (1 + 4 * (i - 500) / 1000)
            for i in range(1001)]


def _ping_row(size: int, loop: str, transport: str, p50: float) -> Json:
    return {"message_size": size, "loop": loop, "transport": transport,
            "round_trips_per_s": 1e6 / p50, "p50_us": p50, "p99_us": 3 * p50,
            "p99.9_us": 5 * p50, "mean_us": 1.1 * p50, "min_us": 0.5 * p50, "n": 3000,
            "cdf_us": _cdf(p50)}


def full_results() -> Json:
    """Every section, with hand-checkable numbers at the target points."""
    bulk: list[Json] = []
    base = {"vchan": 4.0, "unix": 2.0, "tcp": 1.0}
    for direction in ("one", "both"):
        for receiver in RECEIVERS:
            for size in SIZES:
                for loop in LOOPS:
                    for t in TRANSPORTS:
                        rate = base[t] * 1e6 * (size ** 0.5)
                        ring = RINGS[0] if t == "vchan" else None
                        bulk.append(_bulk_row(direction, receiver, size, loop, t, rate, ring))
    # The target point: 64 KiB, streams, one direction.
    for row in bulk:
        if (row["direction"], row["receiver"], row["write_size"]) == ("one", "streams", KIB64):
            row["bytes_per_s"] = {("asyncio", "vchan"): 5000e6, ("asyncio", "unix"): 2000e6,
                                  ("asyncio", "tcp"): 1000e6, ("uvloop", "vchan"): 3000e6,
                                  ("uvloop", "unix"): 2000e6, ("uvloop", "tcp"): 1200e6,
                                  }[row["loop"], row["transport"]]
    # The ring-size sweep: vchan only, streams and buffered, one direction.
    for receiver in ("streams", "buffered"):
        for ring in RINGS[1:]:
            for size in SIZES:
                for loop in LOOPS:
                    rate = 1e6 * (size ** 0.5) * ring / 16384
                    bulk.append(_bulk_row("one", receiver, size, loop, "vchan", rate, ring))
    for row in bulk:
        if (row["direction"], row["receiver"], row["write_size"], row["loop"],
                row["ring_size"]) == ("one", "streams", KIB64, "asyncio", 1 << 20):
            row["bytes_per_s"] = 7000e6

    ping: list[Json] = []
    p50 = {("asyncio", "vchan"): 10.0, ("asyncio", "unix"): 12.0, ("asyncio", "tcp"): 20.0,
           ("uvloop", "vchan"): 20.0, ("uvloop", "unix"): 12.0, ("uvloop", "tcp"): 25.0}
    for size in (64, 4096):
        for loop in LOOPS:
            for t in TRANSPORTS:
                ping.append(_ping_row(size, loop, t, p50[loop, t] * (1 if size == 64 else 2)))

    conns: list[Json] = []
    for count in COUNTS:
        for loop in LOOPS:
            for t in TRANSPORTS:
                conns.append({"connections": count, "loop": loop, "transport": t,
                              "bytes_per_s": {"vchan": 900e6, "unix": 600e6,
                                              "tcp": 300e6}[t] * (1 + count / 1000),
                              "server_rss_per_conn": 8192.0, "client_rss_per_conn": 4096.0,
                              "connect_seconds": count / 1000, "ok": True, "error": None})
    failed = next(r for r in conns if (r["connections"], r["loop"], r["transport"])
                  == (1000, "uvloop", "vchan"))
    failed.update(ok=False, error="OSError: [Errno 24] Too many open files",
                  bytes_per_s=None)

    setup = [{"loop": loop, "transport": t,
              "connections_per_s": {"vchan": 3000.0, "unix": 12000.0, "tcp": 6000.0}[t],
              "p50_us": 100.0, "p99_us": 400.0, "n": 500}
             for loop in LOOPS for t in TRANSPORTS]
    return {
        "machine": {"cpu": "Test CPU 9000", "cache": "32768 KB", "cores": 8,
                    "usable_cores": 4, "kernel": "Linux 6.1.0", "machine": "x86_64",
                    "python": "CPython 3.12.3", "cffi": "1.17.1", "uvloop": "0.21.0",
                    "vchan": "0.1.0", "loadavg_at_start": "0.10 0.20 0.30", "backend": "sim"},
        "settings": {"quick": True, "cases": ["bulk", "pingpong", "connections", "setup"],
                     "loops": LOOPS, "transports": TRANSPORTS, "receivers": RECEIVERS,
                     "bytes": 64 << 20, "sizes": SIZES, "ping_sizes": [64, 4096],
                     "rounds": 3000, "warmup": 1000, "ring_sizes": RINGS,
                     "default_ring_size": RINGS[0], "connection_counts": COUNTS,
                     "duration_seconds": 95.0, "started": "2026-11-25T19:30:00Z"},
        "memcpy": {"bytes_per_s": 8e9, "block_bytes": 64 << 20},
        "bulk": bulk,
        "pingpong": ping,
        "connections": conns,
        "setup": setup,
    }


def partial_results() -> Json:
    """Only bulk (and no sweep, memcpy, ping-pong, connections or setup)."""
    full = full_results()
    bulk = [r for r in full["bulk"] if r["transport"] != "vchan" or r["ring_size"] == RINGS[0]]
    settings = dict(full["settings"], cases=["bulk"], ring_sizes=[RINGS[0]])
    return {"machine": full["machine"], "settings": settings, "bulk": bulk,
            "pingpong": []}


def section(md: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    lines = md.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        out.append(line)
    return "\n".join(out)


def row(text: str, *prefix: str) -> list[str]:
    """The cells of the one table row starting with ``prefix``."""
    found = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:len(prefix)] == list(prefix):
                found.append(cells)
    assert len(found) == 1, (prefix, found)
    return found[0]


def targets_by_name(results: Json) -> dict[str, Json]:
    return {t["target"]: t for t in check_targets(results)}


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------


def test_targets_met_unmet_per_loop() -> None:
    targets = check_targets(full_results())
    assert all(set(t) == {"target", "value", "met", "detail"} for t in targets)
    by = {t["target"]: t for t in targets}
    # Issue #8's 4 targets x 2 loops and issue 15's ping-pong x 2 loops, then
    # issue #13's (setup, 1,000 at once, aggregate per connection count).
    assert len([t for t in targets if not t["target"].startswith(
        ("Setup", "1,000 vchan connections opened")) and "aggregate" not in t["target"]]) == 10

    unix_a = by["Bulk 64 KiB streams (asyncio): vchan >= 2x Unix sockets"]
    unix_u = by["Bulk 64 KiB streams (uvloop): vchan >= 2x Unix sockets"]
    assert unix_a["met"] is True and unix_a["value"].startswith("2.50x")   # 5000/2000
    assert unix_u["met"] is False and unix_u["value"].startswith("1.50x")  # 3000/2000

    mem_a = by["Bulk 64 KiB streams (asyncio): vchan >= 0.5x memcpy"]
    mem_u = by["Bulk 64 KiB streams (uvloop): vchan >= 0.5x memcpy"]
    assert mem_a["met"] is True and mem_a["value"].startswith("0.62x")     # 5000/8000
    assert mem_u["met"] is False and mem_u["value"].startswith("0.38x")    # 3000/8000
    assert "8,000" in mem_a["value"]

    ping_a = by["Ping-pong 64 B (asyncio): vchan p50 no worse than 0.8x Unix sockets"]
    ping_u = by["Ping-pong 64 B (uvloop): vchan p50 no worse than 0.8x Unix sockets"]
    assert ping_a["met"] is True and ping_a["value"].startswith("1.20x")   # 12/10
    assert ping_u["met"] is False and ping_u["value"].startswith("0.60x")  # 12/20
    assert "unix p50 / 0.8" in ping_a["detail"]   # the interpretation is stated
    assert "15.0 us" in ping_u["detail"]          # the limit: 12 / 0.8
    # issue 15's reading: vchan p50 <= 0.8 x unix p50 (vchan 10 us, unix 12 us: 9.6 us)
    strict_a = by["Ping-pong 64 B (asyncio), by default: vchan p50 <= 0.8x Unix p50"]
    assert strict_a["met"] is False and strict_a["value"].startswith("0.83x")
    assert "9.6 us" in strict_a["detail"]

    conn_a = by["1,000 concurrent vchan connections work (asyncio)"]
    conn_u = by["1,000 concurrent vchan connections work (uvloop)"]
    assert conn_a["met"] is True
    assert "12.0 KiB/connection" in conn_a["value"]       # 8 KiB + 4 KiB
    assert "server 8.0" in conn_a["value"] and "client 4.0" in conn_a["value"]
    assert conn_u["met"] is False and "Too many open files" in conn_u["detail"]


def test_ping_target_boundary_is_met() -> None:
    results = full_results()
    for r in results["pingpong"]:
        if (r["message_size"], r["loop"]) == (64, "uvloop"):
            r["p50_us"] = {"vchan": 20.0, "unix": 16.0, "tcp": 30.0}[r["transport"]]
    by = targets_by_name(results)
    # 20 <= 16 / 0.8 exactly: at 80 % of Unix's speed, which is "no worse than 0.8x".
    assert by["Ping-pong 64 B (uvloop): vchan p50 no worse than 0.8x Unix sockets"]["met"]
    for r in results["pingpong"]:
        if (r["message_size"], r["loop"], r["transport"]) == (64, "uvloop", "vchan"):
            r["p50_us"] = 20.1
    by = targets_by_name(results)
    assert not by["Ping-pong 64 B (uvloop): vchan p50 no worse than 0.8x Unix sockets"]["met"]


def test_targets_use_default_ring_size_only() -> None:
    results = full_results()
    # Drop the default-ring vchan row at the target point: the 1 MiB-ring
    # row (7,000 MB/s) must not stand in for it.
    results["bulk"] = [r for r in results["bulk"]
                       if not (r["transport"] == "vchan" and r["ring_size"] == RINGS[0]
                               and r["write_size"] == KIB64 and r["loop"] == "asyncio")]
    by = targets_by_name(results)
    t = by["Bulk 64 KiB streams (asyncio): vchan >= 2x Unix sockets"]
    assert t["met"] is None and t["value"] == "-"
    assert by["Bulk 64 KiB streams (uvloop): vchan >= 2x Unix sockets"]["met"] is False


def test_targets_none_when_data_missing() -> None:
    by = targets_by_name(partial_results())
    assert by["Bulk 64 KiB streams (asyncio): vchan >= 2x Unix sockets"]["met"] is True
    assert by["Bulk 64 KiB streams (asyncio): vchan >= 0.5x memcpy"]["met"] is None
    assert "memcpy" in by["Bulk 64 KiB streams (asyncio): vchan >= 0.5x memcpy"]["detail"]
    for loop in LOOPS:
        assert by[f"Ping-pong 64 B ({loop}): vchan p50 no worse than 0.8x Unix sockets"][
            "met"] is None
        assert by[f"1,000 concurrent vchan connections work ({loop})"]["met"] is None
    empty = check_targets({})
    assert empty and all(t["met"] is None for t in empty)


# ---------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------


def test_markdown_header_and_targets() -> None:
    md = report.render_markdown(full_results())
    head = md.split("## Targets")[0]
    for text in ("Test CPU 9000", "8 (4 usable)", "Linux 6.1.0", "CPython 3.12.3",
                 "uvloop 0.21.0", "vchan 0.1.0", "backend: sim", "0.10 0.20 0.30",
                 "--quick", "8,000 MB/s", "1 min 35 s", "above 1 means vchan is better"):
        assert text in head, text
    # Targets come first, before any measurement section.
    assert md.index("## Targets") < md.index("## Bulk")
    targets = section(md, "## Targets")
    cells = row(targets, "Bulk 64 KiB streams (uvloop): vchan >= 2x Unix sockets")
    assert cells[1].startswith("1.50x") and cells[2] == "**no**"
    cells = row(targets, "Bulk 64 KiB streams (asyncio): vchan >= 2x Unix sockets")
    assert cells[2] == "yes"


def test_markdown_bulk_tables_and_ratios() -> None:
    md = report.render_markdown(full_results())
    one = section(md, "## Bulk, one direction (client -> server)")
    streams = section(one, "### streams API (StreamReader.read), one direction")
    # 5000 / 2000 = 2.50, 5000 / 1000 = 5.00; the sweep's 7,000 is not in the main table.
    # The rows record no CPU time: its column is dashes.
    assert row(streams, "64 KiB", "asyncio") == [
        "64 KiB", "asyncio", "5,000", "2,000", "1,000", "2.50", "5.00", "- / - / -"]
    assert row(streams, "64 KiB", "uvloop") == [
        "64 KiB", "uvloop", "3,000", "2,000", "1,200", "1.50", "2.50", "- / - / -"]
    # 64 B: 4 * 8 = 32 MB/s, 16, 8 -> ratios 2.00 and 4.00.
    assert row(streams, "64 B", "asyncio") == [
        "64 B", "asyncio", "32.0", "16.0", "8.0", "2.00", "4.00", "- / - / -"]
    for receiver in ("asyncio.Protocol (data_received)",
                     "asyncio.BufferedProtocol (get_buffer)"):
        assert f"### {receiver}, one direction" in one
    both = section(md, "## Bulk, both directions at once (sum of both)")
    buffered = section(both, "### asyncio.BufferedProtocol (get_buffer), both directions")
    assert row(buffered, "1 MiB", "uvloop") == [
        "1 MiB", "uvloop", "4,096", "2,048", "1,024", "2.00", "4.00", "- / - / -"]
    # Rows: write size x loop, in the settings' order.
    firsts = [line.split("|")[1].strip() for line in streams.splitlines()
              if line.startswith("| ") and "write size" not in line]
    assert firsts == ["64 B", "64 B", "4 KiB", "4 KiB", "64 KiB", "64 KiB", "1 MiB", "1 MiB"]


def test_markdown_missing_cells_are_dashes() -> None:
    results = full_results()
    results["bulk"] = [r for r in results["bulk"]
                       if not (r["transport"] == "tcp" and r["write_size"] == 4096)]
    md = report.render_markdown(results)
    streams = section(md, "### streams API (StreamReader.read), one direction")
    assert row(streams, "4 KiB", "asyncio")[4:] == ["-", "2.00", "-", "- / - / -"]


def test_markdown_bulk_cpu_per_byte() -> None:
    """Both processes' CPU ns/B (client + server) per transport, where recorded."""
    results = full_results()
    for r in results["bulk"]:
        if (r["direction"], r["receiver"], r["write_size"], r["loop"]) == (
                "one", "streams", KIB64, "asyncio") and r["transport"] != "tcp":
            r["client_cpu_ns_per_byte"] = 0.25
            r["server_cpu_ns_per_byte"] = {"vchan": 0.5, "unix": 1.0}[r["transport"]]
    md = report.render_markdown(results)
    streams = section(md, "### streams API (StreamReader.read), one direction")
    assert "| CPU ns/B vchan / unix / tcp |" in streams
    assert row(streams, "64 KiB", "asyncio")[7] == "0.75 / 1.25 / -"


def test_bulk_ratios_computed_from_rows() -> None:
    ratios = bulk_ratios(full_results())
    point = next(r for r in ratios if (r["direction"], r["receiver"], r["write_size"],
                                       r["loop"]) == ("one", "streams", KIB64, "asyncio"))
    assert point["vchan_vs_unix"] == pytest.approx(2.5)
    assert point["vchan_vs_tcp"] == pytest.approx(5.0)
    # One entry per (direction, receiver, size, loop): sweep rows are not extra groups.
    assert len(ratios) == 2 * 3 * 4 * 2


def test_markdown_ring_sweep() -> None:
    md = report.render_markdown(full_results())
    sweep = section(md, "## vchan ring size")
    streams = section(sweep, "### streams API (StreamReader.read), one direction")
    header = row(streams, "write size")
    assert header == ["write size", "loop", "64 KiB *", "256 KiB", "1 MiB"]
    # Default ring 5,000; 256 KiB: 256 * 16 = 4,096; 1 MiB: overridden to 7,000.
    assert row(streams, "64 KiB", "asyncio") == ["64 KiB", "asyncio", "5,000", "4,096", "7,000"]
    assert "### asyncio.BufferedProtocol (get_buffer), one direction" in sweep
    assert "asyncio.Protocol" not in sweep
    assert "both directions" not in sweep


def test_markdown_pingpong() -> None:
    md = report.render_markdown(full_results())
    ping = section(md, "## Ping-pong")
    cells = row(ping, "64 B", "asyncio")
    # rt/s = 1e6 / p50; latencies vchan / unix / tcp; p50 ratios 12/10 and 20/10.
    assert cells == ["64 B", "asyncio", "100,000", "83,333", "50,000",
                     "10.0 / 12.0 / 20.0", "30.0 / 36.0 / 60.0", "50.0 / 60.0 / 100",
                     "1.20", "2.00"]
    assert row(ping, "4 KiB", "uvloop")[-2:] == ["0.60", "1.25"]
    assert "3,000 timed round trips after 1,000 warm-up" in ping


def test_markdown_connections_and_setup() -> None:
    md = report.render_markdown(full_results())
    conns = section(md, "## Many connections")
    cells = row(conns, "1,000", "asyncio")
    assert cells[2:7] == ["1,800", "1,200", "600", "1.50", "3.00"]
    assert cells[7] == "8.0 / 4.0"
    assert row(conns, "1", "uvloop")[-1] == "0.001 / 0.001 / 0.001"
    assert row(conns, "1,000", "uvloop")[2:7] == ["failed", "1,200", "600", "-", "-"]
    assert "vchan, uvloop, 1,000 connections: OSError: [Errno 24] Too many open files" in conns
    setup = section(md, "## Connection setup")
    assert row(setup, "asyncio")[1:6] == ["3,000", "12,000", "6,000", "0.25", "0.50"]


def test_markdown_with_sections_missing() -> None:
    md = report.render_markdown(partial_results())
    for heading in ("## Ping-pong", "## Many connections", "## Connection setup",
                    "## vchan ring size", "## Drop-in by address"):
        assert "Not measured in this run" in section(md, heading), heading
        assert "|" not in section(md, heading), f"{heading}: a table without rows"
    assert row(section(md, "### streams API (StreamReader.read), one direction"),
               "64 KiB", "asyncio")[5] == "2.50"
    # An empty dict renders too, with every section saying it was not measured.
    empty = report.render_markdown({})
    assert "## Targets" in empty and empty.count("Not measured in this run") >= 5


def test_markdown_without_default_ring_setting() -> None:
    # Older results: no ring sizes anywhere; vchan rows count as the default.
    results = full_results()
    results["bulk"] = [dict(r, ring_size=None) for r in results["bulk"]
                       if r["transport"] != "vchan" or r["ring_size"] == RINGS[0]]
    del results["settings"]["default_ring_size"]
    md = report.render_markdown(results)
    assert row(section(md, "### streams API (StreamReader.read), one direction"),
               "64 KiB", "asyncio")[2] == "5,000"


def test_bulk_rows_without_direction_are_one_direction() -> None:
    results = full_results()
    results["bulk"] = [{k: v for k, v in r.items() if k != "direction"}
                       for r in results["bulk"] if r["direction"] == "one"]
    md = report.render_markdown(results)
    assert "Not measured in this run" in section(
        md, "## Bulk, both directions at once (sum of both)")
    assert row(section(md, "### streams API (StreamReader.read), one direction"),
               "64 KiB", "asyncio")[5] == "2.50"


def test_render_is_pure() -> None:
    results = full_results()
    before = copy.deepcopy(results)
    assert report.render_markdown(results) == report.render_markdown(results)
    check_targets(results)
    assert results == before


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


EXPECTED_PLOTS = {f"bulk_{r}_{d}" for r in RECEIVERS for d in ("one", "both")} | {
    "ring_sizes", "pingpong_cdf", "connections"}


def test_write_report_with_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = full_results()
    paths = report.write_report(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == results
    assert paths["json"].name == "results.json"
    assert paths["markdown"].name == "report.md"
    assert set(paths) == {"json", "markdown"} | EXPECTED_PLOTS
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md == report.render_markdown(results, [paths[k] for k in EXPECTED_PLOTS])
    for name in EXPECTED_PLOTS:
        png = paths[name]
        assert png.parent == tmp_path / "out" and png.suffix == ".png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
        assert f"]({png.name})" in md               # embedded by a relative link
    # Each image sits in its own section.
    assert "](pingpong_cdf.png)" in section(md, "## Ping-pong")
    assert "](ring_sizes.png)" in section(md, "## vchan ring size")
    assert "](bulk_buffered_both.png)" in section(
        md, "### asyncio.BufferedProtocol (get_buffer), both directions")


def test_write_plots_only_for_data(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = plots.write_plots(partial_results(), tmp_path)
    assert {p.stem for p in written} == {f"bulk_{r}_{d}" for r in RECEIVERS
                                         for d in ("one", "both")}
    assert plots.write_plots({}, tmp_path / "empty") == []


def test_write_report_without_matplotlib(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import raises ImportError
    assert plots.write_plots(full_results(), tmp_path) == []
    paths = report.write_report(full_results(), tmp_path)
    assert set(paths) == {"json", "markdown"}
    md = paths["markdown"].read_text(encoding="utf-8")
    assert report.PLOTS_HINT in md and ".png)" not in md
    assert not list(tmp_path.glob("*.png"))


def test_connection_targets_of_issue_13() -> None:
    by = {t["target"]: t for t in check_targets(full_results())}
    setup = by["Setup (asyncio): vchan connections/s >= TCP loopback, p50 < 150 us"]
    assert setup["met"] is False and setup["value"].startswith("0.50x")     # 3000 / 6000
    assert any(name.startswith("1,000 vchan connections opened at once") for name in by)
    assert any("connections (asyncio): vchan aggregate >= Unix sockets" in name for name in by)


def test_busy_poll_rows_have_their_own_table_and_leave_the_targets_alone() -> None:
    results = full_results()
    plain = targets_by_name(results)
    polled = {**_ping_row(64, "asyncio", "vchan", 4.0), "busy_poll": 50e-6,
              "client_cpu_us_per_rt": 4.5, "server_cpu_us_per_rt": 5.5}
    never = {**_ping_row(64, "asyncio", "vchan", 15.0), "busy_poll": 0.0,
             "client_cpu_us_per_rt": 7.0, "server_cpu_us_per_rt": 8.0}
    for r in results["pingpong"]:
        if r["transport"] in ("vchan", "unix") and r["message_size"] == 64 \
                and r["loop"] == "asyncio":
            r.update(client_cpu_us_per_rt=2.0, server_cpu_us_per_rt=3.0)
    results["pingpong"] += [never, polled]
    targets = targets_by_name(results)
    # the default rows decide the targets; each busy_poll= row adds its own
    extra = targets.pop("Ping-pong 64 B (asyncio), with busy_poll 50 us: vchan p50 <= "
                        "0.8x Unix p50")
    off = targets.pop("Ping-pong 64 B (asyncio), with busy_poll=0 (never polls): vchan p50 "
                      "<= 0.8x Unix p50")
    assert targets == plain
    assert extra["met"] is True and extra["value"].startswith("0.33x")      # 4 / 12
    assert off["met"] is False and off["value"].startswith("1.25x")         # 15 / 12
    md = report.render_markdown(results)
    ping = section(md, "## Ping-pong")
    main, polled_part = ping.split("### vchan's busy_poll= settings")
    # the main table still shows the default vchan row
    assert row(main, "64 B", "asyncio")[5] == "10.0 / 12.0 / 20.0"
    cells = [line.strip("|").split("|") for line in polled_part.splitlines()
             if line.startswith("| 64 B | asyncio")]
    assert [[c.strip() for c in r] for r in cells] == [
        ["64 B", "asyncio", "0 (never polls)", "15.0 / 10.0 / 12.0", "45.0 / 30.0 / 36.0",
         "0.80", "7.0 + 8.0", "2.0 + 3.0", "2.0 + 3.0"],
        ["64 B", "asyncio", "50 us", "4.0 / 10.0 / 12.0", "12.0 / 30.0 / 36.0",
         "3.00", "4.5 + 5.5", "2.0 + 3.0", "2.0 + 3.0"]]
    assert "### Sparse requests" not in ping


def test_sparse_request_rows_have_their_own_table_and_leave_the_others_alone() -> None:
    results = full_results()
    plain_targets = targets_by_name(results)
    plain_md = section(report.render_markdown(results), "## Ping-pong")
    for transport, poll, p50, cpu in (("vchan", None, 110.0, 100.0),
                                      ("vchan", 0.0, 105.0, 95.0), ("unix", None, 70.0, 80.0)):
        r = {**_ping_row(64, "uvloop", transport, p50), "gap_us": 1000.0,
             "client_cpu_us_per_rt": cpu, "server_cpu_us_per_rt": cpu / 2}
        if poll is not None:
            r["busy_poll"] = poll
        results["pingpong"].append(r)
    assert targets_by_name(results) == plain_targets
    ping = section(report.render_markdown(results), "## Ping-pong")
    before, sparse = ping.split("### Sparse requests")
    assert before.strip() == plain_md.strip()
    assert row(sparse, "64 B", "uvloop") == [
        "64 B", "uvloop", "1,000 us", "110 / 105 / 70.0", "330 / 315 / 210",
        "100.0 + 50.0", "95.0 + 47.5", "80.0 + 40.0"]


def _dropin_rows(fallback_p50: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for loop in ("asyncio", "uvloop"):
        for path, p50, rate, mbps in (("tcp", 100.0, 9000.0, 1e9),
                                      ("dropin-tcp", fallback_p50, 8500.0, 1e9),
                                      ("dropin", 300.0, 3000.0, 5e9),
                                      ("vchan", 90.0, 10000.0, 6e9)):
            rows.append({"transport": path, "loop": loop, "what": "setup",
                         "connections_per_s": rate, "p50_us": p50, "p99_us": 2 * p50})
            rows.append({"transport": path, "loop": loop, "what": "bulk", "bytes_per_s": mbps})
    return rows


def test_dropin_section_and_fallback_target() -> None:
    results = full_results()
    results["dropin"] = _dropin_rows(fallback_p50=115.0)
    md = report.render_markdown(results)
    dropin = section(md, "## Drop-in by address")
    cells = row(dropin, "asyncio", "drop-in to a TCP server (falls back)")
    assert cells[2:7] == ["8,500", "115", "230", "1.15", "1,000"]
    assert row(dropin, "uvloop", "drop-in to a drop-in server (upgraded to vchan)")[-1] == "5,000"
    targets = {t["target"]: t for t in check_targets(results)}
    name = "Drop-in (asyncio): a connection that falls back to TCP <= 1.2x a TCP connect"
    assert targets[name]["met"] is True and targets[name]["value"].startswith("1.15x")
    results["dropin"] = _dropin_rows(fallback_p50=121.0)
    assert {t["target"]: t for t in check_targets(results)}[name]["met"] is False


def test_no_dropin_rows_no_dropin_targets() -> None:
    results = full_results()
    results.pop("dropin", None)
    assert not [t for t in check_targets(results) if "Drop-in" in t["target"]]
    assert "Not measured in this run." in section(report.render_markdown(results),
                                                  "## Drop-in by address")


@pytest.mark.parametrize("case, extra", [("setup", {}), ("pingpong", {}),
                                         ("dropin", {"what": "setup"})])
def test_repeated_latency_rows_keep_the_median_p50(case: str, extra: dict[str, Any]) -> None:
    """Setup and ping-pong runs are repeated like bulk ones; the row kept is
    the run with the median p50 (a setup row has no bytes_per_s), and every
    run's p50 is in ``repeats``."""
    from vchan.bench.suite import REPEATED, _median

    assert case in REPEATED
    rows = [{"p50_us": p50, "connections_per_s": 1e6 / p50, "run": i, **extra}
            for i, p50 in enumerate([150.0, 120.0, 190.0])]
    kept = _median(rows, case)
    assert kept["run"] == 0 and kept["p50_us"] == 150.0
    assert kept["repeats"] == [150.0, 120.0, 190.0]


def test_repeats_are_rounds_over_the_plan(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--repeat runs the whole plan round after round (a slow phase of the
    machine spoils one run of a measurement, not all its runs); each kept row
    is its measurement's median, a case that is not repeated runs once, and a
    matrix cell that fails is a failed row, not measured again."""
    from vchan.bench import suite
    from vchan.bench.common import BenchError

    plan = [{"case": "bulk", "transport": "vchan", "loop": "asyncio", "estimate": 1.0,
             "size": 1},
            {"case": "connections", "transport": "vchan", "loop": "asyncio",
             "estimate": 1.0, "connections": 10},
            {"case": "matrix", "transport": "unix", "loop": "asyncio", "estimate": 1.0,
             "cell": "bad"},
            {"case": "bulk", "transport": "unix", "loop": "asyncio", "estimate": 1.0,
             "size": 2}]
    speeds = {"vchan": iter([5.0, 1.0, 3.0]), "unix": iter([2.0, 6.0, 4.0])}
    calls: list[str] = []

    class Runner:
        restarts = 0

        def measure(self, case: str, transport: str, loop: str,
                    **params: Any) -> tuple[Any, Any]:
            calls.append(f"{case} {transport}")
            if case == "matrix":
                raise BenchError("cell failed")
            return {}, {"bytes_per_s": next(speeds[transport]) if case == "bulk" else 1.0}

        def restart(self) -> None:
            self.restarts += 1

    monkeypatch.setattr(suite, "make_row", lambda m, server, client: dict(client))
    monkeypatch.setattr(suite, "describe", lambda m: m["case"])
    monkeypatch.setattr(suite, "summarize", lambda row: "")
    runner = Runner()
    out = suite.execute(runner, plan, repeat=3)     # type: ignore[arg-type]
    assert calls == ["bulk vchan", "connections vchan", "matrix unix", "bulk unix",
                     "bulk vchan", "bulk unix", "bulk vchan", "bulk unix"]
    assert [(r["bytes_per_s"], r["repeats"]) for r in out["bulk"]] == [
        (3.0, [5.0, 1.0, 3.0]), (4.0, [2.0, 6.0, 4.0])]
    assert out["connections"] == [{"bytes_per_s": 1.0}]
    assert out["matrix"][0]["ok"] is False and out["matrix"][0]["error"] == "cell failed"
    assert runner.restarts == 1
    err = capsys.readouterr().err   # (the failed cell's later runs were planned, then skipped)
    assert err.startswith("vchan bench: 10 measurements,") and "[ 10/10 " in err
