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
import collections.abc
import gc
from typing import Any

import pytest
import support
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vchan
from vchan import _reader
from vchan._stream_reader import _JOIN, _WHOLE, StreamReader


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


def _feed_both(ref: Any, new: Any, op: str, arg: Any) -> None:
    """The same feed_data(arg), feed_eof() or set_exception() to both readers
    (none after EOF)."""
    if ref._eof:
        return
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
            _feed_both(ref, new, op, arg)
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


big_op_st = st.one_of(
    st.tuples(st.just("feed"), st.sampled_from([1, 999, 40_000, _JOIN, 70_001, 150_000])),
    st.tuples(st.just("feed_eof"), st.none()),
    st.tuples(st.just("read"), st.sampled_from([1, 5_000, _JOIN])),
    st.tuples(st.just("readexactly"), st.sampled_from([_JOIN + 1, 100_003, 300_007])),
    st.tuples(st.just("cancel"), st.none()),
    st.tuples(st.just("exception"), st.none()),
)


async def _differential_large(ops: list[tuple[str, Any]], limit: int) -> None:
    """As _differential, for readexactly() of more than _JOIN bytes (filled
    as the bytes come, vchan/_reader.c's _assemble), with cancellation: the
    same results, and buffered sizes between calls, as asyncio's reader.  Not the same
    pause/resume calls: asyncio's buffers a long message past its limit and
    resumes each time it waits, ours takes its bytes as they come."""
    loop = asyncio.get_running_loop()
    ref, new, _, _ = _pair(loop, limit)
    pending: tuple[asyncio.Task[Any], asyncio.Task[Any]] | None = None
    fed = 0
    for op, arg in ops:
        if op == "cancel":
            if pending is not None:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                pending = None
        elif op in ("feed", "feed_eof", "exception"):
            if op == "feed" and not ref._eof:
                arg = bytes((fed + i) % 251 for i in range(arg))
                fed += len(arg)
            _feed_both(ref, new, op, arg)
        elif pending is None:
            pending = (loop.create_task(getattr(ref, op)(arg)),
                       loop.create_task(getattr(new, op)(arg)))
        for _ in range(3):
            await asyncio.sleep(0)
        if pending is not None:
            a, b = pending
            assert a.done() == b.done(), (op, a, b)
            if a.done():
                pending = None
                ra, rb = _outcome(a), _outcome(b)
                if ra[0] == rb[0] == "ok" and ra[1] != rb[1]:
                    assert ra[1].startswith(rb[1]) and rb[1], (len(ra[1]), len(rb[1]))
                    assert await new.readexactly(len(ra[1]) - len(rb[1])) == ra[1][len(rb[1]):]
                else:
                    assert ra == rb, (op, ra[0], rb[0])
        if pending is None:             # (while one waits, ours holds its bytes)
            assert len(ref._buffer) == new._size
            assert ref.at_eof() == new.at_eof()
    if pending is not None:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(ops=[("feed", 999), ("read", 1), ("readexactly", 100_003), ("feed", 40_000),
              ("cancel", None), ("read", 5_000), ("readexactly", 300_007), ("feed", 150_000),
              ("feed", 150_000), ("feed", 70_001)], limit=2**14)
@given(ops=st.lists(big_op_st, max_size=25), limit=st.sampled_from([1, 2**14, 2**16]))
def test_a_large_readexactly_is_as_asyncios(ops: list[tuple[str, Any]], limit: int) -> None:
    asyncio.run(_differential_large(ops, limit))


async def test_a_large_readexactly_copies_once_and_keeps_the_buffer_small() -> None:
    """readexactly(n > _JOIN) takes each piece as it comes: the reader's
    buffer stays empty while the message comes, never paused at twice its
    limit (asyncio's is, after the third piece, and resumed as it waits)."""
    reader = StreamReader(limit=2**16)
    transport = FakeTransport()
    reader.set_transport(transport)
    task = asyncio.create_task(reader.readexactly(200_000))
    for i in range(4):
        await asyncio.sleep(0)
        reader.feed_data(bytes([i]) * 50_000)
        await asyncio.sleep(0)
        assert reader._size == 0
    assert await task == b"".join(bytes([i]) * 50_000 for i in range(4))
    assert transport.calls == []


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
    assert support.attributes_inline(StreamReader(), "_ring")
    assert support.attributes_inline(StreamReader(limit=1 << 20), "_ring")


# -- read(), readexactly(), readline(): the awaitable of vchan/_reader.c ---------------------
#
# They return a C object that stands for the coroutine asyncio's methods
# return; it must behave as one: nothing happens until it is awaited, it is
# awaited once, asyncio takes it wherever it takes a coroutine, and
# cancelling it or throwing into it reaches the Python method it runs.

_CALLS = {"read": lambda r: r.read(3), "readexactly": lambda r: r.readexactly(3),
          "readline": lambda r: r.readline(), "readuntil": lambda r: r.readuntil(b"\n")}


@pytest.mark.parametrize("name", sorted(_CALLS))
async def test_a_read_is_a_coroutine_to_asyncio(name: str) -> None:
    r = StreamReader()
    r.feed_data(b"ab\ncd")
    call = _CALLS[name](r)
    assert type(call) is _reader.Call
    assert asyncio.iscoroutine(call)
    assert isinstance(call, collections.abc.Coroutine)
    assert call.__name__ == name and call.__qualname__ == f"StreamReader.{name}"
    assert list(await asyncio.gather(call)) == [b"ab\n"]
    line = await asyncio.create_task(_CALLS[name](_reader_with(b"xyz\n")))
    assert line == (b"xyz\n" if name.startswith("readl") or name == "readuntil" else b"xyz")


def _reader_with(data: bytes) -> StreamReader:
    r = StreamReader()
    r.feed_data(data)
    return r


@pytest.mark.parametrize("name", sorted(_CALLS))
async def test_a_read_never_awaited_or_cancelled_before_it_starts_takes_nothing(
        name: str) -> None:
    r = _reader_with(b"ab\ncdef")
    call = _CALLS[name](r)
    del call
    gc.collect()
    _CALLS[name](r).close()
    task = asyncio.create_task(_CALLS[name](r))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(_CALLS[name](r), 0)
    assert r._size == 7
    assert await r.read(100) == b"ab\ncdef"


@pytest.mark.parametrize("name", sorted(_CALLS))
async def test_a_waiting_read_cancelled_leaves_the_reader_as_it_was(name: str) -> None:
    r = StreamReader()
    task = asyncio.create_task(_CALLS[name](r))
    await asyncio.sleep(0)
    assert r._waiter is not None            # (the Python method waits)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert r._waiter is None
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(_CALLS[name](r), 0.01)
    assert r._waiter is None
    r.feed_data(b"ab\n")
    assert await _CALLS[name](r) == b"ab\n"


@pytest.mark.parametrize("buffered", [b"abc\n", b""], ids=["at-once", "waiting"])
async def test_a_read_is_awaited_once(buffered: bytes) -> None:
    r = _reader_with(buffered) if buffered else StreamReader()
    call = r.readexactly(3)
    if not buffered:
        asyncio.get_running_loop().call_soon(r.feed_data, b"abc\n")
    assert await call == b"abc"
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        await call


async def test_a_read_speaks_the_coroutine_protocol() -> None:
    r = StreamReader()
    call = r.readexactly(2)
    with pytest.raises(TypeError, match="non-None value"):
        call.send(1)
    call = r.read(5)
    assert isinstance(call, _reader.Call)
    waiter = call.send(None)                # it waits for data: asyncio's future
    assert isinstance(waiter, asyncio.Future) and waiter is r._waiter
    assert call.cr_await is not None
    with pytest.raises(KeyError, match="thrown"):
        call.throw(KeyError("thrown"))
    assert r._waiter is None
    with pytest.raises(RuntimeError):
        call.send(None)
    call = r.readline()
    call.send(None)
    call.close()                            # ends the Python method (GeneratorExit)
    assert r._waiter is None
    with pytest.raises(ValueError, match="not started"):
        r.read(1).throw(ValueError("not started"))
    r.feed_data(b"abc")
    call = r.read(2)
    with pytest.raises(StopIteration) as stop:
        call.send(None)                     # answered at once
    assert stop.value.value == b"ab"
    assert list(r.read(1).__await__()) == [] and r._size == 0


async def test_a_read_in_a_reference_cycle_is_collected() -> None:
    def calls() -> int:
        return sum(type(o) is _reader.Call for o in gc.get_objects())

    gc.collect()
    before = calls()
    r = StreamReader()
    call = r.read(1)
    r.cycle = call                          # type: ignore[attr-defined]
    assert calls() == before + 1
    del r, call
    gc.collect()
    assert calls() == before


async def test_a_subclass_that_overrides_the_reads_is_called() -> None:
    class Mine(StreamReader):
        async def read(self, n: int = -1) -> bytes:
            return b"mine"

        async def readexactly(self, n: int) -> bytes:
            return b"exactly mine"

    r = Mine()
    r.feed_data(b"theirs\n")
    assert await r.read(3) == b"mine"
    assert await r.readexactly(3) == b"exactly mine"
    assert await r.readline() == b"theirs\n"


async def test_the_reads_check_what_asyncio_checks_first() -> None:
    r = _reader_with(b"abc\n")
    with pytest.raises(ValueError, match="less than zero"):
        await r.readexactly(-1)
    assert await r.read(0) == b""
    with pytest.raises(TypeError):
        r.read("3")                         # type: ignore[arg-type, unused-coroutine]
    r.set_exception(ConnectionResetError("gone"))
    for call in (r.read(1), r.readexactly(1), r.readline()):
        with pytest.raises(ConnectionResetError, match="gone"):
            await call


async def test_the_reads_take_their_arguments_as_asyncios_do() -> None:
    import inspect

    r = _reader_with(b"abcdefgh")
    assert await r.read(n=2) == b"ab"
    assert await r.readexactly(n=2) == b"cd"
    r.feed_eof()
    assert await r.read() == b"efgh"
    for method, asyncio_method in ((r.read, asyncio.StreamReader.read),
                                   (r.readexactly, asyncio.StreamReader.readexactly),
                                   (r.readline, asyncio.StreamReader.readline),
                                   (r.readuntil, asyncio.StreamReader.readuntil)):
        ours = list(inspect.signature(method).parameters)
        theirs = list(inspect.signature(asyncio_method).parameters)[1:]    # (self)
        assert ours == theirs
    with pytest.raises(TypeError, match="unexpected keyword argument 'm'"):
        r.read(m=1)                         # type: ignore[call-arg, unused-coroutine]
    with pytest.raises(TypeError, match="missing 1 required argument: 'n'"):
        r.readexactly()                     # type: ignore[call-arg, unused-coroutine]
    with pytest.raises(TypeError, match="at most 1 argument"):
        r.read(1, n=1)                      # type: ignore[misc, unused-coroutine]


@pytest.mark.parametrize("separator", [b"\n", b"\r\n", b"END"])
async def test_readuntil_in_c_ends_pieces_and_keeps_to_the_limit(separator: bytes) -> None:
    """The C path takes a line that ends its piece whole (the piece itself),
    and leaves one that starts beyond the limit to the Python method."""
    r = StreamReader(limit=8)
    piece = b"ab" + separator
    r.feed_data(piece)
    r.feed_data(b"x" * 20 + separator)
    assert await r.readuntil(separator) is piece
    assert r._pos == 0 and len(r._chunks) == 1
    with pytest.raises(asyncio.LimitOverrunError):
        await r.readuntil(separator=separator)
    assert await r.readexactly(20 + len(separator)) == b"x" * 20 + separator
    r.feed_data(b"12" + separator + b"34")
    assert await r.readuntil((separator,)) == b"12" + separator     # (a tuple: Python's)
    r.feed_data(separator)
    assert await r.readuntil(bytearray(separator)) == b"34" + separator    # (Python's too)
