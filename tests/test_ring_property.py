"""Property tests: two endpoints over one shared buffer, random interleavings.

Every operation is checked against ``ringpair.Model``: the byte stream
arrives intact in both directions, every return value is what libxenvchan's
rules give, and an event is requested exactly when the protocol says so --
in particular, a side that would sleep is always woken (no lost wake-up).
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringpair import Model, Pair

VALID_ORDERS = [(a, b) for a, b in itertools.product(range(10, 21), repeat=2)
                if not (a == b and a < 12)]

OPS = ["write", "read", "send", "recv", "writev", "data_ready", "buffer_space", "peek_consume",
       "reserve_commit"]


def _apply(model: Model, op: str, is_server: bool, size: int, sizes: list[int]) -> None:
    if op == "writev":
        model.writev(is_server, sizes)
    elif op in ("data_ready", "buffer_space"):
        getattr(model, op)(is_server)
    elif op == "send" and size > model.pair.side(is_server).write_size:
        with pytest.raises(ValueError, match="larger than the ring"):
            model.pair.side(is_server).send(b"x" * size)
    elif op == "recv" and size > model.pair.side(is_server).read_size:
        with pytest.raises(ValueError, match="larger than the ring"):
            model.pair.side(is_server).recv(size)
    else:
        getattr(model, op)(is_server, size)
    model.check_shared_bytes()


@st.composite
def scenario(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[str, bool, int, list[int]]]]:
    orders = draw(st.sampled_from(VALID_ORDERS))
    biggest = 1 << max(orders)
    size = st.one_of(
        st.integers(0, 64),
        st.integers(0, 2 * biggest),
        st.sampled_from([1 << o for o in range(10, 21)]),
    )
    steps = draw(st.lists(
        st.tuples(st.sampled_from(OPS), st.booleans(), size,
                  st.lists(st.integers(0, biggest), max_size=4)),
        max_size=40,
    ))
    return orders, steps


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_random_interleavings_keep_stream_and_wakeups(
    case: tuple[tuple[int, int], list[tuple[str, bool, int, list[int]]]],
) -> None:
    (left, right), steps = case
    model = Model(Pair(left, right))
    for op, is_server, size, sizes in steps:
        _apply(model, op, is_server, size, sizes)
    model.drain()
    model.check_shared_bytes()


@pytest.mark.parametrize(("left", "right"), VALID_ORDERS,
                         ids=[f"L{a}-R{b}" for a, b in VALID_ORDERS])
def test_every_order_pair_wraps_many_times(left: int, right: int) -> None:
    """Each valid order pair carries several ring-fulls, wrapping the indices."""
    rnd = random.Random(left * 100 + right)
    model = Model(Pair(left, right))
    biggest = 1 << max(left, right)
    target = 4 * biggest
    while min(model.sides[True].received, model.sides[False].received) < target:
        op = rnd.choice(OPS)
        is_server = rnd.random() < 0.5
        size = rnd.choice([rnd.randint(0, 100), rnd.randint(0, biggest),
                           rnd.randint(0, 2 * biggest)])
        sizes = [rnd.randint(0, biggest // 2) for _ in range(rnd.randint(0, 3))]
        _apply(model, op, is_server, size, sizes)
    model.drain()


def test_indices_wrap_past_two_to_the_32() -> None:
    """Free-running u32 indices: nothing changes when they overflow."""
    import mmap

    from vchan.ring import Ring

    page = mmap.mmap(-1, mmap.PAGESIZE)
    server = Ring.server(page, 10, 11)
    # Put the ring where it would be after ~4 GiB of traffic: every shared
    # index and the server's private copies just below 2**32 (an empty ring).
    start = (1 << 32) - 700
    for off in (0, 4, 8, 12):
        page[off:off + 4] = start.to_bytes(4, "little")
    for half in (server._r.rd, server._r.wr):
        half.own = half.peer = start
    client = Ring.client(page)      # a client starts from the page's indices
    data = bytes(range(256)) * 8
    for _ in range(20):
        assert client.write(data[:1000]) == 1000
        assert server.read(1000) == data[:1000]
        assert server.write(data[:2000]) == 2000
        assert client.read(2000) == data[:2000]
    assert int.from_bytes(page[4:8], "little") < start     # left.prod wrapped
    assert int.from_bytes(page[12:16], "little") < start   # right.prod wrapped
