"""vchan against TCP between dom0 and a domU, on the Xen rig.

Run in the rig's dom0 by ``python tests/xen/rig.py bench``: a domU with a
``vif`` on dom0's ``xenbr0`` bridge (Xen's netfront/netback) runs the same
asyncio streams server over vchan and over TCP (``roles.py bench-server``);
dom0 runs the client (``roles.py bench-client``) against each in turn,
``--repeat`` times, alternating.  Under QEMU's TCG the absolute numbers mean
little; the ratio is the result.  Writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import Domu, LocalJob


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=16, help="bulk transfer size")
    parser.add_argument("--rounds", type=int, default=300, help="ping-pong rounds")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each transport")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)

    started = time.monotonic()
    dom = Domu.start("bench", vif=True)
    host = f"10.99.0.{10 + dom.domid}"
    results: dict[str, list[dict[str, Any]]] = {"vchan": [], "tcp": []}
    try:
        servers = [dom.spawn("--deadline", 3600, "bench-server", "vchan", "bench", "--peers", 0),
                   dom.spawn("--deadline", 3600, "bench-server", "tcp", 5001)]
        for server in servers:
            server.wait_for("listening")
        for _ in range(args.repeat):
            for kind, port in (("vchan", "bench"), ("tcp", "5001")):
                job = LocalJob("--deadline", 900, "bench-client", kind, dom.domid, port,
                               "--host", host, "--mib", args.mib, "--rounds", args.rounds)
                try:
                    result = job.wait(960)
                finally:
                    job.close()
                if result.rc != 0:
                    print(result.out, file=sys.stderr)
                    return 1
                results[kind].append(result.last)
                print(json.dumps(result.last), flush=True)
    finally:
        dom.close()

    def median(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[kind]))

    summary = {
        kind: {key: median(kind, key) for key in ("mib_per_s", "rtt_median_us")}
        for kind in results
    }
    ratios = {
        "throughput_vchan_over_tcp": round(summary["vchan"]["mib_per_s"]
                                           / summary["tcp"]["mib_per_s"], 2),
        "rtt_tcp_over_vchan": round(summary["tcp"]["rtt_median_us"]
                                    / summary["vchan"]["rtt_median_us"], 2),
    }
    doc = {"args": vars(args) | {"out": str(args.out)}, "runs": results, "median": summary,
           "ratios": ratios, "kernel": platform.release(),
           "seconds": round(time.monotonic() - started)}
    (args.out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = [
        f"dom0 <-> domU on the Xen rig (QEMU TCG), {args.mib} MiB bulk dom0 -> domU, "
        f"{args.rounds} x 64-byte ping-pong, median of {args.repeat} runs each",
        "",
        "| transport | bulk MiB/s | round trip (median, us) |",
        "|---|---:|---:|",
        *(f"| {kind} | {summary[kind]['mib_per_s']:.2f} | {summary[kind]['rtt_median_us']:.0f} |"
          for kind in ("vchan", "tcp")),
        "",
        f"vchan / TCP throughput: {ratios['throughput_vchan_over_tcp']}x; "
        f"TCP / vchan round-trip time: {ratios['rtt_tcp_over_vchan']}x",
    ]
    (args.out / "bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
