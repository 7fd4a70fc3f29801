"""``vchan bench --cases dropin``: connections by address (:mod:`vchan.dropin`).

The setup and bulk measurements of :mod:`~vchan.bench.concurrency` and
:mod:`~vchan.bench.bulk` (64 KiB writes, streams at both ends), on four
paths: plain TCP; a drop-in client (``vchan.open_connection`` by host and
port) to a plain TCP server, so it falls back; a drop-in client to a drop-in
server (``vchan.start_server(cb, host, port)``), upgraded to vchan; and vchan
by ``(domid, port)``.  A measurement's ``what`` says which of the two it is;
the children run it as that case.
"""

from __future__ import annotations

import argparse

from . import bulk, concurrency
from .common import Json, planned

DROPIN_PATHS = ("tcp", "dropin-tcp", "dropin", "vchan")


def plan(args: argparse.Namespace) -> list[Json]:
    """Setup on every path, then bulk on every path, loop by loop."""
    out: list[Json] = []
    nbytes = min(int(args.bytes), 256 << 20)
    for loop in args.loops:
        for path in DROPIN_PATHS:
            out.append(planned("dropin", path, loop, 0.4 + (args.setup_count + 20) * 6e-4,
                               what="setup", count=args.setup_count, warmup=20))
        for path in DROPIN_PATHS:
            out.append(planned("dropin", path, loop, 0.5 + nbytes / 1e9, what="bulk",
                               bytes=nbytes, write_size=64 << 10, direction="one",
                               receiver="streams", ring_size=None))
    return out


def as_case(m: Json) -> Json:
    """The measurement as the case it runs as (setup or bulk)."""
    return {**m, "case": m["what"]}


def describe(m: Json) -> str:
    """A drop-in measurement in the progress lines."""
    what = f"drop-in {'connection setup' if m['what'] == 'setup' else 'bulk 64 KiB'}"
    return f"{what} {m['loop']} {m['transport']}"


def row(m: Json, server: Json, client: Json) -> Json:
    """The setup or bulk row of a drop-in path, with its ``what``."""
    case = bulk if m["what"] == "bulk" else concurrency
    return {**case.row(as_case(m), server, client), "what": m["what"]}


def summary(row: Json) -> str:
    """A drop-in row in the progress lines: as the case it ran as."""
    return bulk.summary(row) if row["what"] == "bulk" else concurrency.summary(row)
