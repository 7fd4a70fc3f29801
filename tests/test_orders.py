"""Ring order negotiation, as libxenvchan does it.

The server picks both orders from two requested minimum sizes
(``libxenvchan_server_init(..., left_min, right_min)``); the client checks
what it finds in page 0 before mapping anything.
"""

from __future__ import annotations

import itertools
import mmap

import pytest

from vchan import RemoteProtocolError
from vchan.addresses import MAX_RING_SIZE
from vchan.ring import (
    EORDER,
    Ring,
    client_orders,
    ring_offset,
    ring_pages,
    server_orders,
)

K = 1024

# (read_min, write_min) -> (read_order, write_order): boundary cases worked
# out by hand from libxenvchan_server_init in tools/libs/vchan/init.c.
TABLE = [
    ((0, 0), (10, 11)),             # defaults: both in page 0
    ((1, 1), (10, 11)),
    ((1 * K, 2 * K), (10, 11)),     # exactly the in-page sizes
    ((1 * K + 1, 1 * K), (11, 10)), # read too big for the small slot
    ((2 * K, 1 * K), (11, 10)),
    ((2 * K, 2 * K), (11, 12)),     # read takes the large slot, write a page
    ((1 * K, 2 * K + 1), (11, 12)), # write needs a page; read takes the large slot
    ((2 * K + 1, 2 * K), (12, 11)), # write takes the large slot
    ((2 * K + 1, 2 * K + 1), (12, 12)),
    ((4 * K, 4 * K), (12, 12)),
    ((4 * K + 1, 0), (13, 11)),
    ((0, 4 * K + 1), (11, 13)),
    ((64 * K, 64 * K), (16, 16)),
    ((64 * K + 1, 64 * K), (17, 16)),
    ((MAX_RING_SIZE, MAX_RING_SIZE), (20, 20)),
    ((MAX_RING_SIZE, 0), (20, 11)),
    ((1 * K, MAX_RING_SIZE), (11, 20)),
]


@pytest.mark.parametrize(("sizes", "orders"), TABLE, ids=[f"{a}-{b}" for (a, b), _ in TABLE])
def test_server_order_table(sizes: tuple[int, int], orders: tuple[int, int]) -> None:
    assert server_orders(*sizes) == orders


def _model(read_min: int, write_min: int) -> tuple[int, int]:
    """An independent statement of libxenvchan's published rules."""
    def min_order(size: int) -> int:
        order = 12
        while (1 << order) < size:
            order += 1
        return order

    r, w = min_order(read_min), min_order(write_min)
    if read_min <= 1024 and write_min <= 2048:
        return 10, 11
    if read_min <= 2048 and write_min <= 1024:
        return 11, 10
    if read_min <= 2048:
        return 11, w
    if write_min <= 2048:
        return r, 11
    return r, w


GRID = sorted({0, 1, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 8192, 65535,
               65536, 65537, 1 << 19, (1 << 19) + 1, (1 << 20) - 1, 1 << 20})


def test_server_orders_match_model_on_grid() -> None:
    for read_min, write_min in itertools.product(GRID, GRID):
        got = server_orders(read_min, write_min)
        assert got == _model(read_min, write_min), (read_min, write_min)
        # Whatever the server picks is acceptable to a client, and big enough.
        assert got[0] != got[1] or got[0] >= 12
        assert 1 << got[0] >= read_min and 1 << got[1] >= write_min


@pytest.mark.parametrize("sizes", [(MAX_RING_SIZE + 1, 0), (0, MAX_RING_SIZE + 1)])
def test_server_rejects_rings_over_one_mebibyte(sizes: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="larger than the largest vchan ring"):
        server_orders(*sizes)


def test_server_rejects_negative_and_non_int_sizes() -> None:
    with pytest.raises(ValueError, match="read_min must be >= 0"):
        server_orders(-1, 0)
    with pytest.raises(TypeError, match="write_min must be an int"):
        server_orders(0, 1.5)  # type: ignore[arg-type]


def _page(left: int, right: int) -> mmap.mmap:
    page = mmap.mmap(-1, 4096)
    page[16:18] = left.to_bytes(2, "little")
    page[18:20] = right.to_bytes(2, "little")
    return page


def _client_accepts(left: int, right: int) -> bool:
    """libxenvchan's init_gnt_cli checks."""
    if not (10 <= left <= 20 and 10 <= right <= 20):
        return False
    return not (left == right and left < 12)


def test_client_validation_rules() -> None:
    for left, right in itertools.product(range(0, 24), repeat=2):
        page = _page(left, right)
        if _client_accepts(left, right):
            # The client writes the left ring and reads the right one.
            assert client_orders(page) == (right, left)
        else:
            with pytest.raises(RemoteProtocolError) as info:
                client_orders(page)
            assert info.value.code == EORDER


def test_client_rejects_huge_orders() -> None:
    with pytest.raises(RemoteProtocolError, match="invalid ring order"):
        client_orders(_page(0xFFFF, 12))


def test_ring_placement() -> None:
    assert ring_offset(10) == 1024
    assert ring_offset(11) == 2048
    assert [ring_offset(o) for o in range(12, 21)] == [None] * 9
    assert [ring_pages(o) for o in range(10, 21)] == [0, 0] + [1 << i for i in range(9)]


def test_server_writes_what_the_client_checks() -> None:
    page = mmap.mmap(-1, 4096)
    Ring.server(page, 11, 10)
    assert client_orders(page) == (10, 11)
    assert page[20] == 2 and page[21] == 1      # cli_live waiting, srv_live up
    assert page[22] == 0x41                     # cli_notify = WRITE | HELLO (extension)
