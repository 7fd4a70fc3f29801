"""Event round trip between two processes: vchan event channels vs a pipe.

One process notifies a port; the other's poll() wakes, it takes the pending
port, unmasks it and notifies back; the first wakes likewise.  That is one
round trip, the cost every vchan wake-up pays.  The same ping-pong over a
pair of pipes (poll, then a 1-byte read and write) is the control.

    python benchmarks/event_latency.py [--rounds 20000] [--json out.json]

Under the emulator (the default where there is no Xen), the two processes
are emulated domains 1 and 2 of a private emulator instance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import time
from typing import Any

from vchan.bench.machine import machine_info


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))]

    return {"p50_us": pct(50) * 1e6, "p99_us": pct(99) * 1e6, "p99.9_us": pct(99.9) * 1e6,
            "mean_us": statistics.fmean(s) * 1e6, "n": len(s)}


def _wait(poller: select.poll) -> None:
    while not poller.poll(10_000):
        raise TimeoutError("no event within 10 s")


def pong_events(remote_port: int) -> None:
    from vchan.devices import EventChannel

    with EventChannel() as ev:
        port = ev.bind_interdomain(1, remote_port)
        print(port, flush=True)
        poller = select.poll()
        poller.register(ev.fileno(), select.POLLIN)
        while True:
            _wait(poller)
            if ev.pending() is None:
                continue
            ev.unmask(port)
            ev.notify(port)


def ping_events(rounds: int) -> list[float]:
    from vchan.devices import EventChannel

    # Domain 2 must exist before we can offer it a port: start it first.
    child = subprocess.Popen([sys.executable, __file__, "--pong-events"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, VCHAN_DOMID="2"))
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    samples: list[float] = []
    with EventChannel() as ev:
        port = ev.bind_unbound(2)
        child.stdin.write(f"{port}\n")
        child.stdin.flush()
        child.stdout.readline()
        poller = select.poll()
        poller.register(ev.fileno(), select.POLLIN)
        for _ in range(rounds):
            t0 = time.perf_counter()
            ev.notify(port)
            _wait(poller)
            got = ev.pending()
            ev.unmask(port)
            samples.append(time.perf_counter() - t0)
            assert got == port
    child.kill()
    child.wait()
    return samples


def ping_pipes(rounds: int) -> list[float]:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(a_w)           # so the parent's close reads as EOF here
        os.close(b_r)
        poller = select.poll()
        poller.register(a_r, select.POLLIN)
        while True:
            _wait(poller)
            if not os.read(a_r, 1):
                os._exit(0)
            os.write(b_w, b"x")
    poller = select.poll()
    poller.register(b_r, select.POLLIN)
    samples: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        os.write(a_w, b"x")
        _wait(poller)
        os.read(b_r, 1)
        samples.append(time.perf_counter() - t0)
    os.close(a_w)
    os.waitpid(pid, 0)
    for fd in (a_r, b_r, b_w):
        os.close(fd)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--pong-events", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.pong_events:
        from vchan.devices import GrantMapper

        presence = GrantMapper()    # domain 2 exists while we are connected
        print("ready", flush=True)
        pong_events(int(sys.stdin.readline()))
        presence.close()
        return 0

    from vchan import backend
    from vchan.sim.private import private

    emulated = backend.default_backend_name() == "sim"
    os.environ["VCHAN_DOMID"] = "1"
    with private(reuse_env=True, own_domid=1) if emulated else contextlib.nullcontext():
        results: dict[str, Any] = {
            "machine": machine_info(backend=backend.get_backend().name),
            "rounds": args.rounds,
        }
        warm = max(100, args.rounds // 20)
        ping_pipes(warm)
        results["pipe"] = _percentiles(ping_pipes(args.rounds))
        results["event_channel"] = _percentiles(ping_events(args.rounds + warm)[warm:])
    print(f"event round trip between two processes, {args.rounds} rounds "
          f"({results['machine']['backend']} backend)\n")
    print("| transport | p50 us | p99 us | p99.9 us | mean us |")
    print("|---|---:|---:|---:|---:|")
    for name, key in (("vchan event channel", "event_channel"), ("pipe", "pipe")):
        r = results[key]
        print(f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['p99.9_us']:.1f} | "
              f"{r['mean_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
