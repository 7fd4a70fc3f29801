"""What a process holds, for the leak tests: exact counts, not the RSS alone.

The RSS of a test process that has run hundreds of tests before moves by tens
of MiB for reasons of the allocator's own (arenas split, trimmed or not): the
same 10,000 connect/close cycles grew it by 1.5 MiB alone and by 29 MiB late
in a full run.  A leak is something that grows with every cycle, and two
counts see it exactly:

* ``blocks``: ``sys.getallocatedblocks()``, the memory blocks the interpreter
  holds (every Python object lives in one or more): a leaked object per
  cycle is 10,000 blocks per 10,000 cycles;
* ``heap``: the bytes malloc() has handed out and not had back (glibc's
  ``mallinfo2``: ``uordblks`` + ``hblkhd``), which counts what C holds too
  (cffi's ``ffi.new``, the ring's and the devices' allocations): 100 bytes
  leaked per cycle is 1 MB per 10,000.

``rss`` stays, with a loose bound, for what neither sees (mappings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError, TypeError):      # not glibc, or glibc < 2.33
        return None
    fn.restype = _Mallinfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


@dataclass(frozen=True)
class Memory:
    """One look at the process (after a full garbage collection)."""

    blocks: int
    heap: int | None        # None where mallinfo2 is not there
    rss: int

    @classmethod
    def now(cls) -> Memory:
        gc.collect()
        heap = None
        if _MALLINFO2 is not None:
            info = _MALLINFO2()
            heap = info.uordblks + info.hblkhd
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return cls(sys.getallocatedblocks(), heap, rss)

    def growth(self, before: Memory) -> str:
        heap = ("?" if self.heap is None or before.heap is None
                else f"{(self.heap - before.heap) / 1e6:+.2f} MB")
        return (f"blocks {self.blocks - before.blocks:+,}, heap {heap}, "
                f"RSS {(self.rss - before.rss) / 1e6:+.1f} MB")


def assert_nothing_grows(before: Memory, after: Memory, cycles: int) -> str:
    """Fail if something grew with every one of ``cycles``: a Python object
    (one block per 10 cycles is the bound), 100 bytes of the C heap, or the
    RSS beyond 64 MiB.  Returns what grew, for the test's output."""
    said = after.growth(before)
    assert after.blocks - before.blocks < cycles // 10, f"Python objects leaked: {said}"
    if after.heap is not None and before.heap is not None:
        assert after.heap - before.heap < cycles * 100, f"the C heap grew: {said}"
    assert after.rss - before.rss < 64 << 20, f"RSS grew: {said}"
    return said
