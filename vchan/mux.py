"""Sessions: many connections over one libxenvchan ring pair.

THEORY OF OPERATION
===================

Why.  A libxenvchan ring costs grants (a 1 MiB ring each way is 513 pages; a
domain has 1,024 by default, shared by all its programs) and a XenStore
rendezvous (several round trips to xenstored, which allows a domain 10
transactions and 128 watches).  One ring per connection caps a domain at a
handful of connections and at a few hundred set-ups a second.  So the
listener protocol meets through XenStore once per pair of programs and then
carries every connection ("stream") as frames over that one ring pair: a new
connection costs one frame, not a rendezvous, and ring memory is spent per
session, not per connection.

Frames (vchan/mux.h: 16-byte header, type, stream id, payload length, arg):

    HELLO   stream 0, arg = version, payload = u32 window, u32 max streams:
            the first frame each side writes.  ``window`` is how many bytes
            of each stream this side buffers for its reader (the peer's
            initial send credit per stream); ``max streams`` how many
            streams the peer may have open at once.  The server writes its
            HELLO before it publishes the ring, so a client finds it the
            moment it connects.
    OPEN    a new stream; payload = the port name.  Only clients open.
            Stream ids are chosen by the client: 1, 2, 3, ... strictly
            increasing, never reused.  A client may send DATA right after
            OPEN: the server promised capacity in its HELLO (as a TCP
            listener's backlog accepts before ``accept()``).
    DATA    payload bytes of a stream.  Never more than the sender's credit.
    WINDOW  arg = credit returned to the peer for a stream (bytes its reader
            took); the receiver returns credit as its protocol consumes.
    EOF     the sender will send no more on this stream (``write_eof``).
    CLOSE   the sender closed the stream: it neither sends nor reads any
            more.  The receiver delivers what it has, then EOF, then closes.
            Each side forgets a stream when it sends or receives CLOSE;
            frames for a forgotten stream are dropped.
    RESET   the stream failed; flags bit 0: refused (the server turned the
            OPEN down: stopped serving, or its stream limit), payload = why.
    GOAWAY  stream 0: the server stops accepting streams on this session
            (its Server was closed); streams already open go on.
    BLOCKED the sender has data for the stream and no credit left.

Wake-ups.  WINDOW frames are written *quietly* (published without waking the
peer, vchan_ring_commit_quiet) unless the peer said BLOCKED: a sender with
credit left finds them when it next looks, and a bulk transfer is spared a
wake-up of the sender per update.  A BLOCKED frame wakes its receiver, which
answers with a wake-up at once (a quiet WINDOW may be sitting unseen in the
sender's ring) and makes its next WINDOW for that stream loud.  An OPEN is
*deferred*: a client nearly always writes right after connecting, and that
write wakes the server for both; if it does not, the wake-up goes from the
loop's next iteration (a server that speaks first is not kept waiting).

Each side's frames go in its own write ring, written whole (header and
payload in one commit), so the ring's own rules (indexes validated, notify
bits, live bytes) do the rest.  What a frame carries is validated too: an
unknown type, a frame longer than the ring or the limit, DATA beyond the
credit or an OPEN whose id does not increase is the peer breaking the
protocol (an OPEN beyond the stream limit is only refused, as the counts of
the two sides may briefly differ): every stream of the session fails with
:class:`vchan.RemoteProtocolError`.  A peer that crashes (live byte cleared
by the kernel) resets every stream; one that closes the session gracefully
gives each stream EOF, after the data it sent.

Bulk.  A frame is taken out of the ring whole, so a frame as large as the
ring would make the writer wait for the reader's whole copy and the reader
for the writer's: DATA frames are at most a quarter of the ring (and
``DATA_FRAME``, 64 KiB), and each
side wakes the other as soon as it is worth it (the writer after the frame
a waiting reader wants, the reader once a quarter of the ring is free), so
that both copy at once.  Frames of one stream that lie in the ring together
are read in one C call: small ones (under ``GATHER`` bytes) into one
``data_received()``, any into a ``BufferedProtocol``'s buffer.  Writes wait
in a :class:`vchan._flow.WriteQueue`, which keeps a large ``bytes`` object
as it is instead of copying it.

Small writes.  A write goes into the ring at once when the ring is empty
(the peer has taken everything) or the peer sleeps until our next write:
nobody is kept waiting.  A write smaller than ``CORK_MAX`` that comes while
the peer has yet to read what is there, or within ``CORK_GAP`` of the last
small write that went at once (a burst), waits, merged with the ones after
it, until the end of the loop iteration or until ``CORK_FLUSH`` bytes are
waiting; then they go as one frame, with at most one wake-up (as TCP's and
SMC's autocorking do).  A ping-pong never waits; a stream of small writes
costs a frame and a wake-up per batch, not per write.

Polling.  A wake-up through the event channel is expensive where CPUs are
virtual: on the VM this was measured on, the notifying write took ~50 us of
the writer's CPU and the sleeper woke 20-40 us later, for each side of a
round trip.  So a session may keep looking at its ring from the event loop
(one look per loop iteration, yielding the CPU in between) for a short
window, with its "tell me on write" request withdrawn: the peer's writes
then cost it no notification and us no wake-up.  When the window ends it
asks again, looks once more and sleeps on the event channel as usual.

* By default (``busy_poll=None``) a window opens when a stream's write goes
  into the ring at once, the moment an answer may be on its way, and ends
  when an answer comes (DATA, or for a server an OPEN: a new connection is a
  request too; credit updates do not count): the next write opens the next.
  The window starts at ``ADAPTIVE_POLL`` (50 us, about what a wake-up costs
  there: the spin-then-block rule studied by Karlin et al., SOSP 1991) and
  adapts as a guest's halt-polling does: an answer that comes after a window
  ran out, but within ``ADAPTIVE_POLL_MAX`` (200 us) of the write, doubles
  it; one that comes later halves it.  Each window that runs out doubles
  how many of the next writes open none (1, 2, 4, ... up to
  ``POLL_BACKOFF_MAX``) and each answer found (or that came within a
  window's reach) halves it.  A window goes on when its stream closes (a
  server's next OPEN may be on its way).  A request/response exchange, or a
  run of connections each set up and answered, whose answers come within
  the window keeps both sides polling and costs no wake-ups; requests a
  millisecond apart back the answering side off to one window in 64 writes;
  a stream that only reads never polls.
* ``busy_poll=`` seconds (as ``SO_BUSY_POLL`` for sockets) is a fixed
  window, opened after every read and write whatever it finds: for
  latency-sensitive programs with a core to spare.
* ``busy_poll=0`` never polls.

A session polls when any of its open streams asks for it (the longest
fixed window wins over the default).

Where the default costs: a peer that sleeps between requests must be woken
whatever we do, and Linux mostly wakes it on the waker's CPU (two
processes of one machine), where our polling only takes turns with it;
requests a millisecond apart measured up to ~30 us slower than with
``busy_poll=0`` there, and 10-53 us faster (for 50-75 us more CPU) with the
two processes pinned to CPUs of their own, as two domains' vCPUs are
(``benchmarks/sparse_requests.py``, docs/streams.md).

Fairness.  Streams with data and credit take turns of up to ``QUANTUM``
bytes, after control frames; the reader takes at most ``READ_BUDGET`` bytes
per look before letting the loop run other callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from ._native import ffi, lib
from .endpoint import Endpoint
from .errors import RemoteProtocolError
from .mux_frames import (
    _FULL,
    _HELLO_BODY,
    _MAX_CREDIT,
    _NAMES,
    _REMOTE_CODES,
    ADAPTIVE_POLL,
    ADAPTIVE_POLL_MAX,
    BLOCKED,
    CLOSE,
    DATA,
    DATA_FRAME,
    DEFAULT_WINDOW,
    DEFERRED,
    EOF,
    GATHER,
    GATHER_MAX,
    GOAWAY,
    HEADER,
    HELLO,
    LOUD,
    MAX_CONTROL,
    MAX_FRAME,
    MAX_STREAMS,
    MIN_CHUNK,
    OPEN,
    POLL_BACKOFF_MAX,
    QUANTUM,
    READ_BUDGET,
    RESET,
    RESET_REFUSED,
    VERSION,
    WINDOW,
    _clock,
    _protocol_error,
    _ring_error,
    _unpack,
)
from .mux_stream import StreamTransport
from .ring import NOTIFY_CLOSED, NOTIFY_HELLO

__all__ = ["Session", "check_busy_poll"]

log = logging.getLogger("vchan")

MAX_BUSY_POLL = 1.0              # seconds: busy polling is for microseconds, not a way of life


def check_busy_poll(value: Any) -> float | None:
    """A ``busy_poll=`` argument as seconds (0: never poll); None (the
    default) stays None: poll adaptively (see the module's docstring)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not 0 <= value <= MAX_BUSY_POLL:
        raise ValueError(f"busy_poll must be seconds from 0 to {MAX_BUSY_POLL:g} "
                         f"(e.g. 50e-6), got {value!r}")
    return float(value)


class Session:
    """One ring pair carrying many streams (either role).

    ``accept(session, stream_id, port)`` (servers) returns the new stream's
    transport, or a string saying why the stream is refused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint, hub: Any, *,
                 is_server: bool, own: int, peer: int,
                 accept: Callable[[Session, int, str], StreamTransport | str] | None = None,
                 window: int = DEFAULT_WINDOW, max_streams: int | None = None,
                 on_idle: Callable[[Session], None] | None = None,
                 on_close: Callable[[Session], None] | None = None) -> None:
        self._loop = loop
        self._endpoint = endpoint
        self._evtchn, self._port = endpoint.evtchn, endpoint.port     # (notify, inline)
        self._dev = endpoint.evtchn._dev    # (what vchan_session_send notifies through)
        self._wakes = ffi.new("uint64_t *")     # wake-ups sent to the peer
        self._hub = hub
        self.is_server = is_server
        self.own = own
        self.peer = peer
        self._accept = accept
        self._on_idle = on_idle
        self._on_close = on_close
        self.window = window
        self.max_streams = MAX_STREAMS if max_streams is None else max_streams
        self.peer_window = 0
        self.peer_max_streams = 0
        self._hello_seen = False
        ring = endpoint.ring
        self._r = ring._r
        self._notify = ring._notify
        self._max_in = min(MAX_FRAME, ring.read_size - HEADER)
        # A frame is read whole (its space is given back once it is read):
        # frames of at most a quarter of the ring let the reader copy one out
        # while the writer fills the next; and of at most DATA_FRAME bytes,
        # the pieces a reader's bytes objects are made of (see DATA_FRAME).
        self._max_out = min(MAX_FRAME, ring.write_size - HEADER,
                            max(min(ring.write_size // 4, DATA_FRAME), MIN_CHUNK))
        # In-page rings (1 or 2 KiB, when grants run short) must still take
        # a whole frame of each kind.
        self._min_chunk = min(MIN_CHUNK, self._max_out)
        self._max_control = min(MAX_CONTROL, self._max_out)
        # The same, as one address for vchan._reader.writev (writelines()).
        out = self._out = ffi.new("struct vchan_session_out *")
        out.ring, out.notify, out.dev, out.port, out.woken = self._r, self._notify, \
            self._dev, self._port, self._wakes
        out.min_payload, out.max_payload = self._min_chunk, self._max_out
        self._out_address = int(ffi.cast("uintptr_t", out))
        self.streams: dict[int, StreamTransport] = {}
        self._next_id = 1               # client: the next stream id it opens
        self._last_opened = 0           # server: the highest id opened so far
        self._ctl: deque[tuple[int, int, int, int, bytes, int]] = deque()
        self._force_notify = False      # wake the peer even if it did not ask
        self._ready: deque[StreamTransport] = deque()
        self.draining = False           # no new streams (GOAWAY sent or received)
        self.closed = False
        self._error: BaseException | None = None
        self._read_scheduled = False
        self._wake_pending = False      # a deferred wake-up is on its way (_wake_soon)
        self._corked = False            # small writes wait for the end of this iteration
        self._last_direct = 0.0         # _clock() of the last small write sent at once
        self._pollers: dict[StreamTransport, float] = {}  # open streams' busy_poll=
        self._adaptive = 0              # open streams polling adaptively (the default)
        self._never: set[StreamTransport] = set()      # open streams with busy_poll=0
        self._polls = False             # some open stream polls (adaptive or fixed)
        self._polling = False
        self._poll_until = 0.0
        self._window = ADAPTIVE_POLL    # adaptive: how long the next window lasts
        self._poll_hit = False          # adaptive: the window found what it waited for
        self._asked = 0.0               # adaptive: _clock() of a write still unanswered
        self._backoff = 0               # adaptive: writes to open no window after a miss
        self._skip = 0                  # adaptive: writes left that open no window
        self._answers = 0               # DATA frames (and runs of them) and OPENs read
        self._waited = False            # the reader let the loop run once for a paused stream
        # Frames at the head of the ring announced to a stream's vchan
        # StreamReader, which takes them from the ring itself (see _announce).
        self._flushing = False          # in _flush (which does not run again from within)
        self._lazy: StreamTransport | None = None
        self._lazy_fresh = False        # announced in this loop iteration
        # The run as C sees it (vchan_direct_take): its payload bytes not
        # yet taken (left), how far into the head frame the reader is
        # (offset), ring bytes freed since the writer was last woken.
        d = self._direct = ffi.new("struct vchan_direct *")
        d.ring, d.notify, d.max_payload = self._r, self._notify, self._max_in
        d.wake_after = max(ring.read_size // 4, 1)
        self._frame = ffi.new("struct vchan_mux_frame *")
        self._pa = ffi.new("const uint8_t **")
        self._pb = ffi.new("const uint8_t **")
        self._alen = ffi.new("uint32_t *")
        self._blen = ffi.new("uint32_t *")
        self._scratch = ffi.new("char[]", GATHER_MAX)
        self._wake_after = max(ring.read_size // 4, 1)
        hub.register(endpoint.port, self._on_event, consumes=True)
        hub.watch_peer(peer, self)
        self._send_control(HELLO, 0, 0, VERSION, _HELLO_BODY.pack(window, self.max_streams))
        if is_server:
            # Written before the ring is published: nobody to wake yet.
            self._flush_control()
            self._notify[0] = 0

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        state = "closed" if self.closed else ("draining" if self.draining else "open")
        return (f"<vchan.Session {role} peer={self.peer} {state} streams={len(self.streams)} "
                f"rings={self._endpoint.ring.read_size}/{self._endpoint.ring.write_size}>")

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "closed", True):
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            # Unreachable, so its event hub is too (the hub holds every
            # registered session): only the ring is ours to let go of.
            self.closed = True
            with contextlib.suppress(Exception):
                self._endpoint.close()

    # -- the client's side -------------------------------------------------------

    def start_client(self) -> None:
        """Read the server's HELLO, which is in the ring before we connect."""
        self._on_event()
        if self._error is not None:
            raise self._error
        if not self._hello_seen:
            self._fail(_protocol_error("no HELLO from the server"))
            assert self._error is not None
            raise self._error

    def can_open(self) -> bool:
        return not self.closed and not self.draining

    def open_stream(self, port: str, protocol: asyncio.BaseProtocol, *,
                    extra: dict[str, Any], busy_poll: float | None = None,
                    ) -> StreamTransport:
        """Open a stream to ``port`` (client side); usable at once.  The
        caller calls the transport's ``make_now()`` (``connection_made``)."""
        if not self.can_open():
            raise ConnectionRefusedError("the vchan session no longer accepts connections")
        if len(self.streams) >= self.peer_max_streams:
            raise ConnectionRefusedError(
                f"vchan server domain {self.peer} port {port}: its limit of "
                f"{self.peer_max_streams} connections per session is reached")
        sid = self._next_id
        self._next_id += 1
        transport = StreamTransport(self, sid, protocol, extra=extra, busy_poll=busy_poll)
        # The OPEN wakes the server together with the stream's first write,
        # which usually follows at once (one wake-up, not two); without one,
        # from the loop's next iteration.
        self._send_control(OPEN, 0, sid, 0, port.encode(), DEFERRED)
        self._kick()
        return transport

    # -- the server's side --------------------------------------------------------

    def goaway(self) -> None:
        """Accept no more streams; close once the open ones are done."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._send_control(GOAWAY, 0, 0, 0, b"")
        self._kick()
        if not self.streams:
            self.close()

    # -- sending ------------------------------------------------------------------

    def _send_control(self, kind: int, flags: int, sid: int, arg: int, payload: bytes,
                      quiet: int = LOUD) -> None:
        """Queue a control frame: LOUD wakes the peer if it waits, QUIET never
        (it looks anyway), DEFERRED from the loop's next iteration unless another
        frame woke it first (see open_stream)."""
        self._ctl.append((kind, flags, sid, arg, payload[:self._max_control], quiet))

    def _wake_soon(self) -> None:
        """Wake the peer (if it asked) from the loop's next iteration: after
        the code that runs now (which opened a stream, and gets it at once)
        has had its chance to write."""
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_pending = False
        if self.closed:
            return
        rc = lib.vchan_ring_publish(self._r, self._notify)
        if rc < 0:
            if rc in _REMOTE_CODES:
                self._fail(_ring_error(rc, "write"))
            return
        self._flush_notify()

    def _kick(self) -> None:
        """Write what is queued now; the peer is woken if it asked."""
        if self.closed:
            return
        try:
            self._flush()
            self._flush_notify()
        except RemoteProtocolError as exc:
            self._fail(exc)

    def _idle(self) -> bool:
        return not self._ctl and not self._ready

    def _cork(self) -> None:
        """Write what waits at the end of this loop iteration."""
        if not self._corked:
            self._corked = True
            self._loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        self._corked = False
        self._kick()

    # -- busy polling (see the module's docstring) ------------------------------------

    def _add_poller(self, stream: StreamTransport, seconds: float | None) -> None:
        """``stream`` opened with ``busy_poll=seconds`` (None: adaptive; 0: never)."""
        if seconds is None:
            self._adaptive += 1
        elif seconds > 0:
            self._pollers[stream] = seconds
        else:
            self._never.add(stream)
        self._polls = bool(self._pollers) or self._adaptive > 0

    def _remove_poller(self, stream: StreamTransport) -> None:
        if self._pollers.pop(stream, None) is None:
            if stream in self._never:
                self._never.discard(stream)
            else:
                self._adaptive -= 1
        self._polls = bool(self._pollers) or self._adaptive > 0

    def _poll_start(self) -> None:
        """A stream's write went into the ring (fixed windows: or anything
        came in): look at the ring every loop iteration for a while."""
        if self.closed:
            return      # (the write's wake-up failed and ended us: the ring is gone)
        if self._pollers:
            self._poll_until = _clock() + max(self._pollers.values())
        else:
            now = self._asked = _clock()    # an answer's wait is timed from here
            if self._skip:
                self._skip -= 1             # windows did not pay lately: not this time
                return
            self._poll_hit = False
            self._poll_until = now + self._window
        lib.vchan_ring_disarm(self._r)
        if not self._polling:
            self._polling = True
            self._loop.call_soon(self._poll)

    def _answered(self, asked: float) -> None:
        """(adaptive) DATA or an OPEN came, the first since the write at
        ``asked`` (``_clock()``): end the window that found it, or, if we
        slept, learn from how long it took."""
        wait = _clock() - asked
        fresh = self._asked == asked        # (no write has asked again meanwhile)
        if fresh:
            self._asked = 0.0
        if self._polling:
            self._backoff //= 2             # it paid: poll more often
            if fresh:
                # Found: this window is done; the next write opens the next.
                self._poll_hit = True
                self._poll_until = 0.0
        elif wait <= ADAPTIVE_POLL_MAX:
            # A window (this long, or up to the longest) would have caught it.
            if wait > self._window:
                self._window = min(2 * self._window, ADAPTIVE_POLL_MAX)
            self._backoff //= 2
            self._skip = min(self._skip, self._backoff)
        else:
            # Too long to spin for: shorter windows.
            self._window = max(self._window / 2, ADAPTIVE_POLL)

    def _poll(self) -> None:
        if self.closed:
            self._polling = False
            return
        ready = lib.vchan_ring_peek_min(self._r, 0, self._pa, self._alen, self._pb, self._blen)
        if ready != 0:
            # (this moves the window on only when it takes bytes: half a frame
            # a peer never completes does not keep us spinning)
            self._on_event()
            if self.closed:
                self._polling = False
                return
        # (a window goes on without streams: a server's next OPEN may come)
        if (self._polls or not self.streams) and _clock() < self._poll_until:
            if ready == 0:
                # Let the peer run if it shares our CPU (else each side spins
                # out its whole window while the other cannot write).
                os.sched_yield()
            lib.vchan_ring_disarm(self._r)
            self._loop.call_soon(self._poll)
            return
        # Time is up (or the answer came): ask to be woken, look once more, sleep.
        self._polling = False
        if not self._pollers and not self._poll_hit:
            # Run out: the next 1, 2, 4, ... POLL_BACKOFF_MAX writes open
            # no window (an answer found, or one that came soon after, halves it).
            self._backoff = min(max(1, 2 * self._backoff), POLL_BACKOFF_MAX)
            self._skip = self._backoff
        self._on_event()

    def _send_data(self, sid: int, view: Any, n: int) -> int:
        """Write up to ``n`` bytes at ``view`` as DATA frames of stream ``sid``;
        the bytes written (fewer once the ring is full).  One C call: it
        wakes a waiting reader after the frame it wants, so that it copies
        out while the rest is written."""
        notify = self._notify
        k: int = lib.vchan_session_send(self._r, sid, view, n, self._min_chunk, self._max_out,
                                        notify, self._dev, self._port, self._wakes, 0)
        if k < 0:
            raise _ring_error(k, "write")
        if notify[0] or self._force_notify:
            self._flush_notify()    # (or a wake-up that failed there: to report why)
        return k

    def _want_send(self, stream: StreamTransport) -> None:
        if not stream._queued:
            stream._queued = True
            self._ready.append(stream)

    def _flush_control(self) -> bool:
        r, notify, ctl = self._r, self._notify, self._ctl
        while ctl:
            kind, flags, sid, arg, payload, quiet = ctl[0]
            k = lib.vchan_mux_write_ex(r, kind, flags, sid, arg, payload, len(payload),
                                       len(payload), self._max_control, quiet != LOUD,
                                       notify)
            if k < 0:
                if k == _FULL:
                    return False
                raise _ring_error(k, "write")
            ctl.popleft()
            if quiet == DEFERRED:
                self._wake_soon()
        return True

    def _flush(self) -> None:
        # Not again from within: a stream's _sent() may send its EOF or
        # CLOSE, or its protocol write, and kick the session; this loop
        # writes what they queue (thousands of streams at once nested one
        # call deep each: a RecursionError, with 7,754 streams).
        if self._flushing:
            return
        self._flushing = True
        try:
            self._flush_all()
        finally:
            self._flushing = False

    def _flush_all(self) -> None:
        if self.closed or not self._flush_control():
            return
        ready = self._ready
        while ready:
            stream = ready[0]
            queue = stream._buffer
            # A turn is up to QUANTUM bytes (several frames per call), then
            # the next stream's.
            budget = min(len(queue), stream._credit, QUANTUM)
            if budget <= 0 or stream._closed:
                ready.popleft()
                stream._queued = False
                continue
            sent = 0
            full = False
            while sent < budget:
                head = queue.head()
                m = min(len(head), budget - sent)
                k = self._send_data(stream.stream_id, ffi.from_buffer(head), m)
                if self.closed:
                    return
                queue.advance(k)
                sent += k
                if k < m:
                    full = True
                    break
            stream._credit -= sent
            if full and not sent:
                return
            ready.popleft()
            if queue and stream._credit > 0:
                ready.append(stream)        # its turn again after the others
            else:
                stream._queued = False
                if queue:
                    stream._out_of_credit()
            stream._sent()
            if full or self.closed or (self._ctl and not self._flush_control()):
                return

    def _flush_notify(self) -> None:
        if self._notify[0] or self._force_notify:
            self._notify[0] = 0
            self._direct.freed = 0
            self._force_notify = False
            try:
                self._evtchn.notify(self._port)
            except OSError as exc:
                self._fail(exc)
            else:
                self._wakes[0] += 1

    # -- receiving ----------------------------------------------------------------

    def _on_event(self, fd: int = -1) -> None:
        if fd >= 0:
            lib.vk_fd_consume(fd)       # the port's event (see EventHub.register)
        self._read_scheduled = False
        if self.closed:
            return
        try:
            # A callback may close the session (and unmap the ring) at any
            # point: look before every step.
            seen, answers, asked = self._r.rd.own, self._answers, self._asked
            if self._ctl or self._ready:
                self._flush()
            more = self._read()
            if self.closed:
                return
            if self._ctl or self._ready:
                self._flush()
            if more:
                self._schedule_read()
            elif not self.closed and lib.vchan_ring_peer_live(self._r) != 1:
                self._check_peer()          # (gone, or an error: the whole check)
            if not self.closed:
                if self._notify[0] or self._force_notify:
                    self._flush_notify()
                if self._pollers:
                    if self._r.rd.own != seen:
                        self._poll_start()      # it came: more may follow
                elif asked and self._answers != answers:
                    self._answered(asked)       # (adaptive) what a write waited for
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fail(exc)

    def _schedule_read(self) -> None:
        if not self._read_scheduled and not self.closed:
            self._read_scheduled = True
            self._loop.call_soon(self._on_event)

    def _read(self) -> bool:
        """Handle the frames in the ring; True if it stopped with more to do."""
        r, f, pa, pb, alen, blen = self._r, self._frame, self._pa, self._pb, self._alen, \
            self._blen
        streams = self.streams
        total = 0
        woke = 0
        if self._lazy is not None:
            if self._lazy_fresh:
                return False            # its reader takes them first (_lazy_expire)
            self._evict_lazy()          # it did not: copy them aside
        while not self.closed:
            if total >= READ_BUDGET:
                return True
            if self._notify[0] and total - woke >= self._wake_after:
                # The writer waits for space and a good share is free: wake
                # it now, so that it writes while we read on.
                woke = total
                self._flush_notify()
            rc = lib.vchan_mux_peek(r, f, self._max_in, pa, alen, pb, blen)
            if rc <= 0:
                if rc < 0:
                    raise _ring_error(rc, "read")
                return False
            kind, sid, n = f.type, f.stream, f.length
            if not self._hello_seen and kind != HELLO:
                raise _protocol_error(f"{_NAMES.get(kind, kind)} before HELLO")
            if kind == DATA:
                self._answers += 1          # (what an adaptive poll window waits for)
                stream = streams.get(sid)
                if stream is None:
                    self._unknown_stream(sid, kind)
                    lib.vchan_ring_consume(r, HEADER + n, self._notify)
                    continue
                if n > stream._recv_credit:
                    raise _protocol_error(f"stream {sid} sent {n} bytes beyond its "
                                          f"credit of {stream._recv_credit}")
                # (stream._can_deliver(), inline: nothing runs between here
                # and the delivery that could change it)
                can = stream._made and not stream._paused and not stream._rbuf and \
                    not stream._conn_lost
                if not can and stream._made and not stream._conn_lost:
                    if not self._waited:
                        # Paused (a StreamReader with a full buffer, mostly):
                        # its reader usually resumes it within one loop
                        # iteration. Leave the frame in the ring until then,
                        # rather than copying it aside -- once: the frames
                        # behind it (other streams) wait no longer than that.
                        self._waited = True
                        return True
                else:
                    self._waited = False
                if stream._reader is not None and n and can and not stream._eof_received:
                    run: int = lib.vchan_mux_run_length(r, f, self._max_in,
                                                        stream._recv_credit)
                    if run < 0:
                        raise _ring_error(run, "read")
                    if run >= GATHER:   # (a few small frames are copied out at once)
                        self._announce(stream, run)
                        return False
                if stream._buffered_protocol and can:
                    total += stream._deliver_frames(f, pa[0], alen[0], pb[0], blen[0])
                    continue
                if n < GATHER:
                    # Small frames: this one and the stream's next ones in
                    # one copy, one data_received() (or one held piece).
                    k = lib.vchan_mux_take_run(r, f, pa[0], alen[0], pb[0], blen[0],
                                               self._max_in, stream._recv_credit,
                                               self._scratch, GATHER_MAX, self._notify)
                    if k < 0:
                        raise _ring_error(k, "read")
                    stream._recv_credit -= k
                    total += k
                    stream._data(ffi.unpack(self._scratch, k))
                    continue
                stream._recv_credit -= n
                total += n
                if can:
                    data = _unpack(pa[0], alen[0], pb[0], blen[0], 0)
                    lib.vchan_ring_consume(r, HEADER + n, self._notify)
                    stream._data(data)
                else:
                    stream._hold(pa[0], alen[0], pb[0], blen[0], 0)
                    lib.vchan_ring_consume(r, HEADER + n, self._notify)
                continue
            if n > MAX_CONTROL:
                raise _protocol_error(f"a {_NAMES.get(kind, kind)} frame of {n} bytes")
            payload = b""
            if n:
                buf = ffi.new("char[]", n)
                rc = lib.vchan_mux_take(r, f, pa[0], alen[0], pb[0], blen[0], buf,
                                        self._notify)
                if rc < 0:
                    raise _ring_error(rc, "read")
                payload = ffi.unpack(buf, n)
            else:
                lib.vchan_ring_consume(r, HEADER, self._notify)
            self._control(kind, f.flags, sid, f.arg, payload)
        return False

    # -- frames a vchan StreamReader takes from the ring itself -----------------------
    #
    # A stream read through vchan.StreamReader is told how many bytes of its
    # DATA frames lie together at the head of the ring, and its read(),
    # readexactly() and readline() copy what they return straight out of
    # the ring, in C (vchan/_reader.c, through self._direct and
    # vchan_direct_take): one copy, no buffer of ours made and freed between
    # (whose churn costs page faults once the allocator trims its heap), and
    # no Python per frame.  A frame may be taken in parts (_direct.offset);
    # it is consumed with its last byte, and every take reads and checks its
    # header again.  Python hears of it when the run is over or a waiting
    # writer is owed its wake-up (_lazy_taken).  Nothing
    # behind those frames is read meanwhile.  The reader is woken now and
    # runs in the next loop iteration; whatever it has not taken by the end
    # of that iteration is copied aside into its buffer (_lazy_expire), so
    # the frames behind wait no longer than they would for a paused stream.

    def _announce(self, stream: StreamTransport, k: int) -> None:
        """Tell the stream's reader of its run of ``k`` bytes of frames at the head."""
        stream._recv_credit -= k
        self._lazy, self._lazy_fresh = stream, True
        d = self._direct
        d.stream, d.flags, d.left, d.offset = stream.stream_id, self._frame.flags, k, 0
        stream._consumed(k)
        assert stream._reader is not None
        # The reader is woken first: its task runs before the expiry does.
        stream._reader._ring_ready(k)
        self._loop.call_soon(self._lazy_expire)

    def _lazy_expire(self) -> None:
        self._lazy_fresh = False
        self._on_event()

    def _take_lazy(self) -> bytes:
        """The next piece of the announced frames (the rest of the head
        frame, or a run of small ones), copied out of the ring and consumed."""
        stream = self._lazy
        assert stream is not None
        r, f, pa, pb, alen, blen = self._r, self._frame, self._pa, self._pb, self._alen, \
            self._blen
        d = self._direct
        rc = lib.vchan_mux_peek(r, f, self._max_in, pa, alen, pb, blen)
        if rc < 0:
            raise _ring_error(rc, "read")
        n, skip, left = f.length, d.offset, d.left
        if not rc or f.type != DATA or f.stream != stream.stream_id or f.flags != d.flags \
                or not skip < n or n - skip > left:
            raise _protocol_error("the peer rewrote frames it had published")
        if n < GATHER and not skip:
            k = lib.vchan_mux_take_run(r, f, pa[0], alen[0], pb[0], blen[0], self._max_in,
                                       left, self._scratch, min(GATHER_MAX, left),
                                       self._notify)
            if k < 0:
                raise _ring_error(k, "read")
            data = ffi.unpack(self._scratch, k)
            freed = k
        else:
            data = _unpack(pa[0], alen[0], pb[0], blen[0], skip)
            k = lib.vchan_ring_consume(r, HEADER + n, self._notify)
            if k < 0:
                raise _ring_error(k, "read")
            d.offset = 0
            freed = HEADER + n
        d.left = left - len(data)
        if self._notify[0]:
            d.freed += freed
        if not d.left:
            self._lazy = None
        return data  # type: ignore[no-any-return]

    def _lazy_taken(self) -> None:
        """The reader took bytes of the run (vchan_direct_take, from its C
        paths): the run may be over, and a writer that waits for room is
        woken once a good share is free (or the run is over)."""
        d = self._direct
        if not d.left:
            self._lazy = None
        if self._notify[0] and (d.freed >= d.wake_after or self._lazy is None):
            d.freed = 0
            self._flush_notify()

    def _evict_lazy(self) -> None:
        """Copy what the reader did not take into its buffer."""
        stream = self._lazy
        assert stream is not None and stream._reader is not None
        reader = stream._reader
        while self._lazy is not None:
            reader._ring_evicted(self._take_lazy())

    def _drop_lazy(self) -> None:
        """The session ends: forget the announced bytes (the reader fails)."""
        stream, self._lazy = self._lazy, None
        if stream is not None and stream._reader is not None:
            stream._reader._ring_lost()
        self._direct.left = self._direct.offset = 0

    def _unknown_stream(self, sid: int, kind: int) -> None:
        """A frame for a stream we do not have: forgotten (fine) or never opened."""
        opened = self._next_id - 1 if not self.is_server else self._last_opened
        if sid == 0 or sid > opened:
            raise _protocol_error(f"{_NAMES.get(kind, kind)} for stream {sid}, never opened")

    def _control(self, kind: int, flags: int, sid: int, arg: int, payload: bytes) -> None:
        if kind == HELLO:
            if self._hello_seen:
                raise _protocol_error("a second HELLO")
            if arg != VERSION:
                raise _protocol_error(f"unsupported session version {arg}")
            if len(payload) < _HELLO_BODY.size:
                raise _protocol_error(f"a HELLO of {len(payload)} bytes")
            window, max_streams = _HELLO_BODY.unpack_from(payload)
            if not 0 < window <= _MAX_CREDIT:
                raise _protocol_error(f"window {window} out of range")
            self.peer_window, self.peer_max_streams = window, max_streams
            self._hello_seen = True
            return
        if kind == GOAWAY:
            if self.is_server:
                raise _protocol_error("GOAWAY from a client")
            self.draining = True
            if self._on_idle is not None:
                self._on_idle(self)
            return
        if kind == OPEN:
            self._open(sid, payload)
            return
        stream = self.streams.get(sid)
        if stream is None:
            if kind not in (WINDOW, EOF, CLOSE, RESET, BLOCKED):
                raise _protocol_error(f"unknown frame type {kind}")
            self._unknown_stream(sid, kind)
            return
        if kind == WINDOW:
            if arg == 0 or stream._credit + arg > _MAX_CREDIT:
                raise _protocol_error(f"window update of {arg} for stream {sid}")
            stream._credit += arg
            stream._blocked_sent = False
            if stream._buffer:
                self._want_send(stream)
        elif kind == BLOCKED:
            # The peer has data for this stream and no credit: the next
            # WINDOW must wake it, and so must this look (a quiet WINDOW may
            # be in its ring already, unseen).
            stream._peer_blocked = True
            self._force_notify = True
        elif kind == EOF:
            stream._peer_eof(closed=False)
        elif kind == CLOSE:
            stream._peer_eof(closed=True)
        elif kind == RESET:
            why = payload.decode(errors="replace") or "reset by the peer"
            exc: OSError = (ConnectionRefusedError(why) if flags & RESET_REFUSED
                            else ConnectionResetError(why))
            self._forget(stream)
            stream._force_close(exc)
        else:
            raise _protocol_error(f"unknown frame type {kind}")

    def _open(self, sid: int, payload: bytes) -> None:
        if not self.is_server:
            raise _protocol_error("OPEN from a server")
        if sid <= self._last_opened:
            raise _protocol_error(f"OPEN of stream {sid} after {self._last_opened}")
        self._last_opened = sid
        self._answers += 1              # (a request, as DATA is: see _answered)
        port = payload.decode(errors="replace")
        if self.draining or self._accept is None:
            why = "the vchan server is no longer serving"
        elif len(self.streams) >= self.max_streams:
            why = (f"the vchan server's limit of {self.max_streams} connections per "
                   "session is reached")
        else:
            result = self._accept(self, sid, port)
            if not isinstance(result, str):
                return
            why = result
        self._send_control(RESET, RESET_REFUSED, sid, 0, why.encode())

    def _check_peer(self) -> None:
        """The ring is empty (and re-armed): is the peer still there?"""
        r = self._r
        live = lib.vchan_ring_peer_live(r)
        if live < 0:
            raise _ring_error(live, "peer state")
        if live != 0:
            return
        ready = lib.vchan_ring_data_ready(r)
        if ready < 0:
            raise _ring_error(ready, "read")
        if ready:
            self._schedule_read()       # written just before it went: read it first
            return
        flags = lib.vchan_ring_peer_flags(r)
        if flags & NOTIFY_HELLO and not flags & NOTIFY_CLOSED:
            self._reset(ConnectionResetError(
                f"vchan peer domain {self.peer} went away without closing "
                "(crashed or killed)"))
        else:
            self._end_gracefully()

    def _peer_domain_gone(self, domid: int) -> None:
        self._reset(ConnectionResetError(f"vchan peer domain {domid} no longer exists"))

    def _hypervisor_failed(self, exc: BaseException) -> None:
        self._endpoint.keep_quiet()     # the peer learns it as we did, not as a close
        self._reset(exc)

    # -- stream bookkeeping -------------------------------------------------------

    def _add(self, stream: StreamTransport) -> None:
        self.streams[stream.stream_id] = stream

    def _forget(self, stream: StreamTransport) -> None:
        if self._lazy is stream:
            # Its reader may still read what came before the end.
            try:
                self._evict_lazy()
            except RemoteProtocolError:
                self._drop_lazy()
        if self.streams.pop(stream.stream_id, None) is not None and not self.streams:
            if self.draining and self.is_server:
                self.close()
            elif self._on_idle is not None:
                self._on_idle(self)

    # -- ending -------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self._error = exc
        if isinstance(exc, RemoteProtocolError):
            self._loop.call_exception_handler({
                "message": "vchan session peer broke the protocol", "exception": exc,
                "session": self})
        elif not isinstance(exc, OSError):
            self._loop.call_exception_handler({
                "message": "Fatal error on a vchan session", "exception": exc,
                "session": self})
        self._reset(exc)

    def _reset(self, exc: BaseException) -> None:
        """Every stream fails with ``exc``; the session ends."""
        if self.closed:
            return
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._force_close(exc)
        self._teardown()

    def _end_gracefully(self) -> None:
        """The peer closed the session: every stream sees EOF after its data."""
        streams = list(self.streams.values())
        self.draining = True
        for stream in streams:
            stream._peer_eof(closed=True)
        if not self.closed:
            self.streams.clear()
            self._teardown()

    def close(self) -> None:
        """Close the ring (gracefully: the peer's streams see EOF)."""
        if self.closed:
            return
        with contextlib.suppress(Exception):
            self._flush()
        self._reset(ConnectionAbortedError("the vchan session was closed"))

    def _teardown(self) -> None:
        if self.closed:
            return
        self._drop_lazy()               # before the ring is unmapped
        self._direct.ring = ffi.NULL
        self.closed = True
        self._ready.clear()
        self._ctl.clear()
        self._hub.unwatch_peer(self.peer, self)
        try:
            self._endpoint.close()
        finally:
            self._hub.unregister(self._endpoint.port)
            if self._on_close is not None:
                self._on_close(self)
