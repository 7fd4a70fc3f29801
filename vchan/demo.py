"""The quick-start demonstration: a libxenvchan ring between two processes.

A parent and a forked child share one anonymous mapping laid out exactly as a
libxenvchan control page plus its rings; each side wakes the other only when
the ring protocol asks for it, through an eventfd standing in for a Xen
event channel.  The child streams pseudo-random data, the parent checks its
SHA-256 and reports the rate.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import select
import time
from dataclasses import dataclass

from .ring import PAGE_SIZE, Ring, ring_offset

__all__ = ["DemoResult", "run_ring_demo"]


@dataclass
class DemoResult:
    """What :func:`run_ring_demo` measured."""

    nbytes: int
    seconds: float
    digest_sent: str
    digest_received: str
    ring_size: int
    events: int

    @property
    def ok(self) -> bool:
        return self.digest_sent == self.digest_received

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds else 0.0


def _wait(efd: int) -> None:
    # Block until the peer's next event; eventfd counts coalesce as Xen's do.
    select.select([efd], [], [])
    os.eventfd_read(efd)


def _child_send(ring: Ring, own_efd: int, peer_efd: int, nbytes: int, chunk: int,
                result_w: int) -> None:
    digest = hashlib.sha256()
    block = os.urandom(chunk)
    sent = 0
    view = memoryview(block)
    while sent < nbytes:
        piece = view[: min(chunk, nbytes - sent)]
        done = 0
        while done < len(piece):
            n = ring.write(piece[done:])
            if ring.take_notify():
                os.eventfd_write(peer_efd, 1)
            if n == 0:
                _wait(own_efd)
            done += n
        digest.update(piece)
        sent += len(piece)
    ring.close()
    os.eventfd_write(peer_efd, 1)
    os.write(result_w, digest.hexdigest().encode())


def run_ring_demo(nbytes: int = 256 << 20, order: int = 18, chunk: int = 64 << 10) -> DemoResult:
    """Stream ``nbytes`` from a child process to this one through a ring.

    ``order`` is the log2 size of the child-to-parent ring (10..20).
    """
    size = 1 << order
    separate = ring_offset(order) is None
    mem = mmap.mmap(-1, PAGE_SIZE + (size if separate else 0))
    page = memoryview(mem)[:PAGE_SIZE]
    left = memoryview(mem)[PAGE_SIZE:] if separate else None
    write_order = 11 if order != 11 else 10
    server = Ring.server(page, order, write_order, left, None)
    to_parent, to_child = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    result_r, result_w = os.pipe()

    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:        # the client: a separate process, as a domain would be
        status = 1
        try:
            client = Ring.client(page, None, left)
            if client.take_notify():
                os.eventfd_write(to_parent, 1)
            _child_send(client, to_child, to_parent, nbytes, chunk, result_w)
            status = 0
        finally:
            os._exit(status)

    os.close(result_w)
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    received = events = 0
    while True:
        n = server.read_into(buf)
        if server.take_notify():
            os.eventfd_write(to_child, 1)
        if n:
            digest.update(view[:n])
            received += n
            continue
        if server.peer_live() == 0:
            # The peer closed: drain once more, it may have written just before.
            if server.data_ready() == 0:
                break
            continue
        _wait(to_parent)
        events += 1
    seconds = time.perf_counter() - start
    sent_digest = os.read(result_r, 128).decode()
    os.close(result_r)
    _, status = os.waitpid(pid, 0)
    for fd in (to_parent, to_child):
        os.close(fd)
    if status != 0:
        raise RuntimeError(f"demo child failed with status {status}")
    return DemoResult(received, seconds, sent_digest, digest.hexdigest(), size, events)
