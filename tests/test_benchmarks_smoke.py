"""benchmarks/ring_throughput.py still runs and writes complete JSON.

A smoke test only: it keeps the benchmark from rotting and asserts nothing
about speed -- just that every reported number is there and positive.
"""

from __future__ import annotations

import json
import math
import os
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
