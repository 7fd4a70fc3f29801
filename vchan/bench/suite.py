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
    times and the median run is kept (all values are in the row's ``repeats``).
    The repeats are rounds over the whole plan, not runs back to back: a
    phase of a few seconds in which the machine is slower (another tenant, the
    VM's two CPUs given one's worth) then spoils one run of a measurement, not
    all of them.  A failed many-connections or matrix measurement is recorded
    (``ok`` False, ``error``; not measured again) and the children restarted;
    any other failure ends the run.
    """
    rounds = [[m for m in plan if r == 0 or m["case"] in REPEATED] for r in range(repeat)]
    estimated = sum(m["estimate"] for todo in rounds for m in todo)
    total = sum(len(todo) for todo in rounds)
    print(f"vchan bench: {total} measurements, about {_clock(estimated)} "
          f"(min:s)", file=sys.stderr, flush=True)
    t_start = time.monotonic()
    done_estimate = 0.0
    runs: dict[int, list[Json]] = {id(m): [] for m in plan}
    failed: dict[int, Json] = {}
    i = 0
    for todo in rounds:
        for m in todo:
            i += 1
            if id(m) in failed:
                done_estimate += m["estimate"]
                continue
            params = {k: v for k, v in m.items() if k not in ("case", "transport", "loop",
                                                              "estimate")}
            try:
                server, client = runner.measure(m["case"], m["transport"], m["loop"],
                                                **params)
                row = make_row(m, server, client)
                runs[id(m)].append(row)
            except BenchError as exc:
                if m["case"] not in ("connections", "matrix"):
                    raise
                # Many connections may hit a limit (grants, descriptors), a
                # matrix cell may fail alone: a result too.
                row = failed[id(m)] = _failure(m, exc)
                runner.restart()
            done_estimate += m["estimate"]
            elapsed = time.monotonic() - t_start
            left = (estimated - done_estimate) * elapsed / done_estimate
            print(f"  [{i:>3}/{total} {_clock(elapsed)} elapsed, ~{_clock(left)} left] "
                  f"{describe(m)}: {summarize(dict(row, case_=m['case']))}",
                  file=sys.stderr, flush=True)
    out: dict[str, list[Json]] = {}
    for m in plan:
        row = failed.get(id(m)) or _median(runs[id(m)], m["case"])
        out.setdefault(m["case"], []).append(row)
    return out


def _failure(m: Json, exc: BenchError) -> Json:
    """The row of a measurement that failed."""
    row = plan_fields(m)
    row.update(ok=False, error=str(exc), bytes_per_s=None)
    if m["case"] == "connections":
        row.update(server_rss_per_conn=None, client_rss_per_conn=None)
    return row
