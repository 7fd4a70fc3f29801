"""vchan.bench.matrix: the streams-API matrix of ``vchan bench --cases matrix``.

Cell planning (the readline n/a rule, --quick's subset), what each cell
sends, the receivers' integrity checks, the report section from synthetic
results, and one tiny run end to end as a user starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vchan.bench import matrix, report
from vchan.bench.command import build_parser
from vchan.bench.common import BenchError
from vchan.bench.targets import check_targets

Json = dict[str, Any]

KIB, MIB = 1 << 10, 1 << 20


def _args(*argv: str) -> argparse.Namespace:
    """The parsed options of ``vchan bench`` with the matrix's defaults filled in."""
    args = build_parser().parse_args(list(argv))
    if args.loops is None:
        args.loops = ["asyncio", "uvloop"]
    matrix.defaults(args)
    return args


# ---------------------------------------------------------------------------
# Planning.
# ---------------------------------------------------------------------------


def test_readline_longer_than_limit_is_na() -> None:
    # A line is the write size (writelines: 4 KiB lines); longer than the limit: n/a.
    assert matrix.cell_na(16 * KIB, "readline", "write-64K") is not None
    assert matrix.cell_na(16 * KIB, "readline", "write-1M") is not None
    assert matrix.cell_na(64 * KIB, "readline", "write-1M") is not None
    assert "LimitOverrunError" in str(matrix.cell_na(64 * KIB, "readline", "write-1M"))
    # As long as the limit: asyncio returns it (the separator sits at limit - 1).
    assert matrix.cell_na(64 * KIB, "readline", "write-64K") is None
    assert matrix.cell_na(MIB, "readline", "write-1M") is None
    assert matrix.cell_na(16 * KIB, "readline", "writelines") is None
    # Only readline has the rule: read(n) and readexactly take any size.
    for read in ("read-4K", "read-64K", "read-1M", "readexactly"):
        for write in matrix.WRITES:
            for limit in matrix.LIMITS:
                assert matrix.cell_na(limit, read, write) is None


async def test_asyncio_agrees_with_the_na_rule() -> None:
    """A line as long as the limit is read; a longer one (beyond limit + 1) raises."""
    for size, ok in ((64 * KIB, True), (64 * KIB + 2, False)):
        reader = asyncio.StreamReader(limit=64 * KIB)
        reader.feed_data(b"x" * (size - 1) + b"\n")
        reader.feed_eof()
        if ok:
            assert len(await reader.readline()) == size
        else:
            with pytest.raises(ValueError):
                await reader.readline()


def test_full_product_and_its_plan() -> None:
    args = _args("--cases", "matrix")
    assert len(args.matrix_cells) == 4 * 5 * 5
    assert not args.matrix_subset
    na = {(c["limit"], c["read"], c["write"]) for c in matrix.settings(args)["na"]}
    assert na == {(16 * KIB, "readline", "write-64K"), (16 * KIB, "readline", "write-1M"),
                  (64 * KIB, "readline", "write-1M")}
    plan = matrix.plan(args)
    assert len(plan) == (100 - 3) * 2 * 3
    assert not any((m["limit"], m["read"], m["write"]) in na for m in plan)
    # The three transports of a cell are measured one after another.
    assert [m["transport"] for m in plan[:3]] == ["vchan", "unix", "tcp"]
    assert len({(m["limit"], m["read"], m["write"], m["loop"]) for m in plan[:3]}) == 1
    assert all(m["seconds"] == matrix.DEFAULT_SECONDS and m["timeout"] < 60 for m in plan)
    # A full run of the matrix stays within minutes (estimate, --repeat 3).
    assert sum(m["estimate"] for m in plan) * 3 < 8 * 60


def test_quick_subset_and_explicit_choices() -> None:
    args = _args("--quick")
    assert args.matrix_subset and args.matrix_cells == list(matrix.QUICK_CELLS)
    assert args.matrix_seconds == matrix.QUICK_SECONDS
    plan = matrix.plan(args)
    assert len(plan) == len(matrix.QUICK_CELLS) * 2 * 3
    assert {m["transport"] for m in plan} == {"vchan", "unix", "tcp"}
    assert {m["loop"] for m in plan} == {"asyncio", "uvloop"}
    # Any --matrix-* choice: the product of the choices, even with --quick.
    args = _args("--quick", "--matrix-limits", "16K,1M", "--matrix-reads", "readline")
    assert not args.matrix_subset
    assert args.matrix_cells == [(lim, "readline", w) for lim in (16 * KIB, MIB)
                                 for w in matrix.WRITES]


def test_option_errors() -> None:
    parser = build_parser()
    for argv in (["--matrix-reads", "read-2K"], ["--matrix-writes", "write-3"],
                 ["--matrix-limits", "0"], ["--matrix-bytes", "1M,2M"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert matrix.check_args(_args("--matrix-seconds", "0")) is not None
    assert matrix.check_args(_args("--matrix-seconds", "0.05")) is None


# ---------------------------------------------------------------------------
# What a cell sends.
# ---------------------------------------------------------------------------


def test_traffic_per_style() -> None:
    t = matrix.traffic("read-64K", "write-1K")
    assert not t.writelines and t.call_bytes == 1024 and t.message == 0
    t = matrix.traffic("read-4K", "writelines")
    assert t.writelines and len(t.pieces) == 16 and {len(p) for p in t.pieces} == {4096}
    # Framing: the write size is the whole message, its header included.
    t = matrix.traffic("readexactly", "write-64")
    (msg,) = t.pieces
    assert len(msg) == 64 and int.from_bytes(msg[:4], "big") == 60
    header, payload = matrix.traffic("readexactly", "writelines").pieces
    assert int.from_bytes(header, "big") == len(payload) == 64 * KIB - 4
    # Lines: the write size ends in the only newline.
    (line,) = matrix.traffic("readline", "write-1K").pieces
    assert len(line) == 1024 and line.index(b"\n") == 1023
    t = matrix.traffic("readline", "writelines")
    assert t.messages_per_call == 16 and all(p.count(b"\n") == 1 for p in t.pieces)


# ---------------------------------------------------------------------------
# Receivers: every message whole.
# ---------------------------------------------------------------------------


def _reader(data: bytes, limit: int = 64 * KIB) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_received_whole() -> None:
    msg = matrix.traffic("readexactly", "write-1K").pieces[0]
    got = await matrix.receive_frames(_reader(msg * 50), 1024)
    assert got["messages"] == 50 and got["bytes"] == 50 * 1024
    assert got["first_delivery_bytes"] == 1024 and got["cpu_ns_per_byte"] >= 0
    def flip(i: int) -> bytes:      # the message with byte i changed
        return msg[:i] + bytes([msg[i] ^ 1]) + msg[i + 1:]

    # Cut short, a header that lies, EOF in a header, payloads that differ:
    # the first or last anywhere, any other in its last byte.
    for data, what in ((msg * 3 + msg[:500], "cut short"),
                       (msg * 2 + (999).to_bytes(4, "big") + msg[4:], "header says"),
                       (msg * 2 + msg[:2], "inside the header"),
                       (flip(100) + msg * 2, "message 0 differs"),
                       (msg + flip(1023) + msg, "message 1 differs"),
                       (msg * 2 + flip(100), "last message differs")):
        with pytest.raises(BenchError, match=what):
            await matrix.receive_frames(_reader(data), 1024)


async def test_lines_received_whole() -> None:
    line = matrix.traffic("readline", "write-64").pieces[0]
    got = await matrix.receive_lines(_reader(line * 100), 64)
    assert got["messages"] == 100 and got["bytes"] == 6400
    for data in (line * 3 + line[:-1],                  # the last one has no newline
                 line * 2 + line[:30] + b"\n" + line,   # a short line
                 b"y" * 64 + line * 3):                 # not the line sent
        with pytest.raises(BenchError, match="line"):
            await matrix.receive_lines(_reader(data), 64)


async def test_read_counts_bytes() -> None:
    got = await matrix.receive_read(_reader(b"z" * 100_000), 4096)
    assert got["bytes"] == 100_000 and got["messages"] is None
    assert got["deliveries"] >= 2 and got["bytes_per_s"] > 0
    with pytest.raises(BenchError, match="one piece"):
        await matrix.receive_read(_reader(b"z" * 100), 4096)


@pytest.mark.parametrize("read, write", [("readexactly", "write-64K"),
                                         ("readexactly", "writelines"),
                                         ("readline", "write-1K"),
                                         ("readline", "writelines"),
                                         ("read-4K", "writelines")])
async def test_send_and_receive_over_a_socket(tmp_path: Path, read: str, write: str) -> None:
    """The sender and a receiver through real asyncio streams, limit 16 KiB."""
    data = matrix.traffic(read, write)
    results: list[Json] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        results.append(await matrix.receiver(read, write)(reader))
        writer.close()

    path = str(tmp_path / "s")
    server = await asyncio.start_unix_server(serve, path, limit=16 * KIB)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path, limit=16 * KIB)
        calls = await matrix.send(writer, data, 2 * MIB, 5.0)
        assert await reader.read(1) == b""      # the server closed: all received
        writer.close()
        await writer.wait_closed()
    assert calls == 2 * MIB // data.call_bytes
    (got,) = results
    assert got["bytes"] == calls * data.call_bytes
    if data.message:
        assert got["messages"] == calls * data.messages_per_call


async def test_sender_stops_at_its_time_budget(tmp_path: Path) -> None:
    data = matrix.traffic("read-64K", "write-64")
    path = str(tmp_path / "s")

    async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_unix_server(drain, path)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        loop = asyncio.get_running_loop()
        t = loop.time()
        calls = await matrix.send(writer, data, 1 << 40, 0.05)
        assert loop.time() - t < 2.0 and 0 < calls < (1 << 40) // 64
        assert await reader.read(1) == b""      # EOF reached the server: it closed
        writer.close()
        await writer.wait_closed()


def test_row_checks_both_halves() -> None:
    m = {"case": "matrix", "transport": "unix", "loop": "asyncio", "limit": 64 * KIB,
         "read": "readline", "write": "write-1K", "seconds": 0.1, "max_bytes": MIB,
         "estimate": 0.2, "timeout": 30}
    server = {"bytes": 10240, "messages": 10, "seconds": 0.01, "bytes_per_s": 1e6,
              "first_delivery_bytes": 1024, "deliveries": 10, "cpu_seconds": 0.001,
              "cpu_ns_per_byte": 100.0}
    client = {"bytes": 10240, "calls": 10, "messages": 10, "write_seconds": 0.01,
              "seconds_to_close": 0.01, "cpu_seconds": 0.002, "cpu_ns_per_byte": 195.0}
    row = matrix.row(m, server, client)
    assert row["ok"] and row["message_bytes"] == 1024 and row["call_bytes"] == 1024
    assert row["server_cpu_ns_per_byte"] == 100.0 and row["client_cpu_ns_per_byte"] == 195.0
    assert "estimate" not in row and "case" not in row
    with pytest.raises(BenchError, match="bytes"):
        matrix.row(m, dict(server, bytes=9216), client)
    with pytest.raises(BenchError, match="messages"):
        matrix.row(m, dict(server, messages=9), client)


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _mrow(loop: str, limit: int, read: str, write: str, transport: str, mbps: float,
          **extra: Any) -> Json:
    return {"loop": loop, "limit": limit, "read": read, "write": write,
            "transport": transport, "ok": True, "error": None, "bytes_per_s": mbps * 1e6,
            "client_cpu_ns_per_byte": 1.0, "server_cpu_ns_per_byte": 2.0, **extra}


def synthetic() -> Json:
    """asyncio only: two limits x readline x three writes; vchan/unix chosen per cell."""
    ratio = {("write-64", 16 * KIB): 1.6, ("write-64", 64 * KIB): 1.2,   # 1.2 < 1.5
             ("writelines", 16 * KIB): 2.5, ("writelines", 64 * KIB): 0.8,
             ("write-64K", 64 * KIB): 2.0}
    rows = []
    for (write, limit), r in ratio.items():
        rows += [_mrow("asyncio", limit, "readline", write, "vchan", 100 * r),
                 _mrow("asyncio", limit, "readline", write, "unix", 100),
                 _mrow("asyncio", limit, "readline", write, "tcp", 50)]
    return {"settings": {"loops": ["asyncio"], "repeat": 3,
                         "matrix": {"limits": [16 * KIB, 64 * KIB], "reads": ["readline"],
                                    "writes": ["write-64", "write-64K", "writelines"],
                                    "seconds": 0.15, "max_bytes": 512 * MIB,
                                    "na": [{"limit": 16 * KIB, "read": "readline",
                                            "write": "write-64K", "reason": "too long"}]}},
            "matrix": rows}


def test_matrix_targets() -> None:
    results = synthetic()
    by = {t["target"]: t for t in check_targets(results)}
    big = by["Matrix (asyncio): writes of 16 KiB and up: vchan >= 2x Unix sockets"]
    small = by["Matrix (asyncio): 64 B and 1 KiB writes: vchan >= 1.5x Unix sockets"]
    floor = by["Matrix (asyncio): no cell below 1x Unix sockets"]
    assert big["met"] is False and big["value"].startswith("2 of 3 cells; worst 0.80x")
    assert "64 KiB limit, readline, writelines" in big["value"]
    assert small["met"] is False and small["value"].startswith("1 of 2 cells; worst 1.20x")
    assert floor["met"] is False and floor["value"].startswith("4 of 5 cells")
    # No matrix in the run: no matrix targets, and no matrix section.
    assert not [t for t in check_targets({}) if t["target"].startswith("Matrix")]
    assert "## Matrix" not in report.render_markdown({})


def test_matrix_section() -> None:
    md = report.render_markdown(synthetic())
    text = md[md.index("## Matrix of user configurations"):]
    table = text[text.index("### asyncio: vchan / Unix sockets"):]
    assert "| limit | read | write(64 B) | write(64 KiB) | writelines |" in table
    assert "| 16 KiB | readline | 1.60 | n/a | 2.50 |" in table
    assert "| 64 KiB | readline | **1.20** | 2.00 | **0.80** |" in table
    misses = text[text.index("### Cells below their target"):text.index("### CPU per byte")]
    assert misses.index("0.80") < misses.index("1.20")      # the worst first
    assert "| asyncio | 64 KiB limit, readline, writelines | 0.80 | 2 |" in misses
    assert "| write(64 B) | asyncio | 1.00 | 1.00 | 1.00 |" in text      # sender CPU
    every = text[text.index("### Every cell"):]
    assert ("| asyncio | 64 KiB | readline | writelines | 80.0 | 100 | 50.0 | 0.80 | 1.60 | "
            "1.00 / 2.00 | 1.00 / 2.00 | 1.00 / 2.00 |") in every
    assert "| asyncio | 16 KiB | readline | write(64 KiB) | n/a |" in every
    assert "median of 3" in text and "0.15 s or 512 MiB" in text


def test_failed_cell_is_shown() -> None:
    results = synthetic()
    for r in results["matrix"]:
        if (r["limit"], r["write"], r["transport"]) == (64 * KIB, "write-64K", "vchan"):
            r.update(ok=False, error="vchan: TimeoutError: ", bytes_per_s=None)
    md = report.render_markdown(results)
    assert "| 64 KiB | readline | **1.20** | failed | **0.80** |" in md
    assert "- asyncio, vchan, 64 KiB limit, readline, write(64 KiB): vchan: TimeoutError" in md


def test_matrix_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = report.write_report(synthetic(), tmp_path)
    assert paths["matrix"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](matrix.png)" in paths["markdown"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------


def _positive(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def test_tiny_matrix_run(tmp_path: Path) -> None:
    """``vchan bench --cases matrix`` with three small cells, both loops, as a user runs it."""
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    proc = subprocess.run(
        [sys.executable, "-m", "vchan", "bench", "--cases", "matrix", "--matrix-limits", "16K",
         "--matrix-reads", "readexactly,readline", "--matrix-writes", "write-1K,write-64K",
         "--matrix-seconds", "0.03", "--matrix-bytes", "2M", "--repeat", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[\s*\d+/18 .*left\] matrix limit 16 KiB", proc.stderr)
    assert "## Matrix of user configurations (streams API)" in proc.stdout
    assert "| 16 KiB | readline | " in proc.stdout and "n/a" in proc.stdout
    assert "Matrix (asyncio): no cell below 1x Unix sockets" in proc.stdout

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = results["matrix"]
    cells = [("readexactly", "write-1K"), ("readexactly", "write-64K"),
             ("readline", "write-1K")]        # readline with 64 KiB lines at 16 KiB: n/a
    assert sorted((r["loop"], r["read"], r["write"], r["transport"]) for r in rows) == sorted(
        (lp, rd, w, t) for lp in ("asyncio", "uvloop") for rd, w in cells
        for t in ("vchan", "unix", "tcp"))
    for r in rows:
        assert r["ok"] and r["limit"] == 16 * KIB, r
        assert 0 < r["bytes"] <= 2 * MIB and r["bytes"] % r["message_bytes"] == 0
        assert r["messages"] * r["message_bytes"] == r["bytes"]
        for key in ("bytes_per_s", "seconds", "client_cpu_ns_per_byte",
                    "server_cpu_ns_per_byte"):
            assert _positive(r[key]), (key, r)
    na = results["settings"]["matrix"]["na"]
    assert [(c["limit"], c["read"], c["write"]) for c in na] == [
        (16 * KIB, "readline", "write-64K")]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "### uvloop: vchan / Unix sockets" in md and "### Every cell" in md
