"""The run: every measurement in order, with progress and the time left.

:func:`plan_runs` lists the measurements of the chosen cases, each case
family planning its own (:mod:`~vchan.bench.bulk`,
:mod:`~vchan.bench.pingpong`, :mod:`~vchan.bench.concurrency`,
:mod:`~vchan.bench.dropin`, :mod:`~vchan.bench.matrix`); :func:`execute`
makes them through a :class:`~vchan.bench.processes.Runner`, repeating
those that are repeated and keeping the median.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import ModuleType

from . import bulk, concurrency, dropin, matrix, pingpong
from .common import BenchError, Json, plan_fields
from .processes import Runner

CASES = ("bulk", "pingpong", "connections", "setup", "matrix", "dropin")
REPEATED = ("bulk", "pingpong", "setup", "matrix", "dropin")  # measured --repeat times

#: The module of each case: its describe(), row() and summary().
FAMILIES: dict[str, ModuleType] = {
    "bulk": bulk, "pingpong": pingpong, "connections": concurrency, "setup": concurrency,
    "dropin": dropin, "matrix": matrix}

# A measurement to make: what the children are told, and a guess of its length.
Plan = list[Json]


def plan_runs(args: argparse.Namespace) -> Plan:
    """Every measurement of this run, in order, with a rough duration each."""
    planners = (("bulk", bulk.plan), ("pingpong", pingpong.plan),
                ("connections", concurrency.plan_connections),
                ("setup", concurrency.plan_setup), ("dropin", dropin.plan),
                ("matrix", matrix.plan))
    plan: Plan = []
    for case, planner in planners:
        if case in args.cases:
            plan += planner(args)
    return plan


def describe(m: Json) -> str:
    """A measurement in the progress lines."""
    return str(FAMILIES[m["case"]].describe(m))


def make_row(m: Json, server: Json, client: Json) -> Json:
    """One result row from a measurement's two halves."""
    return dict(FAMILIES[m["case"]].row(m, server, client))


def summarize(row: Json) -> str:
    """A result row in the progress lines (``case_``: its measurement's case)."""
    return str(FAMILIES[row["case_"]].summary(row))


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _median(rows: list[Json], case: str) -> Json:
    """The median run of a repeated measurement (by throughput, or by p50 latency)."""
    if len(rows) == 1:
        return rows[0]
    by_latency = case in ("pingpong", "setup") or rows[0].get("what") == "setup"
    key = "p50_us" if by_latency else "bytes_per_s"
    ordered = sorted(rows, key=lambda r: float(r[key]))
    row = dict(ordered[(len(ordered) - 1) // 2] if by_latency else ordered[len(ordered) // 2])
    row["repeats"] = [r[key] for r in rows]
    return row


def execute(runner: Runner, plan: Plan, repeat: int = 1) -> dict[str, list[Json]]:
    """Run the plan, with progress and a running estimate of the time left.

    Bulk, ping-pong, setup, matrix and drop-in measurements are made ``repeat``
    times and the median run is kept (all values are in the row's ``repeats``).  A
    failed many-connections or matrix measurement is recorded (``ok`` False,
    ``error``) and the children restarted; any other failure ends the run.
    """
    out: dict[str, list[Json]] = {}
    for m in plan:
        if m["case"] in REPEATED:
            m["estimate"] *= repeat
    estimated = sum(m["estimate"] for m in plan)
    print(f"vchan bench: {len(plan)} measurements, about {_clock(estimated)} "
          f"(min:s)", file=sys.stderr, flush=True)
    t_start = time.monotonic()
    done_estimate = 0.0
    for i, m in enumerate(plan, 1):
        params = {k: v for k, v in m.items() if k not in ("case", "transport", "loop",
                                                          "estimate")}
        try:
            rows = []
            for _ in range(repeat if m["case"] in REPEATED else 1):
                server, client = runner.measure(m["case"], m["transport"], m["loop"],
                                                **params)
                rows.append(make_row(m, server, client))
            row = _median(rows, m["case"])
        except BenchError as exc:
            if m["case"] not in ("connections", "matrix"):
                raise
            # Many connections may hit a limit (grants, descriptors), a matrix
            # cell may fail alone: a result too.
            row = plan_fields(m)
            row.update(ok=False, error=str(exc), bytes_per_s=None)
            if m["case"] == "connections":
                row.update(server_rss_per_conn=None, client_rss_per_conn=None)
            runner.restart()
        out.setdefault(m["case"], []).append(row)
        done_estimate += m["estimate"]
        elapsed = time.monotonic() - t_start
        left = (estimated - done_estimate) * elapsed / done_estimate
        print(f"  [{i:>3}/{len(plan)} {_clock(elapsed)} elapsed, ~{_clock(left)} left] "
              f"{describe(m)}: {summarize(dict(row, case_=m['case']))}",
              file=sys.stderr, flush=True)
    return out
