"""vchan.StreamReader behaves exactly as asyncio.StreamReader.

The reader keeps received pieces instead of one bytearray; these tests drive
it and asyncio's own reader with the same pieces and the same calls (random
ones, from hypothesis) and require the same results, exceptions, buffered
sizes and pause/resume calls.  The one documented difference: ``read(n)`` may
return fewer of the buffered bytes (a whole piece instead of a joined copy);
the comparison accounts for it by reading the rest.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import support
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vchan
from vchan.streams import _JOIN, _WHOLE, StreamReader


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False
        self.calls.append("resume")


def _pair(loop: asyncio.AbstractEventLoop, limit: int) -> tuple[Any, Any, Any, Any]:
    ref, new = asyncio.StreamReader(limit=limit, loop=loop), StreamReader(limit=limit, loop=loop)
    t_ref, t_new = FakeTransport(), FakeTransport()
    ref.set_transport(t_ref)
    new.set_transport(t_new)
    return ref, new, t_ref, t_new


def _outcome(task: asyncio.Task[Any]) -> tuple[str, Any]:
    exc = task.exception()
    if exc is None:
        return ("ok", task.result())
    if isinstance(exc, asyncio.IncompleteReadError):
        return (type(exc).__name__, (exc.partial, exc.expected))
    if isinstance(exc, asyncio.LimitOverrunError):
        return (type(exc).__name__, (exc.args[0], exc.consumed))
    return (type(exc).__name__, str(exc))


SEPS = [b"\n", b"\r\n", b"ab", b"xyz!"]
# Bytes rich in (parts of) the separators, so that lines, straddling
# separators and limits are met often.
data_st = st.one_of(
    st.lists(st.sampled_from([b"a", b"b", b"\n", b"\r", b"x", b"y", b"z", b"!", b"q"]),
             max_size=24).map(b"".join),
    st.binary(max_size=40))
op_st = st.one_of(
    st.tuples(st.just("feed"), data_st),
    st.tuples(st.just("feed_eof"), st.none()),
    st.tuples(st.just("read"), st.integers(-1, 48)),
    st.tuples(st.just("readexactly"), st.integers(0, 48)),
    st.tuples(st.just("readuntil"), st.sampled_from(SEPS)),
    st.tuples(st.just("readline"), st.none()),
    st.tuples(st.just("exception"), st.none()),
)


async def _differential(ops: list[tuple[str, Any]], limit: int) -> None:
    loop = asyncio.get_running_loop()
    ref, new, t_ref, t_new = _pair(loop, limit)
    pending: tuple[asyncio.Task[Any], asyncio.Task[Any], str] | None = None

    async def settle() -> None:
        nonlocal pending
        for _ in range(3):
            await asyncio.sleep(0)
        if pending is None:
            return
        a, b, name = pending
        assert a.done() == b.done(), (name, a, b)
        if a.done():
            pending = None
            ra, rb = _outcome(a), _outcome(b)
            if name == "read" and ra[0] == rb[0] == "ok" and ra[1] != rb[1]:
                # vchan may return fewer of the buffered bytes: a prefix;
                # take the rest of what asyncio returned from it.
                assert ra[1].startswith(rb[1]) and rb[1], (ra, rb)
                rest = ref_taken = ra[1][len(rb[1]):]
                got = await new.readexactly(len(rest))
                assert got == ref_taken
            else:
                assert ra == rb, (name, ra, rb)

    for op, arg in ops:
        if op in ("feed", "feed_eof", "exception"):
            if ref._eof:
                continue
            if op == "feed":
                ref.feed_data(arg)
                new.feed_data(arg)
            elif op == "feed_eof":
                ref.feed_eof()
                new.feed_eof()
            else:
                exc = ConnectionResetError("gone")
                ref.set_exception(exc)
                new.set_exception(exc)
        elif pending is None:
            if op in ("readline",):
                a, b = loop.create_task(ref.readline()), loop.create_task(new.readline())
            else:
                a = loop.create_task(getattr(ref, op)(arg))
                b = loop.create_task(getattr(new, op)(arg))
            pending = (a, b, op)
        await settle()
        assert len(ref._buffer) == new._size
        assert ref.at_eof() == new.at_eof()
        assert t_ref.calls == t_new.calls
    if pending is not None:
        pending[0].cancel()
        pending[1].cancel()
        await asyncio.gather(pending[0], pending[1], return_exceptions=True)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# (found by hypothesis: read() at EOF of an emptied, paused reader resumes it)
@example(ops=[("feed", b"\n\n\n"), ("feed_eof", None), ("readexactly", 4), ("read", 1)],
         limit=1)
# (a line one byte over the limit, in one piece)
@example(ops=[("feed", b"ab\n"), ("readline", None), ("readline", None)], limit=1)
@given(ops=st.lists(op_st, max_size=40), limit=st.sampled_from([1, 2, 3, 4, 8, 16, 64, 2**16]))
def test_same_as_asyncio_stream_reader(ops: list[tuple[str, Any]], limit: int) -> None:
    asyncio.run(_differential(ops, limit))


async def test_pauses_above_twice_the_limit_and_resumes_at_the_limit() -> None:
    reader = StreamReader(limit=8)
    transport = FakeTransport()
    reader.set_transport(transport)
    reader.feed_data(b"a" * 16)
    assert transport.calls == []
    reader.feed_data(b"b")
    assert transport.calls == ["pause"]
    assert await reader.readexactly(8) == b"a" * 8
    assert transport.calls == ["pause"]         # 9 bytes left
    assert await reader.readexactly(1) == b"a"
    assert transport.calls == ["pause", "resume"]


async def test_read_returns_a_whole_piece_without_copying() -> None:
    reader = StreamReader()
    piece = bytes(range(256)) * (_WHOLE // 256)
    reader.feed_data(piece)
    reader.feed_data(b"x" * 100)
    got = await reader.read(1 << 20)
    assert got is piece
    assert await reader.read(1 << 20) == b"x" * 100


async def test_read_joins_small_pieces_up_to_the_join_size() -> None:
    reader = StreamReader(limit=1 << 20)
    for _ in range(2 * _JOIN // 100):
        reader.feed_data(b"y" * 100)
    got = await reader.read(1 << 20)
    assert got == b"y" * _JOIN
    assert await reader.read(10) == b"y" * 10


async def test_a_short_read_never_cuts_into_a_large_piece() -> None:
    # A small piece (or the rest of one a read took part of) ahead of large
    # ones: read(n) returns it alone, and each large piece after it whole,
    # uncopied.  Joining it to part of the next large piece would leave every
    # later read starting inside a piece, copying all its bytes twice.
    reader = StreamReader(limit=1 << 20)
    big = [bytes([i]) * (4 * _WHOLE) for i in range(4)]
    reader.feed_data(b"s" * 100)
    for piece in big:
        reader.feed_data(piece)
    assert await reader.read(1 << 20) == b"s" * 100
    for piece in big[:2]:
        assert await reader.read(1 << 20) is piece
    assert await reader.readexactly(10) == big[2][:10]
    assert await reader.read(1 << 20) == big[2][10:]      # the rest of that piece
    assert await reader.read(1 << 20) is big[3]


async def test_small_pieces_join_up_to_a_large_one_and_no_further() -> None:
    reader = StreamReader(limit=1 << 20)
    big = b"B" * (2 * _WHOLE)
    for _ in range(3):
        reader.feed_data(b"y" * 100)
    reader.feed_data(big)
    assert await reader.read(1 << 20) == b"y" * 300
    assert await reader.read(1 << 20) is big


async def test_readexactly_of_one_whole_piece_is_that_piece() -> None:
    reader = StreamReader()
    piece = b"z" * 5000
    reader.feed_data(piece)
    assert await reader.readexactly(5000) is piece


async def test_a_reused_buffer_is_copied() -> None:
    reader = StreamReader()
    buf = bytearray(b"abc")
    reader.feed_data(buf)
    buf[:] = b"xyz"
    assert await reader.read(10) == b"abc"


@pytest.mark.parametrize("pieces", [[b"ab\r", b"\nrest"], [b"a", b"b", b"\r", b"\n"],
                                    [b"ab\r\n"], [b"x!ab\r", b"\n"]])
async def test_readuntil_a_tuple_of_separators_takes_the_first_to_end(
        pieces: list[bytes]) -> None:
    reader = StreamReader()
    for p in pieces:
        reader.feed_data(p)
    data = b"".join(pieces)
    got = await reader.readuntil((b"\r\n", b"\n", b"!"))
    ends = [data.find(s) + len(s) for s in (b"\r\n", b"\n", b"!") if s in data]
    assert got == data[:min(ends)]


async def test_readuntil_tuple_errors() -> None:
    reader = StreamReader()
    with pytest.raises(ValueError, match="at least one element"):
        await reader.readuntil(())
    with pytest.raises(ValueError, match="one-byte"):
        await reader.readuntil((b"", b"\n"))


async def test_open_connection_gives_a_vchan_stream_reader() -> None:
    assert issubclass(StreamReader, asyncio.StreamReader)
    assert vchan.StreamReader is StreamReader


async def test_a_reader_keeps_its_attributes_inline() -> None:
    """Every read() / readexactly() looks up several of the reader's
    attributes; kept inline, not in a dict of their own (the framed-message
    read of benchmarks/reader_calls.py took 970 ns a message with a dict, 630
    inline)."""
    assert support.attributes_inline(StreamReader(), "_chunks")
    assert support.attributes_inline(StreamReader(limit=1 << 20), "_chunks")
