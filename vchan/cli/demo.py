"""``vchan demo``: a server and a client in two emulated domains (the quick start)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["add_parser"]


def _demo(args: argparse.Namespace) -> int:
    from .. import sim
    from ..backend import BackendError, check_environment, default_backend_name
    from ..demo import run_demo

    # The demo's processes start the emulator if it is not running: stop
    # what it started (and say so), leave alone what it found.
    if default_backend_name() == "xen":
        raise BackendError("the demo plays two domains on the emulator: run it with "
                         "VCHAN_BACKEND=sim (on real Xen, run a server and a client in two "
                         "real domains)")
    check_environment(domid=False)     # its processes set their own domains
    directory = sim.state_dir()
    started = not sim.is_running(directory)
    sim.ensure_running(directory)       # its failure in one line, not in each process
    try:
        return _run_demo(args, run_demo)
    finally:
        if started and sim.is_running(directory):
            print(_put_away_emulator(directory))


def _put_away_emulator(directory: Path) -> str:
    """Stop the emulator the demo started, unless someone else uses it by now."""
    import time

    from .. import sim

    deadline = time.monotonic() + 2.0
    while True:     # the demo's processes are gone; the daemon notices at once
        users = sorted({p for d in sim.control({"cmd": "status"}, directory)["domains"]
                        for p in d["processes"]})
        if not users or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if users:
        return (f"\nthe emulator the demo started in {directory} is left running: "
                f"processes {', '.join(map(str, users))} use it (vchan sim stop stops it)")
    sim.stop(directory)
    return f"\nstopped the emulator the demo started in {directory}"


def _run_demo(args: argparse.Namespace, run_demo: Any) -> int:
    nbytes = int(args.mib * (1 << 20))
    print(f"vchan {__version__}: a server in emulated domain 1 and a client in domain 2;\n"
          f"the client streams {args.mib:g} MiB (SHA-256 checked at both ends), then times "
          f"64-byte request/response round trips.  The same over a Unix socket for "
          f"comparison.\n")
    results = run_demo(nbytes, compare=not args.no_compare)
    print(f"{'transport':<12}{'throughput':>14}{'round trip p50':>17}   sha256")
    for r in results:
        verdict = "match" if r.ok else "MISMATCH"
        print(f"{r.transport:<12}{r.rate / 1e9:>10.2f} GB/s{r.rtt_p50_us:>14.1f} us   "
              f"{r.sha256_received[:16]}... ({verdict})")
    if len(results) == 2:
        v, u = results
        print(f"\nvchan / unix: {v.rate / u.rate:.2f}x the throughput, "
              f"{u.rtt_p50_us / v.rtt_p50_us:.2f}x the round-trip rate")
    return 0 if all(r.ok for r in results) else 1


def add_parser(subparsers: Any) -> None:
    """Add ``demo`` to the ``vchan`` command's subparsers."""
    demo = subparsers.add_parser(
        "demo",
        help="show vchan streams between two emulated domains (the quick start)",
        description="Run a vchan server and client in two emulated domains, move data "
                    "between them with SHA-256 checked, and compare with a Unix socket.",
        epilog="example: vchan demo --mib 1024",
    )
    demo.add_argument("--mib", type=float, default=512, help="MiB to send (default 512)")
    demo.add_argument("--no-compare", action="store_true",
                      help="skip the Unix-socket comparison")
    demo.set_defaults(func=_demo)
