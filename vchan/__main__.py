"""The ``vchan`` command (also ``python -m vchan``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_ring_demo

    nbytes = int(args.mib * (1 << 20))
    print(f"vchan {__version__}: streaming {args.mib} MiB from a child process through a "
          f"{(1 << args.order) // 1024} KiB libxenvchan ring ...")
    result = run_ring_demo(nbytes, args.order)
    verdict = "match" if result.ok else "MISMATCH"
    print(f"  received {result.nbytes} bytes in {result.seconds:.3f} s "
          f"= {result.rate / 1e9:.2f} GB/s, {result.events} wake-ups")
    print(f"  sha256 sent     {result.digest_sent}")
    print(f"  sha256 received {result.digest_received}  ({verdict})")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vchan`` command."""
    parser = argparse.ArgumentParser(
        prog="vchan",
        description="Xen inter-domain shared-memory channels (libxenvchan).",
    )
    parser.add_argument("--version", action="version", version=f"vchan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="stream data between two processes through a vchan ring and check it",
        description="Stream data between two processes through a libxenvchan ring.",
        epilog="example: vchan demo --mib 1024 --order 20",
    )
    demo.add_argument("--mib", type=float, default=512, help="MiB to send (default 512)")
    demo.add_argument("--order", type=int, default=18, choices=range(10, 21), metavar="10..20",
                      help="log2 of the ring size (default 18 = 256 KiB)")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
