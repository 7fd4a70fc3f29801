"""``vchan bench``: vchan against Unix-socket and TCP loopback, through asyncio.

What it measures
----------------
Server and client are two SEPARATE processes for every transport
(:mod:`~vchan.bench.processes`): **vchan** between emulated domains 1 and 2
of a private emulator at its default settings (1,024 grant pages per domain;
with ``VCHAN_SIM_DIR`` set, that emulator is used as it is; on real Xen both
processes are in this domain), **unix** and **tcp** (127.0.0.1,
``TCP_NODELAY``) -- each on the default asyncio loop and on uvloop.  The
cases, each in its module:

1. **bulk** (:mod:`~vchan.bench.bulk`): throughput by write size and
   receiver, one direction or both, and by vchan ring size;
2. **pingpong** (:mod:`~vchan.bench.pingpong`): round-trip latency;
3. **connections** and 4. **setup** (:mod:`~vchan.bench.concurrency`): many
   connections at once, memory per connection, connections opened per second;
5. **matrix** (:mod:`~vchan.bench.matrix`): the streams API as users write
   it -- StreamReader ``limit`` x read style x write style;
6. **dropin** (:mod:`~vchan.bench.dropin`): connections by address.

Bulk, ping-pong, setup, matrix and drop-in measurements are repeated (``--repeat``)
and the median kept (:mod:`~vchan.bench.suite`).  Single-core memcpy
bandwidth is measured in the same run, for the targets.  Output: progress and
an estimate of the time left on stderr, the Markdown report
(:mod:`~vchan.bench.report`) on stdout, and ``results.json``, ``report.md``
and PNG plots in ``--out``.

How to run
----------
::

    vchan bench --quick                       # under a minute
    vchan bench --out docs/bench              # the full suite
    vchan bench --cases pingpong --loops uvloop --rounds 50000
    vchan bench --cases matrix --matrix-limits 64K,1M --matrix-writes write-64,writelines
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import matrix
from .common import (
    DIRECTIONS,
    LOOPS,
    READ_SIZE,
    RECEIVERS,
    TRANSPORTS,
    BenchError,
    Json,
    parse_choices,
    parse_counts,
    parse_size,
    parse_sizes,
    parse_us_list,
)
from .machine import machine_info, memcpy_bandwidth
from .processes import Runner, child_main
from .suite import CASES, execute, plan_runs

VCHAN_SERVER_DOMID = 1
VCHAN_CLIENT_DOMID = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vchan bench",
        description="vchan against TCP loopback and Unix sockets, on asyncio and uvloop, "
                    "server and client in separate processes (separate emulated domains "
                    "for vchan): bulk transfers, ping-pong latency, many connections, "
                    "connection setup.  Prints a Markdown table; writes results.json, "
                    "report.md and PNG plots to --out.",
        epilog="examples:\n  vchan bench --quick\n  vchan bench --out bench-results\n"
               "  vchan bench --cases pingpong --loops uvloop --rounds 50000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (about a minute): 64 KiB writes, fewer "
                             "round trips, 10 and 1,000 connections, 8 matrix cells")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="where to write results.json, report.md and the plots "
                             "(default: vchan-bench-YYYYmmdd-HHMMSS)")
    parser.add_argument("--no-report", action="store_true",
                        help="print the table only; write nothing")
    parser.add_argument("--cases", type=parse_choices(CASES), default=None,
                        help=f"{','.join(CASES)} (default all)")
    parser.add_argument("--loops", type=parse_choices(LOOPS), default=None,
                        help="event loops: asyncio,uvloop (default both)")
    parser.add_argument("--transports", type=parse_choices(TRANSPORTS), default=list(TRANSPORTS),
                        help="vchan,unix,tcp (default all three)")
    parser.add_argument("--vchan-connections", choices=("session", "dedicated"),
                        default="session",
                        help="vchan clients open streams of their session (default), or "
                             "each connection with a ring of its own (dedicated=True), "
                             "as before sessions")
    parser.add_argument("--bytes", type=parse_size, default=None,
                        help="bytes per bulk run, e.g. 512M (default 512 MiB, --quick 64 MiB; "
                             "small writes send fewer, see --max-writes)")
    parser.add_argument("--max-writes", type=int, default=None,
                        help="at most this many writes per bulk run (default 200,000)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="bulk write sizes (default 64,1K,16K,64K,256K,1M; --quick 64K)")
    parser.add_argument("--directions", type=parse_choices(DIRECTIONS), default=list(DIRECTIONS),
                        help="bulk: one (client to server) and/or both at once")
    parser.add_argument("--receivers", type=parse_choices(RECEIVERS), default=None,
                        help="bulk receiving side: streams,protocol,buffered "
                             "(default all; --quick streams,buffered)")
    parser.add_argument("--ring-sizes", type=parse_sizes, default=None,
                        help="vchan ring sizes to sweep in bulk runs (default 64K,256K,1M; "
                             "--quick 1M besides the default)")
    parser.add_argument("--ping-sizes", type=parse_sizes, default=[64, 4096],
                        help="ping-pong message sizes (default 64,4096)")
    parser.add_argument("--busy-poll", type=parse_us_list, default=[0.0, 50.0], metavar="US",
                        help="ping-pong also runs vchan with busy_poll= each of these "
                             "microseconds (comma-separated; 0: never poll; default 0,50; "
                             "the default rows poll adaptively)")
    parser.add_argument("--ping-gaps", type=parse_us_list, default=[1000.0], metavar="US",
                        help="ping-pong also runs 64 B requests this many microseconds "
                             "apart, for vchan (by default and with busy_poll=0) and Unix "
                             "sockets: latency and CPU of sparse requests (default 1000; "
                             "0: none)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed round trips (default 20,000, --quick 3,000)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed round trips first (default 1,000, --quick 300)")
    parser.add_argument("--connections", type=parse_counts, default=None,
                        dest="connection_counts",
                        help="concurrent connections (default 1,10,100,1000,10000; "
                             "--quick 10,1000,10000)")
    parser.add_argument("--setup-count", type=int, default=None,
                        help="connections opened in the setup-rate case (default 500, "
                             "--quick 100)")
    matrix.add_arguments(parser)
    parser.add_argument("--repeat", type=int, default=None,
                        help="make each bulk, ping-pong, setup, matrix and drop-in "
                             "measurement N times and keep the median (default 3, --quick 1)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one measurement may take (default 600)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> None:
    from ..endpoint import DEFAULT_RING_SIZE

    quick = args.quick

    def default(name: str, full: Any, short: Any) -> None:
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)

    default("cases", list(CASES), list(CASES))
    default("loops", list(LOOPS), list(LOOPS))
    default("bytes", 512 << 20, 64 << 20)
    default("max_writes", 200_000, 50_000)
    default("sizes", [64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20], [64 << 10])
    default("receivers", list(RECEIVERS), ["streams", "buffered"])
    default("ring_sizes", [64 << 10, DEFAULT_RING_SIZE, 1 << 20], [DEFAULT_RING_SIZE, 1 << 20])
    default("rounds", 20_000, 3_000)
    default("warmup", 1_000, 300)
    default("connection_counts", [1, 10, 100, 1000, 10000], [10, 1000, 10000])
    default("setup_count", 500, 100)
    default("repeat", 3, 1)
    args.default_ring = DEFAULT_RING_SIZE
    args.ring_sweep_sizes = [s for s in args.sizes if s in (4096, 64 << 10, 1 << 20)] \
        or args.sizes[:1]
    args.connection_bytes = (64 if quick else 256) << 20
    matrix.defaults(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role:
        return child_main(args.role, args.parent)
    loops_given = args.loops is not None
    _defaults(args)
    if min(args.rounds, args.max_writes, args.repeat) < 1 or args.warmup < 0 \
            or args.timeout <= 0:
        parser.error("--rounds, --max-writes and --repeat must be >= 1, --warmup >= 0, "
                     "--timeout > 0")
    for ring in args.ring_sizes:
        if not 0 < ring <= 1 << 20:
            parser.error(f"--ring-sizes: {ring} is outside 1..1048576")
    if (problem := matrix.check_args(args)) is not None:
        parser.error(problem)
    if "uvloop" in args.loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if loops_given:
                parser.error("uvloop is not installed (pip install 'vchan[uvloop]', "
                             "or --loops asyncio)")
            print("vchan bench: uvloop is not installed: measuring the asyncio loop only "
                  "(pip install 'vchan[bench]' for both, and plots)", file=sys.stderr)
            args.loops = ["asyncio"]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from .. import backend, sim
    from ..sim.private import Emulator
    from ..sim.private import private as sim_private

    backend_name = backend.default_backend_name()
    private_emulator = "VCHAN_SIM_DIR" not in os.environ
    emulator: Emulator | None = None
    tmp = Path(tempfile.mkdtemp(prefix="vchan-bench-"))
    runner: Runner | None = None
    started = time.time()
    try:
        vchan_peer: int | None = None
        server_env, client_env = dict(os.environ), dict(os.environ)
        if backend_name == "sim":
            # VCHAN_SIM_DIR's emulator as it is, else one of our own; one
            # started here is stopped here (as vchan demo does).  It keeps its
            # default grant limit (1,024 pages, as gntalloc's): what a user
            # gets.  Connections share their session's ring, so even 10,000
            # need no more.
            emulator = sim_private(reuse_env=True, own_domid=None).start()
            server_env = emulator.env(VCHAN_SERVER_DOMID)
            client_env = emulator.env(VCHAN_CLIENT_DOMID)
            vchan_peer = VCHAN_CLIENT_DOMID
        print("vchan bench: measuring memcpy", file=sys.stderr, flush=True)
        results: Json = {
            "machine": machine_info(backend=backend_name),
            "memcpy": {"bytes_per_s": memcpy_bandwidth(), "block_bytes": 64 << 20},
        }
        plan = plan_runs(args)
        runner = Runner(server_env, client_env, tmp, vchan_peer, args.timeout,
                        dedicated=args.vchan_connections == "dedicated")
        results.update(execute(runner, plan, args.repeat))
        results["settings"] = {
            "quick": args.quick,
            "command": "vchan bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_seconds": time.time() - started,
            "cases": args.cases, "loops": args.loops, "transports": args.transports,
            "directions": args.directions, "receivers": args.receivers,
            "bytes": args.bytes, "max_writes": args.max_writes, "sizes": args.sizes,
            "read_size": READ_SIZE, "ping_sizes": args.ping_sizes, "rounds": args.rounds,
            "warmup": args.warmup, "ring_sizes": sorted(set(args.ring_sizes)),
            "default_ring_size": args.default_ring,
            "connection_counts": args.connection_counts,
            "connection_bytes": args.connection_bytes, "setup_count": args.setup_count,
            "vchan_connections": args.vchan_connections,
            "matrix": matrix.settings(args) if "matrix" in args.cases else None,
            "repeat": args.repeat,
            "timeout_seconds": args.timeout,
            "vchan_domains": ({"server": VCHAN_SERVER_DOMID, "client": VCHAN_CLIENT_DOMID}
                              if backend_name == "sim" else "own domain"),
            "private_emulator": private_emulator,
            "units": "bytes_per_s at the receiver, first delivery to EOF (both directions: "
                     "the sum); latency in us at the client; memory in bytes",
        }
        runner.close()
        runner = None
    except BenchError as exc:
        print(f"vchan bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if runner is not None:
            runner.close(kill=True)
        if emulator is not None:
            with contextlib.suppress(sim.SimError, OSError):
                emulator.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    from .report import render_markdown, write_report

    print(render_markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not args.no_report:
        out = args.out or Path(time.strftime("vchan-bench-%Y%m%d-%H%M%S"))
        written = write_report(results, out)
        print(f"\nvchan bench: wrote {', '.join(str(p) for p in written.values())}",
              file=sys.stderr)
        if not any(str(p).endswith(".png") for p in written.values()):
            print("vchan bench: no plots: install matplotlib (pip install 'vchan[bench]')",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
