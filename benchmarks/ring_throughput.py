#!/usr/bin/env python3
"""In-process throughput of the vchan ring, next to plain memcpy.

What it measures
----------------
For each chunk size (64 B ... 1 MiB by default):

* **ring** -- one process, one thread: a server :class:`vchan.ring.Ring` and a
  client ``Ring`` over ONE shared anonymous ``mmap`` (control page 0 followed
  by the separate ring buffers).  The loop is ``client.write(chunk)`` (from a
  ``bytes`` object) then ``server.read_into(out)`` (into a preallocated
  ``bytearray``): the ring's zero-extra-copy path, so every payload byte is
  copied exactly TWICE, once into the ring and once out of it.  The client's
  write ring is ``--order`` (default 20 = 1 MiB), raised for a chunk that
  would not fit.  Throughput is reported as payload bytes moved per second
  (each counted once although it is copied twice); "ops/s" are write+read
  pairs per second.
* **memmove** -- ``ctypes.memmove`` of the same size between two
  preallocated buffers in a Python loop: one copy per chunk, with a foreign
  call per copy (the same per-call overhead class as a cffi call).
* **memmove x2** -- two ``ctypes.memmove`` per chunk, source -> staging ->
  destination, where the staging area is an anonymous shared mmap as large as
  the ring and walked through chunk by chunk exactly as the ring's write
  index walks the ring, so the copies AND the cache footprint match the ring.
  ``ring / memmove x2`` is therefore the honest price of the ring's indices,
  fences, validation and cffi wrapper over the bare copies.
* **ceiling** -- single ``memmove`` of 64 MiB blocks: the machine's memory
  copy bandwidth (bytes copied once).

Each number is the best of several repeats; each repeat runs an adaptively
chosen iteration count (about ``--target`` seconds).  GB/s are decimal
(1e9 bytes/s).  The cyclic garbage collector is off while timing.

With ``--c`` (optional), ``tests/c/ring_stress.c`` is compiled with ``-O2``
and run once per ring order for the two-thread C throughput; the mode skips
with a message if the program, a C compiler or the expected command-line
interface is missing.

How to run
----------
::

    python benchmarks/ring_throughput.py                 # full, about 40 s
    python benchmarks/ring_throughput.py --quick         # about 10 s
    python benchmarks/ring_throughput.py --sizes 64,4K --json out.json
    python benchmarks/ring_throughput.py --order 16 --c

The Markdown table and machine information go to stdout; ``--json PATH``
also writes every result (including per-repeat samples) as JSON.  The
benchmark is single-threaded (``--c`` runs two threads); run it on an
otherwise idle machine for stable numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from vchan.bench.machine import machine_info
from vchan.ring import MAX_ORDER, MIN_ORDER, PAGE_SIZE, Ring, ring_offset

ROOT = Path(__file__).resolve().parent.parent
STRESS_SOURCE = ROOT / "tests" / "c" / "ring_stress.c"
RING_SOURCE = ROOT / "vchan" / "ring.c"

DEFAULT_SIZES = [64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
DEFAULT_ORDER = 20
C_ORDERS = [10, 11, 12, 14, 16, 18, 20]
CEILING_BLOCK = 64 << 20
C_PROBE_BYTES = 64 << 20
C_MAX_BYTES = 16 << 30
# The server -> client ring is unused here; give it its own page.
RIGHT_ORDER = 12

# (JSON key, table header) of the main table, in order.
COLUMNS = [
    ("chunk", "chunk"),
    ("ring_gbps", "ring GB/s"),
    ("memmove_gbps", "memmove GB/s"),
    ("memmove_x2_gbps", "memmove x2 GB/s"),
    ("ring_vs_memmove_x2", "ring/memmove x2"),
    ("ring_ops_per_s", "ring ops/s"),
]

# A run of n iterations; returns the elapsed seconds.
Runner = Callable[[int], float]


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


@dataclass
class Timing:
    """Best-of-N timing of one loop."""

    seconds_per_iter: float
    iterations: int
    samples: list[float]    # seconds per iteration, one per repeat


@contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(run: Runner, target: float, repeats: int, granule: int = 1) -> Timing:
    """Time ``run`` adaptively: calibrate n to about ``target`` s, keep the best.

    ``granule``: n is always a multiple of it (loops that walk a buffer in
    whole laps).
    """
    with _no_gc():
        n = granule
        floor = max(target / 8, 0.005)
        while True:
            elapsed = run(n)
            if elapsed >= floor:
                break
            n *= 2 if elapsed <= 0 else max(2, min(10, math.ceil(floor * 1.2 / elapsed)))
        n = max(granule, math.ceil(n * target / elapsed / granule) * granule)
        samples = [run(n) / n for _ in range(repeats)]
    return Timing(min(samples), n, samples)


def _pattern(size: int) -> bytes:
    """Non-zero, non-repeating-at-page-scale test data."""
    unit = bytes((i * 7 + 3) & 0xFF for i in range(251))    # a prime period
    return (unit * (size // len(unit) + 1))[:size]


def _address(buf: Any, keep: list[Any]) -> int:
    """Address of a writable buffer; the ctypes view is kept alive in ``keep``."""
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    keep.append(view)
    return ctypes.addressof(view)


# ---------------------------------------------------------------------------
# The ring.
# ---------------------------------------------------------------------------


class RingPair:
    """A server and a client Ring over one shared anonymous mmap.

    Layout: page 0 | left ring (client -> server, 2**order bytes, only for
    orders >= 12) | right ring (server -> client, one page, unused).
    """

    def __init__(self, order: int) -> None:
        self.order = order
        self.size = 1 << order
        left_len = 0 if ring_offset(order) is not None else self.size
        right_len = 1 << RIGHT_ORDER
        self.mem = mmap.mmap(-1, PAGE_SIZE + left_len + right_len)
        view = memoryview(self.mem)
        page = view[:PAGE_SIZE]
        left = view[PAGE_SIZE:PAGE_SIZE + left_len] if left_len else None
        right = view[PAGE_SIZE + left_len:]
        self.server = Ring.server(page, read_order=order, write_order=RIGHT_ORDER,
                                  read_buffer=left, write_buffer=right)
        self.client = Ring.client(page, read_buffer=right, write_buffer=left)
        self.client.take_notify()

    def left_indices(self) -> tuple[int, int]:
        """(cons, prod) of the client -> server ring, from page 0."""
        cons, prod = struct.unpack_from("=II", self.mem, 0)
        return int(cons), int(prod)


def ring_runner(pair: RingPair, size: int) -> Runner:
    """client.write(chunk); server.read_into(out), n times, checked after."""
    chunk = _pattern(size)
    out = bytearray(size)
    write = pair.client.write
    read_into = pair.server.read_into

    # One checked lap of the whole ring first: faults every page in and
    # proves each call moves the whole chunk.
    for _ in range(pair.size // size + 1):
        if write(chunk) != size or read_into(out) != size or out != chunk:
            raise RuntimeError(f"ring did not move a {size}-byte chunk intact")
        out[:] = bytes(size)

    def run(n: int) -> float:
        cons0, prod0 = pair.left_indices()
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            write(chunk)
            read_into(out)
        elapsed = time.perf_counter() - t0
        # The ring is empty before each write and chunk <= ring size, so every
        # call moves the whole chunk; the shared indices prove it did.
        cons1, prod1 = pair.left_indices()
        moved = n * size & 0xFFFFFFFF
        if (prod1 - prod0) & 0xFFFFFFFF != moved or (cons1 - cons0) & 0xFFFFFFFF != moved:
            raise RuntimeError(f"ring moved the wrong byte count for {n} x {size} B")
        if out != chunk:
            raise RuntimeError("ring delivered corrupted data")
        pair.client.take_notify()
        pair.server.take_notify()
        return elapsed

    return run


# ---------------------------------------------------------------------------
# memmove.
# ---------------------------------------------------------------------------


class MemmoveRunner:
    """One ctypes.memmove of ``size`` bytes per iteration (a :data:`Runner`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._views: list[Any] = []     # the ctypes views pin the buffers
        self.src = bytearray(_pattern(size))
        self.dst = bytearray(size)
        self.s = _address(self.src, self._views)
        self.d = _address(self.dst, self._views)

    def __call__(self, n: int) -> float:
        move, d, s, size = ctypes.memmove, self.d, self.s, self.size
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            move(d, s, size)
        elapsed = time.perf_counter() - t0
        if self.dst != self.src:
            raise RuntimeError("memmove produced wrong data")
        return elapsed


class MemmoveX2Runner:
    """Two memmoves per iteration through a ring-sized staging mmap.

    The staging offset advances chunk by chunk like the ring's write index;
    ``granule`` is the number of iterations per lap of the staging area, and
    the iteration count passed in must be a multiple of it.
    """

    def __init__(self, size: int, ring_size: int) -> None:
        self.size = size
        self._views: list[Any] = []
        self.src = bytearray(_pattern(size))
        self.dst = bytearray(size)
        self.stage = mmap.mmap(-1, ring_size)
        self.s = _address(self.src, self._views)
        self.d = _address(self.dst, self._views)
        m = _address(self.stage, self._views)
        self.mids = [m + off for off in range(0, ring_size, size)]
        self.granule = len(self.mids)
        self(self.granule)      # fault the staging area in

    def __call__(self, n: int) -> float:
        move, d, s, size, mids = ctypes.memmove, self.d, self.s, self.size, self.mids
        t0 = time.perf_counter()
        for _ in repeat(None, n // len(mids)):
            for mid in mids:
                move(mid, s, size)
                move(d, mid, size)
        elapsed = time.perf_counter() - t0
        if self.dst != self.src:
            raise RuntimeError("memmove x2 produced wrong data")
        return elapsed


# ---------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------


@dataclass
class Row:
    chunk: int
    ring_order: int
    ring_gbps: float
    memmove_gbps: float
    memmove_x2_gbps: float
    ring_vs_memmove_x2: float
    ring_ops_per_s: float
    ring_ns_per_op: float
    memmove_ns_per_op: float
    memmove_x2_ns_per_op: float
    iterations: dict[str, int] = field(default_factory=dict)
    samples_s_per_op: dict[str, list[float]] = field(default_factory=dict)


def order_for(size: int, order: int) -> int:
    """The ring order used for a chunk: ``order``, raised until the chunk fits."""
    need = max(MIN_ORDER, (size - 1).bit_length())
    return max(order, need)


def bench_size(size: int, order: int, target: float, repeats: int) -> Row:
    pair = RingPair(order_for(size, order))
    ring = measure(ring_runner(pair, size), target, repeats)
    one = measure(MemmoveRunner(size), target, repeats)
    x2 = MemmoveX2Runner(size, pair.size)
    two = measure(x2, target, repeats, x2.granule)
    gbps = [size / t.seconds_per_iter / 1e9 for t in (ring, one, two)]
    return Row(
        chunk=size,
        ring_order=pair.order,
        ring_gbps=gbps[0],
        memmove_gbps=gbps[1],
        memmove_x2_gbps=gbps[2],
        ring_vs_memmove_x2=gbps[0] / gbps[2],
        ring_ops_per_s=1 / ring.seconds_per_iter,
        ring_ns_per_op=ring.seconds_per_iter * 1e9,
        memmove_ns_per_op=one.seconds_per_iter * 1e9,
        memmove_x2_ns_per_op=two.seconds_per_iter * 1e9,
        iterations={"ring": ring.iterations, "memmove": one.iterations,
                    "memmove_x2": two.iterations},
        samples_s_per_op={"ring": ring.samples, "memmove": one.samples,
                          "memmove_x2": two.samples},
    )


def bench_ceiling(target: float, repeats: int) -> dict[str, Any]:
    """Bandwidth of single large memmoves (bytes copied once)."""
    keep: list[Any] = []
    src = bytearray(_pattern(4096)) * (CEILING_BLOCK // 4096)
    dst = bytearray(CEILING_BLOCK)
    s, d = _address(src, keep), _address(dst, keep)
    move = ctypes.memmove

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            move(d, s, CEILING_BLOCK)
        return time.perf_counter() - t0

    run(1)
    timing = measure(run, target, repeats)
    if dst[-4096:] != src[-4096:]:
        raise RuntimeError("large memmove produced wrong data")
    keep.clear()
    return {
        "block_bytes": CEILING_BLOCK,
        "gbps": CEILING_BLOCK / timing.seconds_per_iter / 1e9,
        "seconds_per_copy": timing.seconds_per_iter,
        "iterations": timing.iterations,
        "samples_s_per_copy": timing.samples,
    }


# ---------------------------------------------------------------------------
# Optional: the two-thread C stress program.
# ---------------------------------------------------------------------------


def _c_compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


_UNITS = {"gb/s": 1e9, "gib/s": 2.0**30, "mb/s": 1e6, "mib/s": 2.0**20}
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*(GB/s|GiB/s|MB/s|MiB/s)",
                   re.IGNORECASE)


def parse_rate(text: str) -> float | None:
    """The first throughput in ``text`` ("1.5 GB/s", "800 MiB/s"), in GB/s."""
    m = _RATE.search(text)
    if m is None:
        return None
    return float(m.group(1)) * _UNITS[m.group(2).lower()] / 1e9


def _json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object, if any."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _compile_stress(cc: str, workdir: Path) -> tuple[Path | None, str]:
    """Build ring_stress with -O2; returns (executable or None, log)."""
    exe = workdir / "ring_stress"
    text = STRESS_SOURCE.read_text(encoding="utf-8", errors="replace")
    includes_ring_c = re.search(r'#\s*include\s*[<"][^">]*ring\.c[">]', text) is not None
    base = [cc, "-O2", "-std=gnu11", "-pthread", "-I", str(ROOT / "vchan"),
            "-I", str(ROOT), str(STRESS_SOURCE)]
    variants = [[str(RING_SOURCE)], []]
    if includes_ring_c:
        variants.reverse()
    log = ""
    for extra in variants:
        cmd = [*base, *extra, "-o", str(exe), "-lpthread"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        log += f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        if proc.returncode == 0:
            return exe, log
    return None, log


def _usage(exe: Path) -> str:
    out = ""
    for flag in ("--help", "-h"):
        try:
            proc = subprocess.run([str(exe), flag], capture_output=True, text=True,
                                  timeout=10, check=False)
        except subprocess.TimeoutExpired:
            continue
        out = proc.stdout + proc.stderr
        if "--" in out:
            break
    return out


def _run_stress(exe: Path, order: int, nbytes: int, order_opts: Sequence[str],
                bench_args: Sequence[str]) -> dict[str, Any]:
    """One ring_stress run; ``gbps`` is set on success, ``error`` otherwise."""
    run: dict[str, Any] = {"order": order, "bytes": nbytes}
    attempts = [
        ["--bytes", str(nbytes), *[a for o in order_opts for a in (o, str(order))],
         *bench_args],
        [f"--bytes={nbytes}", *[f"{o}={order}" for o in order_opts], *bench_args],
    ]
    for args in attempts:
        run["command"] = " ".join([exe.name, *args])
        try:
            proc = subprocess.run([str(exe), *args], capture_output=True, text=True,
                                  timeout=300, check=False)
        except subprocess.TimeoutExpired:
            run["error"] = "timed out after 300 s"
            return run
        output = (proc.stdout + proc.stderr).strip()
        run["returncode"] = proc.returncode
        run["output"] = output[-2000:]
        if proc.returncode != 0:
            run["error"] = f"exit status {proc.returncode}"
            continue
        run.pop("error", None)
        report = _json_line(proc.stdout)
        rate = report.get("gbps") if report is not None else None
        if report is not None:
            run["report"] = report
        if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
            run["gbps"] = float(rate)
        else:
            run["gbps"] = parse_rate(proc.stdout) or parse_rate(output)
        if run["gbps"] is None:
            run["error"] = "no throughput (GB/s, MB/s, ...) in the output"
        return run
    return run


def bench_c(orders: Sequence[int], nbytes: int | None, target: float,
            repeats: int) -> dict[str, Any]:
    """Run tests/c/ring_stress.c per ring order, or explain why not.

    With ``nbytes`` None each order is calibrated with a 64 MiB run and then
    run ``repeats`` times for about ``target`` seconds each (best kept).
    """
    result: dict[str, Any] = {"source": str(STRESS_SOURCE), "bytes": nbytes,
                              "target_seconds": target, "repeats": repeats, "runs": []}

    def skip(reason: str) -> dict[str, Any]:
        print(f"\n--c skipped: {reason}", file=sys.stderr)
        result["skipped"] = reason
        return result

    if not STRESS_SOURCE.exists():
        return skip(f"{STRESS_SOURCE.relative_to(ROOT)} does not exist (yet)")
    cc = _c_compiler()
    if cc is None:
        return skip("no C compiler (cc, gcc, clang or $CC) found")
    with tempfile.TemporaryDirectory(prefix="vchan-bench-") as tmp:
        try:
            exe, log = _compile_stress(cc, Path(tmp))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return skip(f"compiling failed: {exc}")
        if exe is None:
            return skip("compiling failed:\n" + log[-2000:])
        result["compiler"] = cc
        usage = _usage(exe)
        source = STRESS_SOURCE.read_text(encoding="utf-8", errors="replace")
        result["usage"] = usage
        if "--bytes" not in usage + source:
            return skip("ring_stress has no --bytes option; its usage:\n" + usage)
        order_opts = sorted(set(re.findall(r"--[A-Za-z-]*order[A-Za-z-]*", usage)))
        if not order_opts:
            order_opts = sorted(set(re.findall(r"--[A-Za-z-]*order[A-Za-z-]*", source)))
        if "--order" in order_opts:
            order_opts = ["--order"]
        if not order_opts:
            return skip("ring_stress has no order option; its usage:\n" + usage)
        result["order_options"] = order_opts
        # Benchmark switches, used only where the usage advertises them:
        # write/read only, no data check, no random sched_yield()s, JSON out.
        bench_args: list[str] = []
        if "--mode" in usage and "stream" in usage:
            bench_args += ["--mode", "stream"]
        if "--no-verify" in usage:
            bench_args.append("--no-verify")
        if "--yield" in usage:
            bench_args += ["--yield", "0"]
        if "--json" in usage:
            bench_args.append("--json")
        result["benchmark_options"] = bench_args
        for order in orders:
            size = nbytes
            if size is None:
                probe = _run_stress(exe, order, C_PROBE_BYTES, order_opts, bench_args)
                rate = probe.get("gbps")
                if not isinstance(rate, float):
                    result["runs"].append(probe)
                    continue
                size = int(min(C_MAX_BYTES, max(C_PROBE_BYTES, rate * 1e9 * target)))
            best: dict[str, Any] | None = None
            samples: list[float] = []
            for _ in range(repeats):
                run = _run_stress(exe, order, size, order_opts, bench_args)
                rate = run.get("gbps")
                if not isinstance(rate, float):
                    best = run
                    break
                samples.append(rate)
                if best is None or rate > best["gbps"]:
                    best = run
            if best is not None:
                best["samples_gbps"] = samples
                result["runs"].append(best)
            print(f"  C order {order:2}: {best.get('gbps') if best else None} GB/s",
                  file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n} B"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    value = int(m.group(1)) << {"": 0, "k": 10, "m": 20}[m.group(2).lower()]
    if not 1 <= value <= 1 << MAX_ORDER:
        raise argparse.ArgumentTypeError(
            f"chunk sizes must be 1 B .. {human_size(1 << MAX_ORDER)}, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_c_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _fmt_rate(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _fmt_ops(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    rows: list[dict[str, Any]] = results["rows"]
    lines = [
        "## vchan ring throughput (in-process, one thread)",
        "",
        f"- CPU: {m['cpu']}" + (f" (cache {m['cache']})" if m["cache"] else ""),
        f"- cores: {m['cores']} ({m['usable_cores']} usable), "
        f"kernel: {m['kernel']} {m['machine']}",
        f"- Python: {m['python']}, cffi {m['cffi']}",
        f"- load average at start: {m['loadavg_at_start']}",
        f"- best of {s['repeats']} repeats of ~{s['target_seconds']} s each"
        + (" (--quick)" if s["quick"] else ""),
    ]
    orders = sorted({r["ring_order"] for r in rows})
    lines.append("- ring: client write ring of order "
                 + ", ".join(f"{o} ({human_size(1 << o)})" for o in orders)
                 + f" (--order {s['order']}, raised where a chunk did not fit)")
    lines += [
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "|".join(["---:"] * len(COLUMNS)) + "|",
    ]
    for r in rows:
        cells = [
            human_size(r["chunk"]),
            _fmt_rate(r["ring_gbps"]),
            _fmt_rate(r["memmove_gbps"]),
            _fmt_rate(r["memmove_x2_gbps"]),
            f"{r['ring_vs_memmove_x2']:.2f}",
            _fmt_ops(r["ring_ops_per_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    c = results["memcpy_ceiling"]
    lines += [
        "",
        f"Ceiling: single memmove of {human_size(c['block_bytes'])} blocks: "
        f"**{c['gbps']:.2f} GB/s** (bytes copied once; a two-copy path cannot beat "
        f"{c['gbps'] / 2:.2f} GB/s of payload once it spills out of cache).",
        "",
        "GB/s = 1e9 payload bytes per second.  ring: client.write(bytes) + "
        "server.read_into(bytearray) per op, i.e. TWO copies of each byte (in and out).  "
        "memmove: one ctypes.memmove per chunk.  memmove x2: two ctypes.memmove per chunk "
        "through a ring-sized staging buffer, the same copies and footprint as the ring.",
    ]
    if rows:
        small = rows[0]
        lines.append(
            f"Per op at {human_size(small['chunk'])}: ring {small['ring_ns_per_op']:.0f} ns, "
            f"memmove x2 {small['memmove_x2_ns_per_op']:.0f} ns, "
            f"memmove {small['memmove_ns_per_op']:.0f} ns.")
    cres = results.get("c_stress")
    if cres is not None:
        lines += ["", "### two-thread C (tests/c/ring_stress.c, -O2)", ""]
        if "skipped" in cres:
            first = str(cres["skipped"]).splitlines()[0]
            lines.append(f"skipped: {first}")
        else:
            lines += ["| ring order | ring size | C GB/s | bytes/run | writer/reader sleeps |",
                      "|---:|---:|---:|---:|---:|"]
            for run in cres["runs"]:
                rate = run.get("gbps")
                shown = _fmt_rate(rate) if isinstance(rate, float) else f"({run.get('error')})"
                report = run.get("report") or {}
                sleeps = (f"{report['writer_sleeps']}/{report['reader_sleeps']}"
                          if "writer_sleeps" in report and "reader_sleeps" in report else "-")
                lines.append(f"| {run['order']} | {human_size(1 << run['order'])} | {shown} "
                             f"| {human_size(run['bytes'])} | {sleeps} |")
            each = (f"~{cres['target_seconds']} s" if cres["bytes"] is None
                    else human_size(cres["bytes"]))
            lines += ["", "options: `" + " ".join(cres.get("benchmark_options", [])) + "`, "
                      f"best of {cres['repeats']} runs of {each} each; two threads, "
                      "sleeping on an emulated event channel when the ring is empty/full"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="vchan ring throughput next to memcpy (see the module docstring).")
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                        help="comma-separated chunk sizes, e.g. 64,4K,1M "
                             "(default: 64 B .. 1 MiB in steps of 4)")
    parser.add_argument("--order", type=int, default=DEFAULT_ORDER,
                        help=f"client write ring order {MIN_ORDER}..{MAX_ORDER} "
                             f"(default {DEFAULT_ORDER} = 1 MiB); raised for larger chunks")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter repeats (about 10 s in all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per measurement (default 5, 2 with --quick)")
    parser.add_argument("--target", type=float, default=None,
                        help="seconds per repeat (default 0.3, 0.1 with --quick)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write all results as JSON to PATH")
    parser.add_argument("--c", action="store_true",
                        help="also compile and run tests/c/ring_stress.c (two threads) "
                             "per ring order, if it exists")
    parser.add_argument("--c-bytes", type=parse_c_bytes, default=None,
                        help="bytes per ring_stress run (default: calibrated to --target)")
    args = parser.parse_args(argv)

    if not MIN_ORDER <= args.order <= MAX_ORDER:
        parser.error(f"--order must be in {MIN_ORDER}..{MAX_ORDER}")
    repeats: int = args.repeats or (2 if args.quick else 5)
    target: float = args.target or (0.1 if args.quick else 0.3)
    if repeats < 1 or target <= 0:
        parser.error("--repeats and --target must be positive")

    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "sizes": args.sizes,
            "order": args.order,
            "quick": args.quick,
            "repeats": repeats,
            "target_seconds": target,
            "units": "GB/s = 1e9 payload bytes/s; ring and memmove_x2 copy each byte twice",
        },
        "rows": [],
    }
    for size in args.sizes:
        row = bench_size(size, args.order, target, repeats)
        results["rows"].append(asdict(row))
        print(f"  {human_size(size):>8}: ring {row.ring_gbps:7.3f} GB/s, "
              f"memmove x2 {row.memmove_x2_gbps:7.3f} GB/s", file=sys.stderr, flush=True)
    results["memcpy_ceiling"] = bench_ceiling(target, repeats)
    if args.c:
        results["c_stress"] = bench_c(C_ORDERS, args.c_bytes, target,
                                      1 if args.quick else min(repeats, 3))

    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
