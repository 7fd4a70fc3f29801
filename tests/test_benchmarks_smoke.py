"""benchmarks/ring_throughput.py still runs and writes complete JSON.

A smoke test only: it keeps the benchmark from rotting and asserts nothing
about speed -- just that every reported number is there and positive.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ring_throughput.py"

SIZES = [64, 4096]
# The JSON keys behind the columns of the Markdown table.
COLUMNS = ["chunk", "ring_gbps", "memmove_gbps", "memmove_x2_gbps", "ring_vs_memmove_x2",
           "ring_ops_per_s"]
HEADERS = ["chunk", "ring GB/s", "memmove GB/s", "memmove x2 GB/s", "ring/memmove x2",
           "ring ops/s"]


def _positive(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def test_quick_run_writes_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--target", "0.02",
         "--sizes", ",".join(map(str, SIZES)), "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr

    # The Markdown table is on stdout, one row per size.
    header = "| " + " | ".join(HEADERS) + " |"
    assert header in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(SIZES)

    results = json.loads(out.read_text(encoding="utf-8"))
    rows = results["rows"]
    assert [row["chunk"] for row in rows] == SIZES
    for row in rows:
        for key in [*COLUMNS, "ring_ns_per_op", "memmove_ns_per_op", "memmove_x2_ns_per_op"]:
            assert _positive(row[key]), (key, row[key])
        for kind in ("ring", "memmove", "memmove_x2"):
            assert _positive(row["iterations"][kind])
            assert row["samples_s_per_op"][kind]
            assert all(_positive(s) for s in row["samples_s_per_op"][kind])
    assert _positive(results["memcpy_ceiling"]["gbps"])
    for key in ("cpu", "kernel", "python"):
        assert results["machine"][key]


EVENTS = Path(__file__).resolve().parent.parent / "benchmarks" / "event_latency.py"


def test_event_latency_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "events.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    proc = subprocess.run([sys.executable, str(EVENTS), "--rounds", "300", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| vchan event channel |" in proc.stdout and "| pipe |" in proc.stdout
    results = json.loads(out.read_text(encoding="utf-8"))
    for key in ("event_channel", "pipe"):
        assert results[key]["n"] == 300
        assert all(_positive(results[key][p]) for p in ("p50_us", "p99_us", "p99.9_us"))


def test_vchan_bench_quick_run(tmp_path: Path) -> None:
    """``vchan bench --quick`` (made smaller) as a user runs it: every case, the
    table with its targets, JSON, report.md and the plots."""
    out = tmp_path / "bench"
    # The suite's processes use a private emulator of their own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    proc = subprocess.run(
        [sys.executable, "-m", "vchan", "bench", "--quick", "--bytes", "4M",
         "--rounds", "200", "--warmup", "50", "--loops", "asyncio",
         "--connections", "3,1000", "--setup-count", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## Targets" in proc.stdout
    assert "| write size | loop | vchan MB/s | unix MB/s | tcp MB/s |" in proc.stdout
    assert re.search(r"\[\s*\d+/\d+ .*left\] bulk", proc.stderr), "no progress shown"

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# ")
    for png in ("bulk_streams_one.png", "pingpong_cdf.png", "connections.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    bulk = {(r["direction"], r["receiver"], r["transport"], r["ring_size"])
            for r in results["bulk"]}
    default, big = results["settings"]["default_ring_size"], 1 << 20
    want = {("one", rc, t, default if t == "vchan" else None)
            for rc in ("streams", "buffered") for t in ("vchan", "unix", "tcp")}
    want |= {("both", "streams", t, default if t == "vchan" else None)
             for t in ("vchan", "unix", "tcp")}
    assert want <= bulk
    assert all(r["bytes"] == 4 << 20 and _positive(r["bytes_per_s"]) for r in results["bulk"])
    if default != big:
        assert ("one", "streams", "vchan", big) in bulk
    ping = {(r["message_size"], r["transport"]) for r in results["pingpong"]}
    assert ping == {(s, t) for s in (64, 4096) for t in ("vchan", "unix", "tcp")}
    # vchan by default, with busy_poll=0 and 50 us; sparse requests by default and with 0
    polls = sorted((r.get("gap_us") or 0, -1 if r.get("busy_poll") is None else r["busy_poll"])
                   for r in results["pingpong"]
                   if r["transport"] == "vchan" and r["message_size"] == 64)
    assert polls == [(0, -1), (0, 0.0), (0, 50e-6), (1000.0, -1), (1000.0, 0.0)], polls
    report_md = (out / "report.md").read_text(encoding="utf-8")
    assert "### vchan's busy_poll= settings" in report_md
    assert "### Sparse requests" in report_md
    for r in results["pingpong"]:
        assert r["n"] == 200 and len(r["cdf_us"]) == 1001
        assert all(_positive(r[p]) for p in ("round_trips_per_s", "p50_us", "p99_us", "p99.9_us"))
    conns = {(r["connections"], r["transport"]): r for r in results["connections"]}
    assert set(conns) == {(n, t) for n in (3, 1000) for t in ("vchan", "unix", "tcp")}
    assert conns[(1000, "vchan")]["ok"], conns[(1000, "vchan")]["error"]
    assert _positive(conns[(1000, "vchan")]["bytes_per_s"])
    setup = {r["transport"]: r for r in results["setup"]}
    assert set(setup) == {"vchan", "unix", "tcp"}
    assert all(_positive(r["connections_per_s"]) and r["n"] == 20 for r in setup.values())
    assert all(_positive(r[f"{side}_cpu_ns_per_byte"]) for r in results["bulk"]
               for side in ("client", "server"))
    # Drop-in by address: setup and bulk on each path; the upgraded path was vchan
    # (the client checks), the others TCP.
    dropin = {(r["what"], r["transport"]): r for r in results["dropin"]}
    assert set(dropin) == {(w, p) for w in ("setup", "bulk")
                           for p in ("tcp", "dropin-tcp", "dropin", "vchan")}
    assert all(_positive(r["connections_per_s"]) and r["n"] == 20
               for (w, _), r in dropin.items() if w == "setup")
    assert all(_positive(r["bytes_per_s"]) for (w, _), r in dropin.items() if w == "bulk")
    assert "## Drop-in by address" in proc.stdout
    # --quick's matrix: its representative cells, every transport.
    matrix = results["matrix"]
    assert {r["transport"] for r in matrix} == {"vchan", "unix", "tcp"}
    assert len(matrix) == 3 * len(results["settings"]["matrix"]["cells"])
    assert all(r["ok"] and _positive(r["bytes_per_s"]) for r in matrix)
    assert "## Matrix of user configurations (streams API)" in proc.stdout
    assert _positive(results["memcpy"]["bytes_per_s"])
    for key in ("cpu", "kernel", "python", "uvloop", "backend"):
        assert results["machine"][key]


STREAM_PAIR = SCRIPT.with_name("stream_pair.py")
READER_CALLS = SCRIPT.with_name("reader_calls.py")


def test_stream_pair_and_reader_calls_run() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    for extra in ([], ["--dedicated"], ["--transport", "unix"]):
        proc = subprocess.run([sys.executable, str(STREAM_PAIR), "--bytes", "16M", *extra],
                              capture_output=True, text=True, timeout=120, check=False, env=env)
        assert proc.returncode == 0, proc.stderr
        m = re.search(r": ([0-9,]+) MB/s, CPU ns/B send ([0-9.]+) recv ([0-9.]+), receiver "
                      r"page faults ([0-9,]+); sleeps send ([0-9,]+) recv ([0-9,]+), "
                      r"wake-ups sent send ([0-9,]+) recv ([0-9,]+)$", proc.stdout.strip())
        assert m and float(m.group(1).replace(",", "")) > 0, proc.stdout
    proc = subprocess.run([sys.executable, str(READER_CALLS), "--messages", "2048",
                           "--repeat", "1"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ns a message") == 2, proc.stdout
    assert proc.stdout.count("write(1 KiB) + drain()") == 2, proc.stdout


PROXY_BENCH = SCRIPT.with_name("proxy_bench.py")


def test_proxy_bench_runs_every_path() -> None:
    """benchmarks/proxy_bench.py end to end, small: every path moves its bytes.
    (It once waited forever when ``vchan proxy -v`` printed a line before
    "listening".)"""
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    proc = subprocess.run([sys.executable, str(PROXY_BENCH), "--mib", "4", "--repeat", "1"],
                          capture_output=True, text=True, timeout=180, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    for path in ("direct", "vchan->tcp", "tcp->vchan", "tcp"):
        assert re.search(rf"\b{re.escape(path)}\b.*[0-9]", proc.stdout), proc.stdout


SETUP_PHASES = SCRIPT.with_name("setup_phases.py")


def test_setup_phases_reports_every_phase_of_every_transport() -> None:
    """benchmarks/setup_phases.py, small: a row per transport and loop, every
    phase and both processes' CPU time there and positive."""
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    proc = subprocess.run([sys.executable, str(SETUP_PHASES), "--count", "40", "--warmup", "5"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["transport"], r["loop"]) for r in rows] == [
        (t, loop) for loop in ("asyncio", "uvloop") for t in ("vchan", "tcp", "unix")]
    for row in rows:
        assert row["count"] == 40
        for key in ("p50_us", "p90_us", "connections_per_s", "client_cpu_us", "server_cpu_us"):
            assert _positive(row[key]), (row["transport"], key, row[key])
        assert set(row["phases_p50_us"]) == {"open", "write", "echo", "close"}
        assert all(_positive(v) for v in row["phases_p50_us"].values()), row


SPARSE_REQUESTS = SCRIPT.with_name("sparse_requests.py")


def test_sparse_requests_reports_each_placement_and_setting() -> None:
    """benchmarks/sparse_requests.py, small: a row per loop, placement and
    client busy_poll; pinned processes never share a CPU."""
    placements = ["shared", "pinned"] if len(os.sched_getaffinity(0)) >= 2 else ["shared"]
    env = {k: v for k, v in os.environ.items() if k not in ("VCHAN_SIM_DIR", "VCHAN_DOMID")}
    env["VCHAN_BACKEND"] = "sim"
    proc = subprocess.run([sys.executable, str(SPARSE_REQUESTS), "--count", "40", "--gap", "200",
                           "--runs", "1", "--placements", ",".join(placements)],
                          capture_output=True, text=True, timeout=180, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["loop"], r["placement"], r["busy_poll"]) for r in rows] == [
        (loop, p, poll) for loop in ("asyncio", "uvloop") for p in placements
        for poll in ("default", "0")]
    for row in rows:
        assert row["count"] == 40 and row["gap_us"] == 200
        for key in ("p50_us", "p90_us", "client_cpu_us"):
            assert _positive(row[key]), (row["placement"], key, row[key])
        assert 0 <= row["same_cpu"] <= 1
        if row["placement"] == "pinned":
            assert row["same_cpu"] == 0, row
